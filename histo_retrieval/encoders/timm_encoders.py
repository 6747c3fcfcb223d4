"""Encoders built by timm: any architecture timm knows (`timm:<architecture>`), with weights from a
file, and the poolings the pathology foundation models document.

    model = create_timm_model("vit_small_patch16_224", {"dynamic_img_size": True})   # num_classes=0
    load_weights(model, "vit_s.safetensors")          # keys and shapes checked, one-line errors
    steps, preprocessing = timm_input_steps(model)    # timm's own eval transform, split in two

The model is built with `num_classes=0`, so its output is timm's pooled vector; `ClassAndPatchMean`
makes Virchow's vector (the class token beside the mean of the patch tokens) from the same model.
"""
from __future__ import annotations

import difflib
import math
import os
from typing import Any

import torch
from torch import nn

from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.encoders.weights import CheckpointError, read_weights, state_dict_mismatch
from histo_retrieval.errors import UserError, one_line

__all__ = ["POOLINGS", "ClassAndPatchMean", "check_architecture", "create_timm_model", "load_weights", "pool", "timm_input_steps",
           "vector_size"]

# How a vector is made of a timm model: its own pooled output (num_classes=0, global_pool as built), or
# the class token concatenated with the mean of the patch tokens (register tokens left out).
POOLINGS = ("pooled", "class+patch-mean")
# Layer classes named in JSON options (--encoder-options, the presets): timm takes them as classes.
LAYER_OPTIONS = ("mlp_layer", "norm_layer", "embed_layer", "block_fn")


class ClassAndPatchMean(nn.Module):
    """A ViT's class token beside the mean of its patch tokens (after the final norm): Virchow's vector."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(images)
        return torch.cat([tokens[:, 0], tokens[:, self.vit.num_prefix_tokens:].mean(dim=1)], dim=1)


def create_timm_model(architecture: str, options: dict[str, Any] | None = None) -> nn.Module:
    """timm's `architecture` with random weights and no classifier, built with `options` (create_model
    keyword arguments; layer classes may be named, e.g. {"mlp_layer": "SwiGLUPacked"}). Nothing is
    downloaded: pretrained weights come from a file (load_weights)."""
    import timm

    check_architecture(architecture)
    options = _resolve_layers(dict(options or {}))
    try:
        return timm.create_model(architecture, pretrained=False, num_classes=0, **options).eval()
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise UserError(f"timm:{architecture}: cannot be built with --encoder-options {options} "
                        f"({one_line(err)})") from None


def check_architecture(architecture: str) -> None:
    """UserError naming the close matches when timm has no `architecture` (builds nothing)."""
    import timm

    if not timm.is_model(architecture.split(".")[0]):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `python3 -c \"import timm; " \
            "print(timm.list_models('*vit*'))\"` lists them"
        raise UserError(f"timm:{architecture}: timm has no such architecture{hint}")


def _resolve_layers(options: dict[str, Any]) -> dict[str, Any]:
    import timm.layers

    for key in LAYER_OPTIONS:
        if isinstance(options.get(key), str):
            layer = getattr(timm.layers, options[key], None) or getattr(nn, options[key], None)
            if layer is None:
                raise UserError(f"--encoder-options: {key} {options[key]!r} is neither a timm.layers nor a "
                                "torch.nn class")
            options[key] = layer
    return options


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the state_dict in `path` into `model`; CheckpointError naming the file and its first
    mismatch when its keys or shapes do not fit."""
    state_dict = read_weights(path)
    mismatch = state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{os.fspath(path)}: does not fit {type(model).__name__} as built: {mismatch}")
    model.load_state_dict(state_dict)


def pool(model: nn.Module, pooling: str) -> nn.Module:
    """The module whose output is the encoder's vector."""
    if pooling not in POOLINGS:
        raise UserError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    if pooling == "pooled":
        return model
    if not hasattr(model, "num_prefix_tokens"):
        raise UserError(f"pooling {pooling}: {type(model).__name__} has no class and patch tokens (a ViT has)")
    return ClassAndPatchMean(model).eval()


def vector_size(model: nn.Module, pooling: str) -> int:
    """The vector's length, from the model's own attributes (no forward pass)."""
    width = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return 2 * width if pooling == "class+patch-mean" else width


def timm_input_steps(model: nn.Module) -> tuple[InputSteps, Preprocessing]:
    """timm's eval transform for `model` (resolve_data_config), as the uint8 steps and the
    normalisation: resize the shorter side to floor(size / crop_pct), centre crop, mean and std."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    height, width = config["input_size"][1:]
    if height != width or config.get("crop_mode", "center") != "center":
        raise UserError(f"{type(model).__name__}: input {height}x{width}, crop mode {config.get('crop_mode')}: only "
                        "square inputs with a centre crop are supported")
    resize = math.floor(width / config["crop_pct"]) if config.get("crop_pct") else None
    return (InputSteps(width, resize, config["interpolation"] or "bilinear"),
            Preprocessing(tuple(map(float, config["mean"])), tuple(map(float, config["std"]))))
