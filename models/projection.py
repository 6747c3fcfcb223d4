"""A projection head trained on a frozen encoder's vectors (train.py --freeze-trunk).

    head = build_head("linear", in_dim=1024, out_dim=512)          # one linear layer
    head = build_head("mlp", in_dim=1024, out_dim=512)             # linear, ReLU, linear (hidden = in_dim)
    embeddings = head(vectors)                                     # [n x out_dim unit rows], one learner

Its output has the paper's models' shape (a list of M = 1 tensors of unit rows), so that it goes
through the same losses, the training loop and every tool unchanged.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

HEADS: tuple[str, ...] = ("linear", "mlp")


class ProjectionHead(nn.Module):
    """in_dim -> out_dim: one linear layer, or with `hidden` two with a ReLU between them.

    The input rows are L2-normalised first: the head reads an encoder's vector, which is a unit
    vector when cached (histo_retrieval.encoders) and the trunk's raw output when the trunk runs
    each step, so both paths feed the head the same rows.
    """

    num_learners = 1

    def __init__(self, in_dim: int, out_dim: int = 512, hidden: int | None = None) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden or 1) < 1:
            raise ValueError(f"sizes must be positive, got in_dim {in_dim}, out_dim {out_dim}, hidden {hidden}")
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        if hidden is None:
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            self.layers = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, vectors: Tensor) -> list[Tensor]:
        return [F.normalize(self.layers(F.normalize(vectors.flatten(1), dim=1)), dim=1)]


def build_head(kind: str, in_dim: int, out_dim: int = 512) -> ProjectionHead:
    """A fresh head: "linear", or "mlp" (two layers, `in_dim` hidden units). ValueError for another kind."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    return ProjectionHead(in_dim, out_dim, in_dim if kind == "mlp" else None)


def head_options(head: ProjectionHead) -> dict:
    """What rebuilds `head` with ProjectionHead(**options)."""
    return {"in_dim": head.in_dim, "out_dim": head.out_dim, "hidden": head.hidden}
