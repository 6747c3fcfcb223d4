"""What the three metric losses share: input checks, float32 maths, pair masks, the backward pass
and usage statistics.

Every loss sees the batch as docs/reproduction.md (losses) describes it: for learner i,
S = X_i X_i^T; for anchor j the negatives are the samples of the other classes and the positives
are the samples of its own class, with the self pair handled by `self_pair`:

- "reference" (default), the paper's code: a same-class pair is a positive when s < 1, tested on
  the very S the loss uses. In float32, x . x < 1 for roughly 40% of unit vectors, so about half
  the anchors keep themselves as a positive (an anchor whose only positive is itself is used,
  not skipped), and any same-class pair with s >= 1, a duplicate say, is dropped too.
- "exclude", the clean choice: the self pair is dropped by index, every other same-class pair is
  a positive.

Nothing here reads a tensor's value on the host, so a training step never waits for the device
because of the loss.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache, partial
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.amp.autocast_mode import is_autocast_available

Embeddings = Tensor | Sequence[Tensor]
LossAndGrad = Callable[[Tensor, bool], tuple[Tensor, Tensor | None]]


def stack_learners(embeddings: Embeddings, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Return the embeddings as one tensor (at least float32) and the labels on its device: n x d
    for one learner, M x n x d for M > 1 learners.

    A single n x d tensor is one learner (M = 1); keeping it 2-D spares the batched product and an
    autograd node. Half-precision inputs are promoted to float32 because exp(beta * s) and sums over
    the batch lose too much in 16 bits.
    """
    if isinstance(embeddings, Tensor):
        x = embeddings
        if x.dim() != 2:
            raise ValueError(f"embeddings: expected n x d tensors of one shape (one per learner), got shapes {[tuple(x.shape)]}")
    else:
        if len(embeddings) == 0:
            raise ValueError("embeddings: expected a tensor or a non-empty list of n x d tensors, got an empty list")
        x = embeddings[0]
        shape = x.shape
        if len(shape) != 2 or any(e.shape != shape for e in embeddings):
            shapes = {tuple(e.shape) for e in embeddings}
            raise ValueError(f"embeddings: expected n x d tensors of one shape (one per learner), got shapes {sorted(shapes)}")
        if len(embeddings) > 1:
            x = torch.stack(list(embeddings))
    n = x.shape[-2]
    if n == 0:
        raise ValueError("embeddings: the batch is empty")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels: expected a 1-D tensor of {n} labels (one per embedding row), got shape {tuple(labels.shape)}")
    if not x.dtype.is_floating_point or x.dtype.itemsize < 4:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x, labels.to(x.device)


def num_learners(sim: Tensor) -> int:
    """M of an n x n (one learner) or M x n x n similarity tensor."""
    return sim.shape[0] if sim.dim() == 3 else 1


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on `device` if it is on, so the similarities stay float32."""
    if is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


SELF_PAIR_RULES: tuple[str, ...] = ("reference", "exclude")


@lru_cache(maxsize=16)
def _self_and_all(n: int, device: torch.device) -> Tensor:
    # XOR-ed with the same-class mask this gives (positives, negatives) stacked, 2 x n x n, in one
    # operation: same ^ eye drops the self pairs, same ^ True is the other classes.
    return torch.stack((torch.eye(n, dtype=torch.bool, device=device), torch.ones(n, n, dtype=torch.bool, device=device)))


def mean_over_anchors_weights(kinds: Tensor, dtype: torch.dtype, num_learners: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pair weights (w_pos, w_neg) that turn sums over S into contrastive-style means, and the mask
    of the anchors used, from the stacked (positive, negative) masks of `MetricLoss.pair_kinds`.

    Summed over the M learners, `(S * w_pos).sum()` is the mean over learners of the mean, over
    anchors with at least one positive and one negative, of each anchor's mean positive similarity
    (likewise w_neg); a learner without such an anchor counts as 0. Without any such anchor both
    weights are zero, so the loss is a zero that back-propagates zeros.
    """
    # Positives and negatives stacked: one operation for both at every step. The arithmetic is
    # that of each kind on its own, so the weights are the same to the bit.
    kinds = kinds.to(dtype)
    counts = kinds.sum(-1)
    valid = counts.prod(0) > 0
    # One total per learner when the masks are per learner (reference rule, M > 1), else one for all.
    total = valid.sum(-1, keepdim=True, dtype=dtype).clamp_(min=1)
    anchor_weight = valid / (total * num_learners if num_learners > 1 else total)
    weights = kinds.mul_((anchor_weight / counts.clamp_(min=1)).unsqueeze(-1))
    return weights[0], weights[1], valid


def similarities(x: Tensor) -> Tensor:
    """S = X_i X_i^T: n x n for an n x d X, M x n x n for M x n x d.

    One matrix product per learner, as the paper's code computes S, not one batched product: the
    reference's self-pair rule tests s < 1, so one rounding step on the diagonal decides whether an
    anchor keeps itself, and a batched product may round differently (PyTorch's CPU bmm takes a
    naive kernel for small matrices; cuBLAS may choose other kernels). On the CPU it costs the
    same as the batched product; on a GPU it is M small launches instead of one.
    """
    if x.dim() == 2:
        return x @ x.T
    return torch.stack([learner @ learner.T for learner in x.unbind(0)])


