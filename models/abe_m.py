"""ABE-M: attention-based ensemble of M learners on GoogLeNet with BatchNorm (Kim et al., "Attention-based
Ensemble for Deep Metric Learning", ECCV 2018), as the paper's code builds it (`ABE_M`, M = 4)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .layers import AttentionEnsemble, NormLayer, check_embedding_split, pooled_embedding, repeated_update_momentum, \
    set_batchnorm_momentum, stacked_batchnorm

# GoogLeNet (Szegedy et al., CVPR 2015, table 1): in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION_WIDTHS = {
    "a3": (192, 64, 96, 128, 16, 32, 32),
    "b3": (256, 128, 128, 192, 32, 96, 64),
    "a4": (480, 192, 96, 208, 16, 48, 64),
    "b4": (512, 160, 112, 224, 24, 64, 64),
    "c4": (512, 128, 128, 256, 24, 64, 64),
    "d4": (512, 112, 144, 288, 32, 64, 64),
    "e4": (528, 256, 160, 320, 32, 128, 128),
    "a5": (832, 256, 160, 320, 32, 128, 128),
    "b5": (832, 384, 192, 384, 48, 128, 128),
}
STAGE4 = ("a4", "b4", "c4", "d4", "e4")
MASKED_CHANNELS = 480  # 3b's output, which the attention masks multiply
TRUNK_CHANNELS = 832  # 4e's output
FEATURE_CHANNELS = 1024  # 5b's output
DROPOUT = 0.4


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
        norm_layer(out_channels),
        nn.ReLU(inplace=True),
    ]


class Inception(nn.Module):
    """Four parallel branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max-pool -> 1x1."""

    def __init__(self, in_channels: int, n1x1: int, n3x3_reduce: int, n3x3: int, n5x5_reduce: int, n5x5: int,
                 pool_proj: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*conv_bn_relu(in_channels, n1x1, 1, norm_layer=norm_layer))
        self.b2 = nn.Sequential(*conv_bn_relu(in_channels, n3x3_reduce, 1, norm_layer=norm_layer),
                                *conv_bn_relu(n3x3_reduce, n3x3, 3, norm_layer=norm_layer))
        self.b3 = nn.Sequential(*conv_bn_relu(in_channels, n5x5_reduce, 1, norm_layer=norm_layer),
                                *conv_bn_relu(n5x5_reduce, n5x5, 5, norm_layer=norm_layer))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                *conv_bn_relu(in_channels, pool_proj, 1, norm_layer=norm_layer))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class ABEM(AttentionEnsemble):
    """GoogLeNet-BN up to the pooled 3b output; an attention trunk (its own inception 4a-4e) feeding M heads
    (1x1 conv 832 -> 480, BN, ReLU); each head's mask multiplies the pooled 3b output, which then passes
    through the shared inception 4a-5b, average pool, Dropout2d(0.4) and one shared linear layer."""

    def __init__(self, embedding_dim: int = 512, num_learners: int = 4) -> None:
        super().__init__()
        learner_dim = check_embedding_split(embedding_dim, num_learners)
        self.embedding_dim = embedding_dim
        self.num_learners = num_learners
        self.prelayer = nn.Sequential(
            *conv_bn_relu(3, 64, 7, stride=2),
            nn.MaxPool2d(3, stride=2, padding=1),
            *conv_bn_relu(64, 192, 3),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.a3 = Inception(*INCEPTION_WIDTHS["a3"])
        self.b3 = Inception(*INCEPTION_WIDTHS["b3"])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for name in STAGE4:
            setattr(self, f"att_{name}", Inception(*INCEPTION_WIDTHS[name]))
        self.att_conv_branches = nn.ModuleList(
            nn.Sequential(*conv_bn_relu(TRUNK_CHANNELS, MASKED_CHANNELS, 1)) for _ in range(num_learners))
        for name in STAGE4 + ("a5", "b5"):
            setattr(self, name, Inception(*INCEPTION_WIDTHS[name], norm_layer=stacked_batchnorm(num_learners)))
        self.dropout = nn.Dropout2d(DROPOUT)
        self.linear = nn.Linear(FEATURE_CHANNELS, learner_dim)
        for name in STAGE4:
            set_batchnorm_momentum(getattr(self, f"att_{name}"), repeated_update_momentum(num_learners))

    def forward_stem(self, images: Tensor) -> Tensor:
        return self.maxpool(self.b3(self.a3(self.prelayer(images))))

    def forward_trunk(self, features: Tensor) -> Tensor:
        for name in STAGE4:
            features = getattr(self, f"att_{name}")(features)
        return features

    def attention_heads(self) -> Sequence[nn.Module]:
        return self.att_conv_branches

    def forward_tail(self, features: Tensor) -> Tensor:
        for name in STAGE4:
            features = getattr(self, name)(features)
        features = self.b5(self.a5(self.maxpool(features)))
        return pooled_embedding(features, self.linear, self.dropout)


def abe_m(embedding_dim: int = 512, num_learners: int = 4) -> ABEM:
    return ABEM(embedding_dim=embedding_dim, num_learners=num_learners)
