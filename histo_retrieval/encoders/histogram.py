"""The colour-histogram baseline: the joint RGB histogram of a patch, compared by cosine.

A patch's vector is the histogram of its colours over `bins` levels per channel, joint over R, G and
B (8 bins: 512 cells), L1-normalised; the Embedder's L2 normalisation then makes the inner product
of two vectors their cosine. It sees the same crop as the networks (after the stain normalisation of
the checkpoint it is compared with, when bench/real_data.py gives one) and learns nothing: the row
any learned encoder must beat.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ColourHistogram", "DEFAULT_BINS"]

DEFAULT_BINS = 8


class ColourHistogram(nn.Module):
    """n x 3 x H x W images in [0, 1] (uint8 / 255, as the Embedder gives them) -> n x bins^3 float32
    histograms, L1-normalised."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        super().__init__()
        if not 1 <= bins <= 256:
            raise ValueError(f"bins must be 1 to 256, got {bins}")
        self.bins = bins

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = torch.round(images.float() * 255).long() * self.bins // 256  # the uint8 value's bin
        cells = (levels[:, 0] * self.bins + levels[:, 1]) * self.bins + levels[:, 2]  # n x H x W joint cells
        n, size = cells.shape[0], self.bins ** 3
        flat = (cells.reshape(n, -1) + torch.arange(n, device=cells.device).view(n, 1) * size).reshape(-1)
        counts = torch.bincount(flat, minlength=n * size).view(n, size).double()
        return (counts / counts.sum(dim=1, keepdim=True)).float()
