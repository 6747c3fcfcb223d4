"""The checkpoint files of the project: train.py's dicts and the reference's bare state_dicts.

    encoder = load_model(path, device)                 # histo_retrieval.encoders.project: any checkpoint
    torch.save(training_checkpoint(...), path)         # the one writer of train.py's dict
    identity = run_identity("se_resnet50", {"attention": False}, "MSLoss", {})   # se_resnet50-noattention_MSLoss

train.py's checkpoint is a dict holding the state_dict (`model`, in the reference's layout) and
everything needed to resume or evaluate it; the reference writes bare state_dicts named after their
architecture (`se_resnet_MsLoss_0.1234.pth`), whose options are read from their keys and shapes.

A training run's identity names its files: `<model>_<loss>` as the reference names them, with a
`-<option><value>` tag for each model or loss option that differs from its default, so that the
paper's attention ablation (`se_resnet50-noattention_MSLoss`) never shares a file or a selection with
the main run (`se_resnet50_MSLoss`).
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import torch
from torch import nn

import losses
import models

from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.encoders.project import is_bare_state_dict, reference_options
from histo_retrieval.files import atomic_write

OPTION_SEPARATOR = "-"  # no model or loss name holds one, so a run identity with options is told apart by it
LAST_EPOCH_NAME = "checkpoint.pth"  # a run's last epoch is <identity>_checkpoint.pth; earlier versions wrote this name


def save_torch_file(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temp file and a rename: a killed run never leaves a broken checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def training_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                        scaler: torch.amp.GradScaler | None, epoch: int, args: dict, run: dict) -> dict:
    """train.py's checkpoint dict (docs/reproduction.md, "Training"); loads with torch.load(weights_only=True).

    `run` holds model_name, loss_name, model_options, loss_options, class_names, history (one dict
    per epoch, with val_loss), best_val_loss, train_files and command (and with --freeze-trunk the
    trunk's record); `args` the command's settings.
    """
    return {
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "args": {key: os.fspath(value) if isinstance(value, os.PathLike) else value for key, value in args.items()},
        **{key: run[key] for key in ("model_name", "loss_name", "model_options", "loss_options", "class_names")},
        # Beyond the reference: how inputs are normalised, and where the weights started from.
        "preprocessing": run.get("preprocessing") or Preprocessing().to_dict(),
        "pretrained": run.get("pretrained"),
        "crop_size": args["crop_size"],
        "history": run["history"],
        "val_loss": run["history"][-1]["val_loss"],
        "best_val_loss": run["best_val_loss"],
        "seed": args["seed"],
        "train_files": run["train_files"],
        "command": run["command"],
        # train.py --freeze-trunk: the encoder under the head (histo_retrieval.encoders.frozen.trunk_record).
        **({"trunk": run["trunk"]} if run.get("trunk") else {}),
    }


# ----------------------------------------------------------------------------- run identity
def run_identity(model_name: str, model_options: Mapping[str, Any] | None, loss_name: str,
                 loss_options: Mapping[str, Any] | None) -> str:
    """The name shared by a training run's files: `<model>_<loss>`, each followed by a
    `-<option><value>` tag (`-noattention`, `-embeddingdim256`, `-selfpairexclude`) for every option that
    differs from the model's or loss's default. Options a checkpoint does not record count as their
    defaults, so a run with default options keeps the reference's name. The names are kept as given
    (train.py records canonical ones; the reference's `se_resnet_MsLoss` stays its own run)."""
    return (f"{_tagged(model_name, model_options, models.canonical_model_name, models.default_model_options)}_"
            f"{_tagged(loss_name, loss_options, losses.canonical_loss_name, losses.default_loss_options)}")


def _tagged(name: str, options: Mapping[str, Any] | None, canonical: Callable[[str], str],
            defaults: Callable[[str], dict[str, Any]]) -> str:
    try:
        default = defaults(canonical(name))
    except ValueError:
        return name  # an unknown name: no defaults to tell options by
    options = options if isinstance(options, Mapping) else {}
    tags = [_option_tag(key, options[key]) for key, value in default.items() if key in options and options[key] != value]
    return OPTION_SEPARATOR.join([name, *tags])


def _option_tag(key: str, value: Any) -> str:
    word = key.replace("_", "")
    if isinstance(value, bool):
        return word if value else f"no{word}"
    return f"{word}{format(value, '.12g') if isinstance(value, float) else value}"


def content_identity(name: str, content: Any) -> str | None:
    """The run identity of a .pth file's content: the settings a train.py checkpoint recorded, or for
    a bare reference state_dict named `<model>_<loss>_...` its names with the options its keys show;
    None when neither says (another name, another content)."""
    if isinstance(content, dict) and "model_name" in content:
        return run_identity(str(content["model_name"]), content.get("model_options"),
                            str(content.get("loss_name") or ""), content.get("loss_options"))
    if not is_bare_state_dict(content):
        return None
    model_name, _, loss_name = re.sub(r"_[^_]*$", "", name).rpartition("_")
    try:
        canonical_model, _ = models.canonical_model_name(model_name), losses.canonical_loss_name(loss_name)
    except ValueError:
        return None
    return run_identity(model_name, reference_options(canonical_model, content), loss_name, None)


def last_epoch_name(identity: str) -> str:
    """The file name of a run's last-epoch checkpoint, `<identity>_checkpoint.pth`: its own, so that the
    runs of one folder (the nine model-loss pairs in model/) never overwrite each other's."""
    return f"{identity}_{LAST_EPOCH_NAME}"


def is_last_epoch_name(name: str) -> bool:
    """Whether a file name is a run's last-epoch checkpoint (see last_epoch_name), or the shared
    `checkpoint.pth` of earlier versions."""
    return name == LAST_EPOCH_NAME or name.endswith(f"_{LAST_EPOCH_NAME}")


