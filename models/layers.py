"""Pieces shared by the three model families: the attention-ensemble forward pass and the embedding head."""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Builds a normalisation layer for a number of channels, as torchvision's `norm_layer` arguments do.
NormLayer = Callable[[int], nn.Module]

# nn.BatchNorm2d's default momentum, the one the reference trains with.
BATCHNORM_MOMENTUM = 0.1


def repeated_update_momentum(num_updates: int, momentum: float = BATCHNORM_MOMENTUM) -> float:
    """The momentum of one running-statistics update equal to `num_updates` updates with the same batch.

    Each update maps r to (1 - m) r + m s; after k of them r becomes (1 - m)^k r + (1 - (1 - m)^k) s.
    """
    return 1.0 - (1.0 - momentum) ** num_updates


def set_batchnorm_momentum(module: nn.Module, momentum: float) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum = momentum


def check_embedding_split(embedding_dim: int, num_learners: int) -> int:
    """The per-learner width, after checking that `embedding_dim` splits evenly over the learners."""
    if num_learners < 1:
        raise ValueError(f"num_learners must be at least 1, got {num_learners}")
    if embedding_dim < num_learners or embedding_dim % num_learners:
        raise ValueError(f"embedding_dim ({embedding_dim}) must be a positive multiple of "
                         f"num_learners ({num_learners})")
    return embedding_dim // num_learners


class StackedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d for a batch made of `stacks` equal sub-batches stacked along dimension 0.

    In training mode each sub-batch is normalised with its own statistics, and the running statistics
    are updated once per sub-batch, in order: exactly what `stacks` separate calls would do. This lets
    the M masked copies of a batch go through the shared tail as one batch, where the reference runs the
    tail once per head. In eval mode the running statistics serve every sub-batch alike, so it is a
    plain BatchNorm2d.
    """

    def __init__(self, num_features: int, stacks: int = 1, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.stacks = stacks

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.stacks == 1:
            return super().forward(x)
        if x.shape[0] % self.stacks:
            raise ValueError(f"StackedBatchNorm2d expects {self.stacks} equal sub-batches, "
                             f"got a batch of {x.shape[0]}")
        outputs = []
        for chunk in x.chunk(self.stacks):
            momentum = 0.0 if self.momentum is None else self.momentum
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does it
                    momentum = 1.0 / float(self.num_batches_tracked)
            outputs.append(F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias,
                                        True, momentum, self.eps))
        return torch.cat(outputs)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution that runs as one matrix product over the channels for a wide layer on a
    channels_last CPU tensor, and as nn.Conv2d otherwise.

    The same sums in another order, so the same numbers to float rounding, and the same parameters.
    On CPU, oneDNN's 1x1 convolution (its backward pass above all) is slower than the equal matrix
    product for the 256- to 2048-channel layers of stages 3-4 and the attention heads, while the
    narrow layers of stages 1-2 are as fast either way; bench/model_speed.py measures it (bench/results.md).
    """

    MIN_MATMUL_CHANNELS = 256

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, stride=stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or min(self.in_channels, self.out_channels) < self.MIN_MATMUL_CHANNELS
                or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        if self.stride != (1, 1):
            # Contiguous again, or matmul would see a batch of matrices and copy the weight for each one.
            x = x[:, :, ::self.stride[0], ::self.stride[1]].contiguous(memory_format=torch.channels_last)
        # N x C x H x W in channels_last is N x H x W x C in memory: a linear layer over the last dimension.
        return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


def stacked_batchnorm(stacks: int) -> NormLayer:
    """A `norm_layer` for the shared tail, which sees the M masked copies of a batch at once."""
    return partial(StackedBatchNorm2d, stacks=stacks)


def pooled_embedding(features: Tensor, linear: nn.Linear, dropout: nn.Module | None = None) -> Tensor:
    """Global average pool, optional dropout, linear projection and L2 normalisation, all in the linear
    layer's precision (float32 unless the whole model was cast).

    Runs outside autocast: in bfloat16 the unit rows would keep only 3 significant digits, and retrieval
    compares cosine similarities that differ in the third decimal. Adaptive pooling equals the
    reference's fixed 7x7 window at 224x224 and accepts any input size.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        pooled = F.adaptive_avg_pool2d(features.to(linear.weight.dtype), 1).flatten(1)
        if dropout is not None:
            # Dropout2d expects channel maps: the reference drops whole channels of the n x C x 1 x 1 pool.
            pooled = dropout(pooled[:, :, None, None]).flatten(1)
        return F.normalize(linear(pooled), dim=1)


class AttentionEnsemble(nn.Module):
    """stem -> attention trunk (once) -> M attention heads -> M masked copies of the stem's features
    -> shared tail (one batch of M x n) -> M unit embeddings.

    The reference recomputes the trunk for every head, although its input is the same each time; here
    it runs once and its BatchNorm layers take momentum 1 - 0.9**M, so that running statistics match
    the reference's M updates with the same batch. The reference also runs the shared tail once per
    head; here the M masked copies go through it as one stacked batch (larger, faster matrix products,
    one weight gradient instead of M to add up), and its BatchNorm layers (StackedBatchNorm2d) keep
    each copy's statistics apart in training mode, so outputs, gradients and running statistics stay
    the reference's. Subclasses define the four parts below.
    """

    num_learners: int
    embedding_dim: int

    def forward_stem(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_trunk(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def attention_heads(self) -> Sequence[nn.Module]:
        """The M mask makers, or an empty sequence for a model without attention."""
        raise NotImplementedError

    def forward_tail(self, features: Tensor) -> Tensor:
        """The M masked copies stacked (M n x C x H x W; M = 1 without attention) -> M n x (embedding_dim / M)
        float32 unit rows, copy by copy."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.forward_stem(images)
        heads = self.attention_heads()
        if not heads:
            return [self.forward_tail(features)]
        trunk = self.forward_trunk(features)
        masked = [features * head(trunk) for head in heads]
        stacked = masked[0] if len(masked) == 1 else torch.cat(masked)
        return list(self.forward_tail(stacked).chunk(len(heads)))
