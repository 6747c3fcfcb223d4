"""Contrastive loss on cosine similarities, as the reference code of Yang et al. (BIBM 2019) writes it."""
from __future__ import annotations

from torch import Tensor

from .base import MetricLoss


class ContrastiveLoss(MetricLoss):
    """Per anchor j: mean over negatives of relu(s - margin) minus mean over positives of s.

    This is the contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006) in the form the reference code
    of Yang et al. (BIBM 2019) uses on unit embeddings: positives are pulled towards similarity 1
    with no margin, negatives are pushed below `margin`. Anchors without a positive or a negative
    are skipped; each learner's loss is the mean over its anchors and the total is the mean over
    the M learners (docs/reproduction.md, losses).

    Under the default self-pair rule, the paper's code's, about half the anchors keep themselves as
    a positive (s_jj < 1 in float32): their pull on the other positives is scaled by |P| / (|P| + 1),
    and an anchor whose only positive is itself is used, its positive term -s_jj close to -1.

    Args:
        margin: similarity above which a negative pair is penalised; 0.5 in the reference code.
        self_pair: "reference" (default), the paper's code: a same-class pair is a positive when
            s < 1 in the similarities the loss uses, so the self pair stays whenever x . x < 1;
            "exclude", the clean choice: the self pair is dropped by index.
    """

    def __init__(self, margin: float = 0.5, self_pair: str = "reference") -> None:
        super().__init__(self_pair)
        self.margin = margin

    def similarity_loss(self, sim: Tensor, need_grad: bool, *, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        w_pos, w_neg = self._mean_weights(sim, labels)
        loss = (sim - self.margin).relu_().mul_(w_neg).sub_(sim * w_pos).sum()
        return loss, ((sim > self.margin) * w_neg - w_pos) if need_grad else None

    def extra_repr(self) -> str:
        return f"margin={self.margin}, self_pair={self.self_pair!r}"
