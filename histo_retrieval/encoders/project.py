"""Encoders from the checkpoints of this project: train.py's dicts and the reference's bare state_dicts.

    encoder = load_model("model/se_resnet50_MSLoss_0.1234.pth", device)   # a model in eval mode, with its facts

A train.py checkpoint names its architecture, options, crop size, class list and preprocessing; a bare
reference state_dict is named after its architecture (`se_resnet_MsLoss_0.1234.pth`), and its
options are read from its keys and shapes (crop 224, no normalisation).
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch

import models

from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.encoders.base import Encoder
from histo_retrieval.encoders.frozen import is_frozen_checkpoint, load_frozen
from histo_retrieval.encoders.weights import CheckpointError, read_torch_file, state_dict_mismatch
from histo_retrieval.errors import one_line

__all__ = ["REFERENCE_CROP_SIZE", "is_bare_state_dict", "is_training_checkpoint", "load_model", "reference_options"]

REFERENCE_CROP_SIZE = 224
# File-name prefixes of the reference's bare state_dicts (an optional training-set ratio may precede them).
REFERENCE_PREFIX = re.compile(r"^(?:\d+(?:\.\d+)?_?)?(ABE_M|se_resnet50|se_resnet|resnet50)_")
# Per-learner heads whose count gives M in a bare state_dict, and the final linear layer.
REFERENCE_HEADS = {"resnet50": ("att_branches.", "last_linear.weight"), "ABE_M": ("att_conv_branches.", "linear.weight")}

def is_training_checkpoint(content: Any) -> bool:
    """Whether a file's content is train.py's checkpoint dict."""
    return isinstance(content, dict) and all(key in content for key in ("model", "model_name", "model_options"))


def is_bare_state_dict(content: Any) -> bool:
    """Whether a file's content is a bare state_dict, as the reference writes its checkpoints."""
    return isinstance(content, dict) and bool(content) and all(isinstance(v, torch.Tensor) for v in content.values())




def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", crop_size: int | None = None) -> Encoder:
    """Build the model stored in `path`, in eval mode on `device`.

    Accepts a checkpoint written by train.py (with --freeze-trunk: its trunk, rebuilt through the
    registry, then its head; histo_retrieval.encoders.frozen) or a bare reference state_dict. Raises CheckpointError
    (one line naming the file) when the file is unreadable, not a checkpoint, or does not fit.
    """
    name = os.path.basename(path)
    content = read_torch_file(path, label=name)
    if not isinstance(content, dict) or not content:
        raise CheckpointError(f"{name}: not a checkpoint (holds a {type(content).__name__}, expected a dict)")
    if is_frozen_checkpoint(content):  # a head trained on a frozen encoder (train.py --freeze-trunk)
        return load_frozen(content, path, device, crop_size)
    if is_training_checkpoint(content):
        try:
            model_name = models.canonical_model_name(content["model_name"])
        except ValueError as err:
            raise CheckpointError(f"{name}: {one_line(err)}") from None
        state_dict, options = content["model"], dict(content["model_options"])
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{name}: its 'model' entry is a {type(state_dict).__name__}, not a state_dict")
        details = {"crop_size": int(content.get("crop_size", REFERENCE_CROP_SIZE)),
                   "class_names": list(content.get("class_names") or []) or None,
                   "loss_name": content.get("loss_name"), "source": "checkpoint", "seed": content.get("seed"),
                   "preprocessing": Preprocessing.from_dict(content.get("preprocessing"))}
    elif is_bare_state_dict(content):
        match = REFERENCE_PREFIX.match(name)
        if match is None:
            raise CheckpointError(f"{name}: a bare state_dict whose name does not start with ABE_M_, se_resnet_, "
                                  "se_resnet50_ or resnet50_; rename it after its architecture")
        state_dict, model_name = content, models.canonical_model_name(match.group(1))
        options = reference_options(model_name, state_dict)
        details = {"crop_size": REFERENCE_CROP_SIZE, "class_names": None, "loss_name": None,
                   "source": "reference state_dict", "seed": None}
    else:
        raise CheckpointError(f"{name}: not a checkpoint (neither a dict with 'model', 'model_name' and "
                              "'model_options' written by train.py, nor a bare state_dict)")
    try:
        with torch.device("meta"):  # skips the random initialisation that the checkpoint overwrites
            model = models.build_model(model_name, **options)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{name}: cannot build {model_name} with {options} ({one_line(err)})") from None
    mismatch = state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{name}: does not fit {model_name} {options}: {mismatch}")
    model.load_state_dict(state_dict, assign=True)
    if crop_size is not None:
        details["crop_size"] = crop_size
    crop = details.pop("crop_size")
    return Encoder(model.to(device).eval(), os.fspath(path), "checkpoint", model_name, options, InputSteps(crop),
                   int(options["embedding_dim"]), os.fspath(path), **details)


def reference_options(model_name: str, state_dict: dict[str, torch.Tensor]) -> dict:
    """build_model options of a bare reference state_dict, read from its keys and shapes."""
    if model_name == "se_resnet50":
        linear = state_dict.get("last_linear.weight")
        return {"embedding_dim": int(linear.shape[0]) if linear is not None else 512, "num_learners": 1,
                "attention": any(k.startswith("att_layer.") for k in state_dict)}
    head_prefix, linear_key = REFERENCE_HEADS[model_name]
    heads = {k[len(head_prefix):].split(".")[0] for k in state_dict if k.startswith(head_prefix)}
    num_learners = len(heads) or 4
    linear = state_dict.get(linear_key)
    per_learner = int(linear.shape[0]) if linear is not None else 128
    return {"embedding_dim": per_learner * num_learners, "num_learners": num_learners}
