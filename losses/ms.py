"""Multi-Similarity loss with pair mining (Wang et al., CVPR 2019)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import MetricLoss, label_masks


class MSLoss(MetricLoss):
    """Multi-Similarity loss of "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning" (Wang, Han, Huang, Dong & Scott, CVPR 2019).

    For anchor j, mining keeps the negatives with s + eps > min(positives) and the positives with
    s - eps < max(negatives); an anchor left without a mined positive or negative is skipped. Else
    its loss is (1/alpha) log(1 + sum_P exp(-alpha (s - lam))) + (1/beta) log(1 + sum_N exp(beta (s - lam))).
    Each learner's loss is the mean over its kept anchors (0 if mining kept none), and with M > 1
    learners the total is their mean (the reference refuses M > 1; SPEC.md departure).

    The defaults are the reference code's (Yang et al., BIBM 2019); the MS paper's own values are
    beta=50, eps=0.1.

    Args:
        alpha: scale of the positive term; 2 in both the MS paper and the reference code.
        beta: scale of the negative term; 5 in the reference code (50 in the MS paper).
        lam: similarity threshold lambda of both terms; 0.5 in both.
        eps: mining margin epsilon; 0.2 in the reference code (0.1 in the MS paper).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 5.0, lam: float = 0.5, eps: float = 0.2) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.lam = lam
        self.eps = eps

    def similarity_loss(self, sim: Tensor, need_grad: bool, *, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        positive, negative = label_masks(labels)
        hardest_pos = torch.where(positive, sim, torch.inf).amin(-1, keepdim=True)
        hardest_neg = torch.where(negative, sim, -torch.inf).amax(-1, keepdim=True)
        # An anchor without positives has hardest_pos = inf and so no mined negative (and vice versa).
        mined_pos = positive & (sim - self.eps < hardest_neg)
        mined_neg = negative & (sim + self.eps > hardest_pos)
        used = mined_pos.any(-1) & mined_neg.any(-1)
        self._remember(used, (mined_pos, mined_neg))
        anchor_weight = used / (used.sum(-1, keepdim=True, dtype=sim.dtype).clamp(min=1) * sim.shape[0])

        shifted = sim - self.lam
        # -inf outside the mined sets makes exp exactly 0 there.
        pos_exp = torch.where(mined_pos, shifted * -self.alpha, -torch.inf).exp()
        neg_exp = torch.where(mined_neg, shifted * self.beta, -torch.inf).exp()
        pos_sum = pos_exp.sum(-1)
        neg_sum = neg_exp.sum(-1)
        loss = ((pos_sum.log1p() / self.alpha + neg_sum.log1p() / self.beta) * anchor_weight).sum()
        if not need_grad:
            return loss, None
        # d/ds (1/a) log(1 + sum exp(+-a (s - lam))) = +-exp(+-a (s - lam)) / (1 + sum): the exps are reused.
        grad = neg_exp * (anchor_weight / (1 + neg_sum)).unsqueeze(-1) - pos_exp * (anchor_weight / (1 + pos_sum)).unsqueeze(-1)
        return loss, grad

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, lam={self.lam}, eps={self.eps}"
