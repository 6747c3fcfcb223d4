"""ResNet-50 with a multi-head attention ensemble (the paper's `resnet50`, M = 4), and the ResNet
building blocks that `se_resnet.py` shares.

Layer names follow the reference (Cadene's `pretrainedmodels` SENet: `layers0` ... `layers4`,
`last_linear`), so its checkpoints load with strict=True.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn

from .layers import AttentionEnsemble, NormLayer, PointwiseConv2d, check_embedding_split, pooled_embedding, \
    repeated_update_momentum, set_batchnorm_momentum, stacked_batchnorm

EXPANSION = 4
STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_PLANES = (64, 128, 256, 512)
# Channels of stage 3's output, which the attention masks multiply, and of the trunk's and stage 4's output.
STAGE3_CHANNELS = STAGE_PLANES[2] * EXPANSION
STAGE4_CHANNELS = STAGE_PLANES[3] * EXPANSION


class SEModule(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018): channel gates from the global average."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block, with an SE module when `se_reduction` is given.

    The stride sits on the 3x3 conv (torchvision's "ResNet v1.5"), as in the reference; Caffe's SE-ResNet
    puts it on the first 1x1 conv instead, and the fixtures tell the two apart.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, se_reduction: int | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        outplanes = planes * EXPANSION
        self.conv1 = PointwiseConv2d(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = PointwiseConv2d(planes, outplanes)
        self.bn3 = norm_layer(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.se_module = SEModule(outplanes, se_reduction) if se_reduction else None
        self.downsample = None
        if stride != 1 or inplanes != outplanes:
            self.downsample = nn.Sequential(
                PointwiseConv2d(inplanes, outplanes, stride=stride),
                norm_layer(outplanes),
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se_module is not None:
            out = self.se_module(out)
        return self.relu(out + residual)


def make_layer0() -> nn.Sequential:
    """7x7/2 conv, BN, ReLU, 3x3/2 max-pool (ceil mode): 3 x H x W -> 64 x H/4 x W/4."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)),
        ("bn1", nn.BatchNorm2d(64)),
        ("relu1", nn.ReLU(inplace=True)),
        ("pool", nn.MaxPool2d(3, stride=2, ceil_mode=True)),
    ]))


def make_stage(inplanes: int, planes: int, blocks: int, stride: int, se_reduction: int | None,
               norm_layer: NormLayer = nn.BatchNorm2d) -> nn.Sequential:
    layers = [Bottleneck(inplanes, planes, stride, se_reduction, norm_layer)]
    layers += [Bottleneck(planes * EXPANSION, planes, 1, se_reduction, norm_layer) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def make_attention_trunk_blocks(se_reduction: int | None) -> list[nn.Module]:
    """Stage 4's blocks at stride 1: stage 3's output (1024 ch) -> 2048 ch at the same resolution."""
    return list(make_stage(STAGE3_CHANNELS, STAGE_PLANES[3], STAGE_BLOCKS[3], 1, se_reduction))


def make_attention_head(activation: nn.Module) -> nn.Sequential:
    """1x1 conv 2048 -> 1024 (no bias), BN and `activation`: a mask for stage 3's output."""
    return nn.Sequential(
        PointwiseConv2d(STAGE4_CHANNELS, STAGE3_CHANNELS),
        nn.BatchNorm2d(STAGE3_CHANNELS),
        activation,
    )


class ResNetBackbone(AttentionEnsemble):
    """layers0 ... layers3 as the stem, layers4 + pool + last_linear as the tail; subclasses add attention.

    Submodules are registered in the order of the reference's state_dict, so subclasses assign
    `att_*` between `_build_stem` and `_build_tail`.
    """

    def _build_stem(self, se_reduction: int | None) -> None:
        self.layers0 = make_layer0()
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip(STAGE_PLANES[:3], STAGE_BLOCKS[:3]), start=1):
            setattr(self, f"layers{index}", make_stage(inplanes, planes, blocks, 1 if index == 1 else 2, se_reduction))
            inplanes = planes * EXPANSION

    def _build_tail(self, se_reduction: int | None, learner_dim: int) -> None:
        self.layers4 = make_stage(STAGE3_CHANNELS, STAGE_PLANES[3], STAGE_BLOCKS[3], 2, se_reduction,
                                  stacked_batchnorm(self.num_learners))
        self.last_linear = nn.Linear(STAGE4_CHANNELS, learner_dim)

    def forward_stem(self, images: Tensor) -> Tensor:
        return self.layers3(self.layers2(self.layers1(self.layers0(images))))

    def forward_tail(self, features: Tensor) -> Tensor:
        return pooled_embedding(self.layers4(features), self.last_linear)


class ResNet50MultiAttention(ResNetBackbone):
    """The paper's `resnet50`: plain ResNet-50, one attention trunk after stage 3 feeding M sigmoid heads;
    each head's mask goes through the shared stage 4 and linear layer to give one learner's embedding."""

    def __init__(self, embedding_dim: int = 512, num_learners: int = 4) -> None:
        super().__init__()
        learner_dim = check_embedding_split(embedding_dim, num_learners)
        self.embedding_dim = embedding_dim
        self.num_learners = num_learners
        self._build_stem(se_reduction=None)
        self.att_layer = nn.Sequential(*make_attention_trunk_blocks(se_reduction=None))
        self.att_branches = nn.ModuleList(make_attention_head(nn.Sigmoid()) for _ in range(num_learners))
        self._build_tail(se_reduction=None, learner_dim=learner_dim)
        set_batchnorm_momentum(self.att_layer, repeated_update_momentum(num_learners))

    def forward_trunk(self, features: Tensor) -> Tensor:
        return self.att_layer(features)

    def attention_heads(self) -> Sequence[nn.Module]:
        return self.att_branches


def resnet50(embedding_dim: int = 512, num_learners: int = 4) -> ResNet50MultiAttention:
    return ResNet50MultiAttention(embedding_dim=embedding_dim, num_learners=num_learners)
