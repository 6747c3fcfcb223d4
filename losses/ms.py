"""Multi-Similarity loss with pair mining (Wang et al., CVPR 2019)."""
from __future__ import annotations

from functools import lru_cache, partial

import torch
from torch import Tensor

from .base import MetricLoss, num_learners


@lru_cache(maxsize=32)
def _constants(alpha: float, beta: float, lam: float, eps: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """Constants of the (positive, negative) branches, stacked on a leading axis of 2: exponent
    scales (-alpha, beta) and mining signs (1, -1), 2 x 1 x 1 x 1; divisors (alpha, beta) and
    gradient signs (-1, 1), 2 x 1 x 1; the fill values -inf and 0; lam and eps. As 0-dim tensors of
    the similarities' dtype they give the same results as Python numbers, a little faster. They
    depend on the hyper-parameters, dtype and device only, never on the labels."""
    def column(a: float, b: float, dims: int) -> Tensor:
        return torch.tensor([a, b], dtype=dtype, device=device).view((2,) + (1,) * dims)

    fill = partial(torch.tensor, dtype=dtype, device=device)
    return (column(-alpha, beta, 3), column(1.0, -1.0, 3), column(alpha, beta, 2), column(-1.0, 1.0, 2),
            fill(-torch.inf), fill(0.0), fill(lam), fill(eps))


class MSLoss(MetricLoss):
    """Multi-Similarity loss of "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning" (Wang, Han, Huang, Dong & Scott, CVPR 2019).

    For anchor j, mining keeps the negatives with s + eps > min(positives) and the positives with
    s - eps < max(negatives); an anchor left without a mined positive or negative is skipped. Else
    its loss is (1/alpha) log(1 + sum_P exp(-alpha (s - lam))) + (1/beta) log(1 + sum_N exp(beta (s - lam))).
    Each learner's loss is the mean over its kept anchors (0 if mining kept none), and with M > 1
    learners the total is their mean (the reference refuses M > 1: a departure, docs/reproduction.md).

    The defaults are the reference code's (Yang et al., BIBM 2019); the MS paper's own values are
    beta=50, eps=0.1.

    Args:
        alpha: scale of the positive term; 2 in both the MS paper and the reference code.
        beta: scale of the negative term; 5 in the reference code (50 in the MS paper).
        lam: similarity threshold lambda of both terms; 0.5 in both.
        eps: mining margin epsilon; 0.2 in the reference code (0.1 in the MS paper).
        self_pair: "reference" (default), the paper's code: a same-class pair is a positive when
            s < 1 in the similarities the loss uses, so the self pair stays whenever x . x < 1;
            "exclude", the clean choice: the self pair is dropped by index. Mining almost never
            keeps a self pair (s_jj - eps < max negative needs a negative above 1 - eps), so the
            two rules rarely differ here.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 5.0, lam: float = 0.5, eps: float = 0.2,
                 self_pair: str = "reference") -> None:
        super().__init__(self_pair)
        self.alpha = alpha
        self.beta = beta
        self.lam = lam
        self.eps = eps

    def similarity_loss(self, sim: Tensor, need_grad: bool, *, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        # The positive and negative branches are computed together, stacked on a leading axis of 2
        # (branch 0 positives, branch 1 negatives): at n = 60 each operation costs its dispatch, not
        # its arithmetic, so one operation on both branches halves the cost. Every value is the
        # same, to the bit, as computing the branches one after the other.
        scale, mining_sign, divisor, grad_sign, minus_inf, zero, lam, eps = _constants(
            self.alpha, self.beta, self.lam, self.eps, sim.dtype, sim.device)
        # (positive, negative) as 2 x (M or 1) x n x n, to broadcast against the stacked branches.
        pos_neg = self.pair_kinds(sim, labels).view(2, -1, *sim.shape[-2:])
        neg_pos = pos_neg.flip(0)
        # signed = (s, -s). Mining keeps a positive if s - eps < max over negatives of s, and a
        # negative if -s - eps < max over positives of -s (that is, s + eps > min over positives of
        # s); negation is exact, so these are the unstacked comparisons. An anchor without positives
        # has max = -inf and so no mined negative (and vice versa).
        signed = sim * mining_sign
        hardest = torch.where(neg_pos, signed, minus_inf).amax(-1, keepdim=True)
        mined = pos_neg & (signed.sub_(eps) < hardest)
        # amax over bytes is any(-1) in half the time.
        used = mined.view(torch.uint8).amax(-1).all(0)
        self._remember(used, (mined,))
        count = used.sum(-1, keepdim=True, dtype=sim.dtype).clamp_(min=1)
        learners = num_learners(sim)
        anchor_weight = used / (count * learners if learners > 1 else count)

        # Zero outside the mined sets. Taking exp of every pair and then selecting is much faster than
        # exp(-inf), which takes a slow path, and where() never lets an overflow of an unused pair in.
        exps = torch.where(mined, ((sim - lam) * scale).exp_(), zero)
        sums = exps.sum(-1)
        loss = (sums.log1p().div_(divisor).sum(0) * anchor_weight).sum()
        if not need_grad:
            return loss, None
        # d/ds (1/a) log(1 + sum exp(+-a (s - lam))) = +-exp(+-a (s - lam)) / (1 + sum): the exps are
        # reused. sign * (1 + sum), one operation, is exact.
        weight = anchor_weight / torch.addcmul(grad_sign, sums, grad_sign)
        return loss, exps.mul_(weight.unsqueeze(-1)).sum(0).view(sim.shape)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, lam={self.lam}, eps={self.eps}, self_pair={self.self_pair!r}"
