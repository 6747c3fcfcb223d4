"""Which checkpoint of a training run its validation loss selects.

    labels = select_checkpoints(paths)   # {path: "validation" | "last_epoch" | ""}
    loss = validation_loss(path)         # float, or None where neither the file nor its name says

train.py saves `<model>_<loss>_<val_loss:.4f>.pth` whenever the validation loss improves and
`<identity>_checkpoint.pth` (the last epoch) every epoch; the reference saves only the former, as bare
state_dicts. Scoring every file on the test set and keeping the best would select on the test
set, so a run's result is the file its validation loss selects: the best-validation file with
the lowest validation loss, which is the newest best (see docs/reproduction.md).

A run is the files of one folder that share a run identity (histo_retrieval.evaluation.checkpoint.run_identity: the
model and loss with their non-default options, e.g. `se_resnet50_MSLoss` for the paper's run and
`se_resnet50-noattention_MSLoss` for its ablation), read from the settings a train.py checkpoint
recorded, never from its name; for a bare state_dict from its name and keys, and from the name alone
(everything before `_<val_loss>.pth`) when that is not `<model>_<loss>`, so a ratio prefix such as
the reference's `0.2se_resnet_MsLoss_0.1234.pth` makes its own run.
Labels: "validation" for each run's selected file, "last_epoch" for the last-epoch files
(`<identity>_checkpoint.pth`, and `checkpoint.pth` from earlier versions), "" for the rest (older bests, and files whose
validation loss cannot be read: those are no candidates).
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable


from histo_retrieval.evaluation.checkpoint import content_identity, is_last_epoch_name
from histo_retrieval.encoders.weights import CheckpointError, read_torch_file
from histo_retrieval.encoders.project import is_bare_state_dict

VALIDATION = "validation"
LAST_EPOCH = "last_epoch"
NOT_SELECTED = ""
# The label of a result of an encoder named on the command line (multi_test.py --encoder): no training
# run chose it, so no selection applies and it is reported as a row of its own.
ENCODER = "encoder"
# `<run>_<val_loss>.pth`, as train.py and the reference name their best-validation files ({:.4f}).
LOSS_IN_NAME = re.compile(r"^(?P<run>.+)_(?P<loss>-?\d+\.\d+)\.pth$")

PathLike = str | os.PathLike


@dataclass(frozen=True)
class CheckpointFile:
    """What a checkpoint file says about its place in a training run."""

    path: PathLike
    run: str  # the run identity, e.g. "se_resnet50_MSLoss"; "" when unknown
    val_loss: float | None  # that epoch's validation loss; None when unknown
    epoch: int | None  # train.py's checkpoints only
    candidate: bool  # for the run's selection: a known validation loss, and not a last-epoch file


def _read(path: PathLike) -> Any:
    """The file's torch content, or None when it cannot be read. mmap leaves the tensors on disk:
    only the small pickle is read, which keeps a folder of 100 MB checkpoints cheap to describe."""
    for mmap in (True, False):  # mmap needs the zip format; older torch.save files lack it
        try:
            return read_torch_file(path, mmap=mmap)
        except CheckpointError:
            continue
    return None


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def describe_checkpoint(path: PathLike) -> CheckpointFile:
    """Run, validation loss and epoch of one file: from the dict of a train.py checkpoint, from the
    name (`<run>_<val_loss>.pth`) and keys of a bare state_dict."""
    name = os.path.basename(path)
    content = _read(path)
    match = LOSS_IN_NAME.match(name)
    last_epoch = is_last_epoch_name(name)
    if isinstance(content, dict) and "model" in content and "model_name" in content:  # needs no model_options
        val_loss = _finite(content.get("val_loss"))
        if val_loss is None and match:  # a checkpoint written without the key: trust its name
            val_loss = float(match["loss"])
        epoch = content.get("epoch")
        return CheckpointFile(path, content_identity(name, content), val_loss, epoch if isinstance(epoch, int) else None,
                              val_loss is not None and not last_epoch)
    if is_bare_state_dict(content) and match:
        return CheckpointFile(path, content_identity(name, content) or match["run"], float(match["loss"]), None,
                              not last_epoch)
    return CheckpointFile(path, match["run"] if match else "", None, None, False)


def validation_loss(path: PathLike) -> float | None:
    """The validation loss a checkpoint was saved with (the dict's, else the file name's); None when
    neither says, or the file cannot be read."""
    return describe_checkpoint(path).val_loss


def select(files: Iterable[CheckpointFile]) -> dict[PathLike, str]:
    """Label described files: per run (folder and run identity), the candidate with the lowest
    validation loss gets "validation" (ties: the later epoch); last-epoch files get "last_epoch"."""
    files = list(files)
    labels = {f.path: LAST_EPOCH if is_last_epoch_name(os.path.basename(f.path)) else NOT_SELECTED for f in files}
    runs: dict[tuple[str, str], list[CheckpointFile]] = defaultdict(list)
    for f in files:
        if f.candidate:
            runs[(os.path.dirname(os.path.abspath(f.path)), f.run)].append(f)
    for candidates in runs.values():
        # min keeps the first of equal keys: sort by name so that the choice never depends on the order given.
        candidates.sort(key=lambda f: os.path.basename(f.path))
        chosen = min(candidates, key=lambda f: (f.val_loss, -(f.epoch if f.epoch is not None else -1)))
        labels[chosen.path] = VALIDATION
    return labels


def select_checkpoints(paths: Iterable[PathLike]) -> dict[PathLike, str]:
    """{path: "validation" | "last_epoch" | ""} for checkpoint files (keys as given); see the module doc."""
    return select(describe_checkpoint(path) for path in paths)

