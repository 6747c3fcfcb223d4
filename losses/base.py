"""What the three metric losses share: input checks, float32 maths, label masks, the backward pass
and usage statistics.

Every loss sees the batch as SPEC.md section 3 does: for learner i, S = X_i X_i^T; for anchor j the
positives are the other samples of its class (the self pair dropped by index, not by `s < 1`) and
the negatives are the samples of the other classes. Nothing here reads a tensor's value on the
host, so a training step never waits for the device because of the loss.
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


@lru_cache(maxsize=16)
def _pair_kinds(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    # XOR-ed with `same`, these give stacked masks in one operation each: same ^ eye drops the self
    # pairs (positives), same ^ True is the other classes (negatives). (positive, negative) and
    # (negative, positive) as 2 x 1 x n x n, then (positive, negative) as 2 x n x n.
    eye = torch.eye(n, dtype=torch.bool, device=device)
    full = torch.ones(n, n, dtype=torch.bool, device=device)
    pos_neg = torch.stack((eye, full))
    return pos_neg.unsqueeze(1), torch.stack((full, eye)).unsqueeze(1), pos_neg


def stacked_label_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean 2 x 1 x n x n masks: (positive, negative) and the same two swapped, (negative, positive)."""
    same = labels.unsqueeze(1) == labels
    pos_neg, neg_pos, _ = _pair_kinds(labels.shape[0], labels.device)
    return same ^ pos_neg, same ^ neg_pos


def mean_over_anchors_weights(labels: Tensor, dtype: torch.dtype, num_learners: int) -> tuple[Tensor, Tensor, Tensor]:
    """n x n pair weights (w_pos, w_neg) that turn sums over S into contrastive-style means, and the
    mask of the anchors used.

    Summed over the M learners, `(S * w_pos).sum()` is the mean over learners of the mean, over
    anchors with at least one positive and one negative, of each anchor's mean positive similarity
    (likewise w_neg). Without such an anchor both weights are zero, so the loss is a zero that
    back-propagates zeros.
    """
    # Positives and negatives stacked (2 x n x n): one operation for both at every step. The
    # arithmetic is that of each kind on its own, so the weights are the same to the bit.
    kinds = ((labels.unsqueeze(1) == labels) ^ _pair_kinds(labels.shape[0], labels.device)[2]).to(dtype)
    counts = kinds.sum(-1)
    valid = counts.prod(0) > 0
    total = valid.sum(dtype=dtype).clamp_(min=1)
    anchor_weight = valid / (total * num_learners if num_learners > 1 else total)
    weights = kinds.mul_((anchor_weight / counts.clamp_(min=1)).unsqueeze(-1))
    return weights[0], weights[1], valid


class _SimilarityLoss(torch.autograd.Function):
    """A loss of the similarities S = X_i X_i^T, differentiated by hand.

    `loss_and_grad(S, need_grad)` returns the loss and dloss/dS (or None), S n x n for an n x d X
    (one learner: a plain matrix product, no batched one) and M x n x n for M x n x d. Then
    dloss/dX = (G + G^T) X, one matrix product: autograd would see X and X^T as two inputs and
    record every masked element-wise step, which at n = 60 costs more than the arithmetic.
    """

    @staticmethod
    def forward(ctx, x: Tensor, loss_and_grad: LossAndGrad) -> Tensor:
        loss, grad_sim = loss_and_grad(x @ x.transpose(-1, -2), ctx.needs_input_grad[0])
        ctx.save_for_backward(x, grad_sim)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:
        x, grad_sim = ctx.saved_tensors
        return ((grad_sim + grad_sim.transpose(-1, -2)) * grad_loss) @ x, None


class MetricLoss(nn.Module):
    """Base class of the losses of similarities: input handling, autocast, the hand-written backward
    and usage statistics.

    Subclasses implement `similarity_loss`. The masks of the last call are kept so that `stats` can
    count from them when read: the plain training call pays nothing for the statistics.
    """

    def __init__(self) -> None:
        super().__init__()
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
