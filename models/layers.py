"""Pieces shared by the three model families: the attention-ensemble forward pass and the embedding head."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def pooled_embedding(features: Tensor, linear: nn.Linear, dropout: nn.Module | None = None) -> Tensor:
    """Global average pool, optional dropout, linear projection and L2 normalisation, all in float32.

    Runs outside autocast: in bfloat16 the unit rows would keep only 3 significant digits, and retrieval
    compares cosine similarities that differ in the third decimal. Adaptive pooling equals the
    reference's fixed 7x7 window at 224x224 and accepts any input size.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        pooled = F.adaptive_avg_pool2d(features.float(), 1).flatten(1)
        if dropout is not None:
            # Dropout2d expects channel maps: the reference drops whole channels of the n x C x 1 x 1 pool.
            pooled = dropout(pooled[:, :, None, None]).flatten(1)
        return F.normalize(linear(pooled), dim=1)


class AttentionEnsemble(nn.Module):
    """stem -> attention trunk (once) -> M attention heads -> M masked copies of the stem's features
    -> shared tail -> M unit embeddings.

    The reference recomputes the trunk for every head, although its input is the same each time; here
    it runs once and its BatchNorm layers take momentum 1 - 0.9**M, so that running statistics match
    the reference's M updates with the same batch. Subclasses define the four parts below.
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
        """Masked features -> n x (embedding_dim / M) float32 unit rows."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.forward_stem(images)
        heads = self.attention_heads()
        if not heads:
            return [self.forward_tail(features)]
        trunk = self.forward_trunk(features)
        return [self.forward_tail(features * head(trunk)) for head in heads]
