"""A frozen encoder followed by a trained projection head (train.py --freeze-trunk), as an Encoder.

    record = trunk_record(trunk, spec, options)               # what a checkpoint stores of its trunk
    encoder = load_frozen(content, path, device)              # histo_retrieval.encoders.project.load_model

train.py --freeze-trunk writes a checkpoint like any other (history, class names, seed, command, the
head's state_dict as `model`), plus `trunk`: the encoder's spec, weights file, options, weights hash,
input steps and preprocessing. Loading it rebuilds the trunk through the registry, refuses it when its
weights hash is no longer the recorded one, and gives an Encoder whose model is the trunk then the
head, with the trunk's input steps and preprocessing and the head's size.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.encoders.base import Encoder
from histo_retrieval.encoders.weights import CheckpointError, state_dict_mismatch
from histo_retrieval.errors import UserError, one_line

__all__ = ["FROZEN_TAG", "TrunkAndHead", "frozen_model_name", "is_frozen_checkpoint", "load_frozen", "trunk_name",
           "trunk_record"]

FROZEN_TAG = "frozen"  # in the model name of a head's run: <trunk>-frozen-<head>
TRUNK_KEYS = ("spec", "weights", "options", "weights_sha256", "input_steps", "preprocessing")


class TrunkAndHead(nn.Module):
    """The frozen trunk (an Encoder's model), then the head. The trunk stays in eval mode and out of
    autograd whatever mode the whole is put in, so that training the head never moves the trunk's
    weights or its BatchNorm statistics."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head
        self.trunk.requires_grad_(False)
        self.trunk.eval()

    @property
    def num_learners(self) -> int:
        return 1

    def train(self, mode: bool = True) -> TrunkAndHead:
        super().train(mode)
        self.trunk.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            vectors = trunk_vectors(self.trunk(images))
        return self.head(vectors)


def trunk_vectors(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """One row per image of a trunk's output: the paper's models give M learners' unit rows, which
    side by side are their combined vector up to its norm (the head normalises its input)."""
    return torch.cat(list(output), dim=1) if isinstance(output, (list, tuple)) else output


def trunk_name(spec: str) -> str:
    """The trunk's part of a head run's identity: the architecture of `timm:<architecture>`, a preset's
    or the histogram's name, or a checkpoint file's stem."""
    from histo_retrieval.encoders.registry import TIMM_PREFIX, is_named_encoder

    if spec.startswith(TIMM_PREFIX):
        return spec[len(TIMM_PREFIX):]
    return spec.lower() if is_named_encoder(spec) else Path(spec).stem


def frozen_model_name(spec: str, head: str) -> str:
    """`<trunk>-frozen-<head>`, the model name a head's checkpoint records (its run identity's first part)."""
    return f"{trunk_name(spec)}-{FROZEN_TAG}-{head}"


def trunk_record(trunk: Encoder, spec: str, options: dict | None) -> dict[str, Any]:
    """What a head's checkpoint keeps of its trunk, built from `spec` with `options` (the user's
    --encoder-options): enough to build it again and to tell whether it changed."""
    from histo_retrieval.encoders.registry import is_named_encoder

    return {"spec": spec if is_named_encoder(spec) else os.path.abspath(spec),
            "weights": trunk.path if trunk.kind in ("timm", "preset") else None, "options": dict(options) if options else None,
            "weights_sha256": trunk.weights_sha256(), "input_steps": trunk.input_steps.to_dict(),
            "preprocessing": trunk.preprocessing.to_dict(), "model_name": trunk.model_name, "kind": trunk.kind,
            "dim": trunk.dim, "mpp": trunk.mpp, "pooling": trunk.pooling}


def is_frozen_checkpoint(content: Any) -> bool:
    """Whether a file's content is the checkpoint of a head trained on a frozen trunk."""
    return (isinstance(content, dict) and isinstance(content.get("trunk"), dict)
            and all(key in content for key in ("model", "model_name", "model_options")))


def load_frozen(content: dict, path: str | os.PathLike, device: torch.device | str = "cpu",
                crop_size: int | None = None) -> Encoder:
    """The Encoder of a head's checkpoint: its trunk (through the registry) then its head, in eval mode.
    CheckpointError (one line naming the file) when the trunk cannot be built, its weights hash is not
    the recorded one, the head does not fit, or `crop_size` asks for another input size."""
    from histo_retrieval.encoders.registry import load_encoder

    name = os.path.basename(path)
    record = content["trunk"]
    missing = [key for key in TRUNK_KEYS if key not in record]
    if missing:
        raise CheckpointError(f"{name}: its trunk record lacks {', '.join(missing)}; retrain the head")
    steps = InputSteps.from_dict(record["input_steps"])
    if crop_size is not None and crop_size != steps.crop_size:
        raise CheckpointError(f"{name}: its input steps are its trunk's ({steps.describe()}); leave --crop-size "
                              f"{crop_size} out")
    try:
        trunk = load_encoder(record["spec"], device, record["weights"], record["options"])
    except UserError as err:
        raise CheckpointError(f"{name}: its trunk cannot be built ({one_line(err)})") from None
    found = trunk.weights_sha256()
    if found != record["weights_sha256"]:
        weights = f" from {record['weights']}" if record["weights"] else ""
        raise CheckpointError(f"{name}: its trunk {record['spec']}{weights} no longer has the weights the head was "
                              f"trained on (sha256 {found[:12]}..., the checkpoint's {record['weights_sha256'][:12]}...); "
                              "put the trunk's weights back, or train the head again")
    options = dict(content["model_options"])
    try:
        head = models.ProjectionHead(int(options["in_dim"]), int(options["embedding_dim"]), options.get("hidden"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{name}: cannot build its head from {options} ({one_line(err)})") from None
    state_dict = content["model"]
    mismatch = state_dict_mismatch(head.state_dict(), state_dict) if isinstance(state_dict, dict) else "not a state_dict"
    if mismatch:
        raise CheckpointError(f"{name}: its head does not fit {options}: {mismatch}")
    head.load_state_dict(state_dict)
    return Encoder(TrunkAndHead(trunk.model, head).to(device).eval(), os.fspath(path), "checkpoint",
                   str(content["model_name"]), options, steps, head.out_dim, os.fspath(path),
                   Preprocessing.from_dict(record["preprocessing"]), mpp=record.get("mpp"),
                   pooling=f"{options.get('head', 'linear')} head on {record['spec']}",
                   class_names=list(content.get("class_names") or []) or None, loss_name=content.get("loss_name"),
                   source="checkpoint", seed=content.get("seed"))
