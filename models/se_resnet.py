"""SE-ResNet-50 with mixed attention: the paper's proposed model (`se_resnet50`, one 512-d learner).

Yang et al., BIBM 2019: a branch built like stage 4 (stride 1) turns stage 3's output into a sigmoid
mask over its channels and positions, which multiplies that output before stage 4; together with the
SE blocks' channel gates this is the "mixed attention". `attention=False` is the paper's ablation.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .layers import check_embedding_split, repeated_update_momentum, set_batchnorm_momentum
from .resnet import ResNetBackbone, make_attention_head, make_attention_trunk_blocks

SE_REDUCTION = 16


class SEResNet50MixedAttention(ResNetBackbone):
    def __init__(self, embedding_dim: int = 512, num_learners: int = 1, attention: bool = True) -> None:
        super().__init__()
        if num_learners != 1:
            raise ValueError(f"se_resnet50 has one learner (num_learners=1), got num_learners={num_learners}; "
                             "use resnet50 or ABE_M for an ensemble")
        self.embedding_dim = check_embedding_split(embedding_dim, num_learners)
        self.num_learners = num_learners
        self.attention = attention
        self._build_stem(SE_REDUCTION)
        if attention:
            # The reference keeps trunk and head in one Sequential: att_layer.0-2 and att_layer.3.
            self.att_layer = nn.Sequential(*make_attention_trunk_blocks(SE_REDUCTION),
                                           make_attention_head(nn.Sigmoid()))
            set_batchnorm_momentum(self.att_layer[:-1], repeated_update_momentum(num_learners))
        self._build_tail(SE_REDUCTION, self.embedding_dim)

    def forward_trunk(self, features: Tensor) -> Tensor:
        return self.att_layer[:-1](features)

    def attention_heads(self) -> Sequence[nn.Module]:
        return [self.att_layer[-1]] if self.attention else []


def se_resnet50(embedding_dim: int = 512, num_learners: int = 1, attention: bool = True) -> SEResNet50MixedAttention:
    return SEResNet50MixedAttention(embedding_dim=embedding_dim, num_learners=num_learners, attention=attention)
