"""Contrastive loss on cosine similarities, as the reference code of Yang et al. (BIBM 2019) writes it."""
from __future__ import annotations

from torch import Tensor

from .base import MetricLoss, mean_over_anchors_weights, num_learners


class ContrastiveLoss(MetricLoss):
    """Per anchor j: mean over negatives of relu(s - margin) minus mean over positives of s.

    This is the contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006) in the form the reference code
    of Yang et al. (BIBM 2019) uses on unit embeddings: positives are pulled towards similarity 1
    with no margin, negatives are pushed below `margin`. Anchors without a positive or a negative
    are skipped; each learner's loss is the mean over its anchors and the total is the mean over
    the M learners (SPEC.md section 3).

    Args:
        margin: similarity above which a negative pair is penalised; 0.5 in the reference code.
    """

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = margin

    def similarity_loss(self, sim: Tensor, need_grad: bool, *, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        learners = num_learners(sim)
        w_pos, w_neg, valid = mean_over_anchors_weights(labels, sim.dtype, learners)
        self._remember(valid, (w_pos, w_neg), copies=learners)
        loss = (sim - self.margin).relu_().mul_(w_neg).sub_(sim * w_pos).sum()
        return loss, ((sim > self.margin) * w_neg - w_pos) if need_grad else None

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
