"""The reference code's way of running the models, and the fixtures' fill rule: the baselines of the
benchmarks and the oracles of the tests (one home for both).

    reference = ReferenceStyle(model)          # trunk and shared tail once per head, nn.Conv2d everywhere
    reference = per_head_copy(model)           # ... with the reference's trunk BatchNorm momentum too
    model.load_state_dict(filled_state_dict(model.state_dict(), seed=1))   # the fixtures' weights
"""
from __future__ import annotations

import copy
import zlib

import torch
from torch import Tensor, nn

from .layers import BATCHNORM_MOMENTUM, AttentionEnsemble, PointwiseConv2d, StackedBatchNorm2d, repeated_update_momentum


class ReferenceStyle(nn.Module):
    """A copy of `model` run the reference's way: its attention trunk and its shared tail
    once per head, every 1x1 convolution through nn.Conv2d.

    Outputs and gradients equal the model's own to float rounding; only the cost differs (and, in
    training mode, the trunk's BatchNorm statistics, which this path updates M times, irrelevant to timing).
    """

    def __init__(self, model: AttentionEnsemble) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        for module in self.model.modules():
            if isinstance(module, StackedBatchNorm2d):
                module.stacks = 1  # the tail sees one head's batch at a time
            elif isinstance(module, PointwiseConv2d):
                module.__class__ = nn.Conv2d  # same parameters, the convolution kernel

    def forward(self, images: Tensor) -> list[Tensor]:
        model = self.model
        features = model.forward_stem(images)
        return [model.forward_tail(features * head(model.forward_trunk(features))) for head in model.attention_heads()]


def per_head_copy(model: nn.Module) -> ReferenceStyle:
    """`ReferenceStyle` (trunk and tail once per head), with the trunk's BatchNorm
    momentum back at the reference's 0.1, so that its M updates are the reference's running statistics."""
    reference = ReferenceStyle(model)
    stacked_momentum = repeated_update_momentum(model.num_learners)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d) and module.momentum == stacked_momentum:
            module.momentum = BATCHNORM_MOMENTUM
    return reference


def filled_state_dict(template: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The fixtures' fill rule: deterministic values keyed by parameter name and shape only."""
    out = {}
    for key, tensor in template.items():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        leaf = key.rsplit(".", 1)[-1]
        shape = tuple(tensor.shape)
        if leaf == "num_batches_tracked":
            out[key] = torch.zeros_like(tensor)
        elif leaf == "running_mean":
            out[key] = torch.zeros(shape)
        elif leaf == "running_var":
            out[key] = torch.ones(shape)
        elif leaf == "weight" and len(shape) == 1:
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif leaf == "bias":
            out[key] = 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = torch.Size(shape[1:]).numel()
            out[key] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
    return out
