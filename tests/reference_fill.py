"""The fill rule of the reference fixtures (tests/data/fixtures_seed1.pt), shared by the model tests and the
benchmarks that need deterministic weights.

Freshly initialised models in eval mode map every image to nearly the same embedding, so a
benchmark ranking them would rank ties; filled weights give embeddings that differ clearly.
"""
from __future__ import annotations

import zlib

import torch


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
