"""The checkpoint files of the project: train.py's dicts and the reference's bare state_dicts.

    checkpoint = read_torch_file(path)                 # the one reader of .pth files (one-line errors)
    loaded = load_model(path, device)                  # any checkpoint -> a model in eval mode, with its facts
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

import hashlib
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

import losses
import models

from histo_retrieval.errors import UserError, one_line
from histo_retrieval.files import atomic_write
from histo_retrieval.data.preprocessing import Preprocessing

REFERENCE_CROP_SIZE = 224
# File-name prefixes of the reference's bare state_dicts (an optional training-set ratio may precede them).
REFERENCE_PREFIX = re.compile(r"^(?:\d+(?:\.\d+)?_?)?(ABE_M|se_resnet50|se_resnet|resnet50)_")
# Per-learner heads whose count gives M in a bare state_dict, and the final linear layer.
REFERENCE_HEADS = {"resnet50": ("att_branches.", "last_linear.weight"), "ABE_M": ("att_conv_branches.", "linear.weight")}
# How torch.save's files begin: a zip archive (the format since PyTorch 1.6), or the legacy format's
# pickle (protocol 2 or later).
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")
OPTION_SEPARATOR = "-"  # no model or loss name holds one, so a run identity with options is told apart by it
LAST_EPOCH_NAME = "checkpoint.pth"  # a run's last epoch is <identity>_checkpoint.pth; earlier versions wrote this name


class CheckpointError(UserError):
    """A checkpoint file that cannot be evaluated (corrupt, not a checkpoint, wrong architecture)."""


def read_torch_file(path: str | os.PathLike, mmap: bool = False, label: str | None = None) -> Any:
    """The content of a .pth file (tensors on the CPU, weights_only); CheckpointError naming the file
    (as `label`, default its path) when it is missing, not written by torch.save, damaged, or holds
    objects that only an unsafe load could rebuild. `mmap` leaves the tensors on disk (zip-format
    files only)."""
    label = label or os.fspath(path)
    try:
        with open(path, "rb") as file:
            head = file.read(len(TORCH_FILE_MAGIC[0]))
    except FileNotFoundError:
        raise CheckpointError(f"{label}: no such file") from None
    except OSError as err:
        raise CheckpointError(f"{label}: cannot be read ({one_line(err)})") from None
    # Checked first: PyTorch's own error for a foreign file is a bare number or advice to load it unsafely.
    if not head.startswith(TORCH_FILE_MAGIC):
        what = "an empty file" if not head else "neither the zip archive nor the pickle that torch.save writes"
        raise CheckpointError(f"{label}: not a PyTorch checkpoint ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for damaged files
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            raise CheckpointError(f"{label}: holds Python objects besides tensors and plain data, which are not "
                                  "loaded (they could run code); save the model's state_dict or a train.py "
                                  "checkpoint") from None
        raise CheckpointError(f"{label}: a damaged PyTorch checkpoint ({_first_sentence(err)})") from None


def _first_sentence(err: BaseException) -> str:
    """The first sentence of an exception's first line: PyTorch follows it with advice that does not apply."""
    return one_line(err).split(". ")[0].rstrip(".")


def save_torch_file(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temp file and a rename: a killed run never leaves a broken checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def training_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                        scaler: torch.amp.GradScaler | None, epoch: int, args: dict, run: dict) -> dict:
    """train.py's checkpoint dict (docs/reproduction.md, "Training"); loads with torch.load(weights_only=True).

    `run` holds model_name, loss_name, model_options, loss_options, class_names, history (one dict
    per epoch, with val_loss), best_val_loss, train_files and command; `args` the command's settings.
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
    return run_identity(model_name, _reference_options(canonical_model, content), loss_name, None)


def last_epoch_name(identity: str) -> str:
    """The file name of a run's last-epoch checkpoint, `<identity>_checkpoint.pth`: its own, so that the
    runs of one folder (the nine model-loss pairs in model/) never overwrite each other's."""
    return f"{identity}_{LAST_EPOCH_NAME}"


def is_last_epoch_name(name: str) -> bool:
    """Whether a file name is a run's last-epoch checkpoint (see last_epoch_name), or the shared
    `checkpoint.pth` of earlier versions."""
    return name == LAST_EPOCH_NAME or name.endswith(f"_{LAST_EPOCH_NAME}")


def is_training_checkpoint(content: Any) -> bool:
    """Whether a file's content is train.py's checkpoint dict."""
    return isinstance(content, dict) and all(key in content for key in ("model", "model_name", "model_options"))


def is_bare_state_dict(content: Any) -> bool:
    """Whether a file's content is a bare state_dict, as the reference writes its checkpoints."""
    return isinstance(content, dict) and bool(content) and all(isinstance(v, torch.Tensor) for v in content.values())


# ----------------------------------------------------------------------------- models from files
@dataclass
class LoadedModel:
    """A model ready for evaluation, with what its file says about it."""

    model: nn.Module
    path: str
    model_name: str
    model_options: dict
    crop_size: int
    class_names: list[str] | None  # None for a bare reference state_dict
    loss_name: str | None
    source: str  # "checkpoint" (train.py) or "reference state_dict"
    seed: int | None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)  # applied by every Embedder of it

    def weights_sha256(self) -> str:
        """SHA-256 of the model's tensors in key order: the same weights give the same hash
        whatever file or wrapper they were saved in (a slide index records it)."""
        digest = hashlib.sha256()
        for key, value in sorted(self.model.state_dict().items()):
            value = value.detach().cpu().contiguous()
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", crop_size: int | None = None) -> LoadedModel:
    """Build the model stored in `path`, in eval mode on `device`.

    Accepts a checkpoint written by train.py or a bare reference state_dict. Raises CheckpointError
    (one line naming the file) when the file is unreadable, not a checkpoint, or does not fit.
    """
    name = os.path.basename(path)
    content = read_torch_file(path, label=name)
    if not isinstance(content, dict) or not content:
        raise CheckpointError(f"{name}: not a checkpoint (holds a {type(content).__name__}, expected a dict)")
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
        options = _reference_options(model_name, state_dict)
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
    mismatch = _state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{name}: does not fit {model_name} {options}: {mismatch}")
    model.load_state_dict(state_dict, assign=True)
    if crop_size is not None:
        details["crop_size"] = crop_size
    return LoadedModel(model.to(device).eval(), os.fspath(path), model_name, options, **details)


def _reference_options(model_name: str, state_dict: dict[str, torch.Tensor]) -> dict:
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


def _state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> str:
    """'' when `found` has exactly the keys and shapes of `expected`, else a short description."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in found and isinstance(found[k], torch.Tensor) and found[k].shape != v.shape]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    return "; ".join(problems)



