"""ABE loss: contrastive loss per learner plus a divergence term between learners."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .base import Embeddings, MetricLoss, full_precision, stack_learners


@lru_cache(maxsize=16)
def _learner_pairs(num_learners: int, device: torch.device) -> Tensor:
    # The pairs a < b of learners depend on M only: build them once, not at every step.
    return torch.triu_indices(num_learners, num_learners, offset=1, device=device)


class ABELoss(MetricLoss):
    """Contrastive part plus `lambda_div` times the divergence between the M learners.

    From "Attention-based Ensemble for Deep Metric Learning" (Kim, Goyal, Chawla, Kim & Kwon,
    ECCV 2018), with the settings of the reference code of Yang et al. (BIBM 2019). Per anchor j and
    learner: mean over positives of relu(margin_c - s) plus mean over negatives of s; each learner's
    loss is the mean over anchors that have a positive and a negative, averaged over learners. The
    divergence, for every pair of learners a < b, is the mean over samples k of
    relu(<x_a,k, x_b,k> - margin_div), averaged over the pairs. With M = 1 there is no pair and no
    divergence term (the reference refuses M = 1: a departure, docs/reproduction.md). A batch with no usable anchor
    gives a zero loss, divergence included, so that the training loop can skip it.

    Args:
        lambda_div: weight of the divergence term; 0.05 in the reference code.
        margin_c: similarity below which a positive pair is penalised; 0.5 in the reference code.
        margin_div: similarity between two learners' embeddings of one sample above which the
            divergence term penalises it; 0.2 in the reference code.
        self_pair: "reference" (default), the paper's code: a same-class pair is a positive when
            s < 1 in the similarities the loss uses, so the self pair stays whenever x . x < 1 (in
            float32, about half the anchors). A kept self pair adds a zero, relu(margin_c - s_jj),
            to the positives' mean, and an anchor whose only positive is itself is used, with
            only its negative term. "exclude", the clean choice: the self pair is dropped by index.
    """

    def __init__(self, lambda_div: float = 0.05, margin_c: float = 0.5, margin_div: float = 0.2,
                 self_pair: str = "reference") -> None:
        super().__init__(self_pair)
        self.lambda_div = lambda_div
        self.margin_c = margin_c
        self.margin_div = margin_div

    def forward(self, embeddings: Embeddings, labels: Tensor) -> Tensor:
        x, labels = stack_learners(embeddings, labels)
        loss = self._loss_of_similarities(x, labels)
        if x.dim() == 2:  # one learner: no divergence
            return loss
        with full_precision(x.device):
            used_anchors = self._last_masks[0]
            return loss + self.lambda_div * self._divergence(x) * used_anchors.any()

    def similarity_loss(self, sim: Tensor, need_grad: bool, *, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        w_pos, w_neg = self._mean_weights(sim, labels)
        loss = (self.margin_c - sim).relu_().mul_(w_pos).add_(sim * w_neg).sum()
        return loss, (w_neg - (sim < self.margin_c) * w_pos) if need_grad else None

    def _divergence(self, x: Tensor) -> Tensor:
        first, second = _learner_pairs(x.shape[0], x.device)
        # Similarity of learner a's and learner b's embedding of the same sample, for every pair a < b.
        # index_select gathers the same rows as x[first], and its backward (index_add) is several
        # times faster than that of advanced indexing (index_put with accumulation).
        cross = (x.index_select(0, first) * x.index_select(0, second)).sum(-1)
        return (cross - self.margin_div).relu().mean()

    def extra_repr(self) -> str:
        return f"lambda_div={self.lambda_div}, margin_c={self.margin_c}, margin_div={self.margin_div}, self_pair={self.self_pair!r}"
