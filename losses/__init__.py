"""Metric losses of the reproduction: Contrastive, ABE and Multi-Similarity (docs/reproduction.md, losses).

    loss = build_loss("MSLoss")                     # the reference code's hyper-parameters and self-pair rule
    loss = build_loss("msloss", beta=50, eps=0.1)   # the MS paper's own
    loss = build_loss("ContrastiveLoss", self_pair="exclude")   # the self pair dropped by index
    value = loss(model(images), labels)             # a list of M n x d tensors, or one n x d tensor
    loss.stats                                      # {"anchors": ..., "pairs": ...}, 0-dim tensors
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from .abe import ABELoss
from .base import SELF_PAIR_RULES, MetricLoss
from .contrastive import ContrastiveLoss
from .ms import MSLoss

_BUILDERS: dict[str, Callable[..., MetricLoss]] = {
    "ContrastiveLoss": ContrastiveLoss,
    "ABELoss": ABELoss,
    "MSLoss": MSLoss,
}
LOSS_NAMES: tuple[str, ...] = tuple(_BUILDERS)
# Case-insensitive lookup also accepts the reference code's spelling `MsLoss`.
_BY_LOWER = {name.lower(): name for name in LOSS_NAMES}


def canonical_loss_name(name: str) -> str:
    """The canonical spelling of a loss name (case-insensitive, aliases resolved); ValueError if unknown."""
    try:
        return _BY_LOWER[name.lower()]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}") from None


def default_loss_options(name: str) -> dict[str, Any]:
    """The options `build_loss(name, ...)` accepts, with their defaults (the reference code's)."""
    parameters = inspect.signature(_BUILDERS[canonical_loss_name(name)]).parameters
    return {key: parameter.default for key, parameter in parameters.items()}


def build_loss(name: str, **options: Any) -> MetricLoss:
    """Build a loss by name with keyword hyper-parameters (defaults: the reference code's), such as
    `self_pair` ("reference" or "exclude", see `losses.base`)."""
    return _BUILDERS[canonical_loss_name(name)](**options)


__all__ = ["ABELoss", "ContrastiveLoss", "LOSS_NAMES", "MSLoss", "MetricLoss", "SELF_PAIR_RULES", "build_loss",
           "canonical_loss_name", "default_loss_options"]