class _SimilarityLoss(torch.autograd.Function):
    """A loss of the similarities S = X_i X_i^T, differentiated by hand.

    `loss_and_grad(S, need_grad)` returns the loss and dloss/dS (or None), S of `similarities`:
    n x n for an n x d X and M x n x n for M x n x d. Then dloss/dX = (G + G^T) X, one matrix
    product (a self pair kept by the reference's rule is the entry S_jj, covered like any other):
    autograd would see X and X^T as two inputs and record every masked element-wise step, which at
    n = 60 costs more than the arithmetic.
    """

    @staticmethod
    def forward(ctx, x: Tensor, loss_and_grad: LossAndGrad) -> Tensor:
        loss, grad_sim = loss_and_grad(similarities(x), ctx.needs_input_grad[0])
        ctx.save_for_backward(x, grad_sim)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:
        x, grad_sim = ctx.saved_tensors
        return ((grad_sim + grad_sim.transpose(-1, -2)) * grad_loss) @ x, None


class MetricLoss(nn.Module):
    """Base class of the losses of similarities: input handling, autocast, the hand-written backward
    and usage statistics.

    Subclasses implement `similarity_loss`, with their pairs from `pair_kinds`. The masks of the
    last call are kept so that `stats` can count from them when read: the plain training call pays
    nothing for the statistics.

    Args:
        self_pair: "reference" (default), the paper's code: a same-class pair is a positive when
            s < 1 in S, so an anchor keeps itself whenever x . x < 1; "exclude", the clean choice:
            the self pair is dropped by index. Anything else is a ValueError.
    """

    def __init__(self, self_pair: str = "reference") -> None:
        super().__init__()
        if self_pair not in SELF_PAIR_RULES:
            raise ValueError(
                f"self_pair: expected 'reference' (the paper's code: a same-class pair counts when s < 1) "
                f"or 'exclude' (the self pair dropped by index), got {self_pair!r}")
        self.self_pair = self_pair
        self._last_masks: tuple[Tensor, tuple[Tensor, ...]] | None = None
        self._copies = 1

    def forward(self, embeddings: Embeddings, labels: Tensor) -> Tensor:
        """Loss of a batch: `embeddings` a list of M n x d tensors (or one n x d tensor), `labels` n."""
        x, labels = stack_learners(embeddings, labels)
        return self._loss_of_similarities(x, labels)

    def _loss_of_similarities(self, x: Tensor, labels: Tensor) -> Tensor:
        with full_precision(x.device):
            return _SimilarityLoss.apply(x, partial(self.similarity_loss, labels=labels))

    def similarity_loss(self, sim: Tensor, need_grad: bool, *, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """The loss of the similarities (n x n for one learner, M x n x n for M > 1; see
        `num_learners`) and, if `need_grad`, its derivative with respect to them, of the same shape.
        Implementations call `_remember`."""
        raise NotImplementedError

    def pair_kinds(self, sim: Tensor, labels: Tensor) -> Tensor:
        """Boolean (positive, negative) masks stacked on a leading axis of 2: 2 x n x n, shared by
        every learner, under "exclude"; 2 x sim.shape under "reference", whose positives depend on S."""
        same = labels.unsqueeze(1) == labels
        if self.self_pair == "exclude":
            return same ^ _self_and_all(labels.shape[0], labels.device)
        positive = same & (sim < 1)
        return torch.stack((positive, (~same).expand_as(positive)))

    def _mean_weights(self, sim: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """`mean_over_anchors_weights` of this batch, remembered for `stats`."""
        w_pos, w_neg, valid = mean_over_anchors_weights(self.pair_kinds(sim, labels), sim.dtype, num_learners(sim))
        # Masks shared by the M learners count once per learner.
        self._remember(valid, (w_pos, w_neg), copies=sim.numel() // w_pos.numel())
        return w_pos, w_neg

    def _remember(self, used_anchors: Tensor, pair_masks: tuple[Tensor, ...], copies: int = 1) -> None:
        """Keep the last call's anchors used (... x n) and disjoint pair masks (... x n x n, non-zero
        where a pair is used); `copies` > 1 when one set of masks serves every learner."""
        self._last_masks, self._copies = (used_anchors, pair_masks), copies

    @property
    def stats(self) -> dict[str, Tensor]:
        """0-dim tensors on the embeddings' device: `anchors` used (summed over learners) and
        `pairs` used (positive + negative). `anchors == 0` means the batch was skipped."""
        if self._last_masks is None:
            raise RuntimeError(f"{type(self).__name__}.stats: call the loss on a batch first")
        used_anchors, pair_masks = self._last_masks
        pairs = sum(((mask != 0) & used_anchors.unsqueeze(-1)).sum() for mask in pair_masks)
        return {"anchors": used_anchors.sum() * self._copies, "pairs": pairs * self._copies}
