"""The paper's three backbones, built by name.

    model = build_model("se_resnet50")            # the proposed model, 1 x 512-d
    model = build_model("resnet50", num_learners=4, embedding_dim=512)
    embeddings = model(images)                    # list of M float32 tensors n x (512 / M), unit rows

Names are case-insensitive; `se_resnet` (the reference's spelling) is an alias of `se_resnet50`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from .abe_m import abe_m
from .projection import HEADS, ProjectionHead, build_head, head_options
from .resnet import resnet50
from .se_resnet import se_resnet50

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "se_resnet50": se_resnet50,
    "resnet50": resnet50,
    "ABE_M": abe_m,
}
_ALIASES = {"se_resnet": "se_resnet50"}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def canonical_model_name(name: str) -> str:
    """The registry's spelling of `name` (case-insensitive, aliases resolved); ValueError if unknown."""
    lookup = {key.lower(): key for key in MODEL_NAMES}
    lookup.update({alias.lower(): target for alias, target in _ALIASES.items()})
    try:
        return lookup[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None


def default_model_options(name: str) -> dict[str, Any]:
    """The options `build_model(name, ...)` accepts, with their defaults."""
    parameters = inspect.signature(_BUILDERS[canonical_model_name(name)]).parameters
    return {key: parameter.default for key, parameter in parameters.items()}


def build_model(name: str, **options: Any) -> nn.Module:
    """A freshly initialised model. Options: embedding_dim (total, split over the learners), num_learners,
    and attention (se_resnet50 only). Unknown names or options raise ValueError."""
    canonical = canonical_model_name(name)
    accepted = default_model_options(canonical)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"model {canonical} has no option {', '.join(unknown)}; its options are {', '.join(accepted)}")
    return _BUILDERS[canonical](**options)


def summary(model: nn.Module, crop_size: int = 224, depth: int = 3) -> str:
    """A torchinfo table of `model` for one crop_size x crop_size image (layers, output shapes, parameters).

    torchinfo rather than the reference's torchsummary: torchsummary adds a shared layer's parameters
    once per call (35.3 M for ABE_M, which has 10.5 M); torchinfo counts each parameter once.
    """
    import torchinfo  # imported here: only the summary needs it

    device = next(model.parameters()).device
    # Eval mode: a training-mode pass would move the BatchNorm running statistics.
    stats = torchinfo.summary(model, input_size=(1, 3, crop_size, crop_size), depth=depth, device=device,
                              mode="eval", verbose=0, col_names=("output_size", "num_params"))
    return str(stats)


# The projection head of train.py --freeze-trunk (models.projection) is not among MODEL_NAMES: it is
# trained on an encoder's vectors, never on images by itself.
__all__ = ["HEADS", "MODEL_NAMES", "ProjectionHead", "build_head", "build_model", "canonical_model_name",
           "default_model_options", "head_options", "summary"]
