"""Shared pieces of the project: data set, transforms, split, seeding, devices, safe file writes.

The top-level scripts (train.py, train_traindata.py, multi_test.py, retrieve.py, demo.py) stay thin
and import from here, from `models` and from `losses`.
"""
from __future__ import annotations

import csv
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

REPO_ROOT = Path(__file__).resolve().parent
DATA_ROOT = REPO_ROOT / "KIMIA_data"
_UMASK = os.umask(0)
os.umask(_UMASK)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})


class UserError(Exception):
    """A problem with the user's input: scripts print its message on one line and exit non-zero."""


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a script's main so that a UserError becomes `error: <message>` and exit status 2."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped


# ----------------------------------------------------------------------------- names and files
def natural_key(text: str) -> list:
    """Sort key that orders s2 before s10 (digits compare as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def natural_sorted(items: Iterable[str]) -> list[str]:
    return sorted(items, key=natural_key)


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_classes(root: str | os.PathLike) -> list[str]:
    """Class folders of `root` (hidden ones ignored), in natural order (s0, s1, s2, ..., s10)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; run KIMIA_data/data_process.py first or pass the right --data-dir")
    return natural_sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(temp_path) for a temp file beside `path`, then rename it over `path`.

    A killed process leaves either the old file or the new one, never half of one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temp file and a rename."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike, fields: list[str] | None = None) -> None:
    """Write all rows (columns `fields`, default the first row's keys) to a CSV file, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields or list(rows[0]), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def append_csv_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one row to a CSV file, writing the header when the file is new.

    The whole file is rewritten through a temp file, so a crash never leaves a torn row.
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    fields = list(row)
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = list(reader.fieldnames or []) + [k for k in row if k not in (reader.fieldnames or [])]
    rows.append({k: row.get(k, "") for k in fields})
    write_csv(rows, path, fields)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write a matplotlib figure as PNG through a temp file and a rename, then free it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    pyplot().close(fig)


def command_line() -> str:
    """The command that started this process, for saving beside results."""
    return " ".join([os.path.basename(sys.executable)] + sys.argv)


# ----------------------------------------------------------------------------- data
def train_transform(crop_size: int = 224) -> transforms.Compose:
    """The reference's training transform (no normalisation)."""
    return transforms.Compose([
        transforms.RandomHorizontalFlip(),
        transforms.RandomVerticalFlip(),
        transforms.RandomCrop(crop_size),
        transforms.ToTensor(),
    ])


def eval_transform(crop_size: int = 224) -> transforms.Compose:
    """The reference's validation and test transform (no normalisation)."""
    return transforms.Compose([transforms.CenterCrop(crop_size), transforms.ToTensor()])


def load_rgb(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class KimiaDataset(Dataset):
    """Images of `root/<class>/<image>`, returning (image, label, path).

    Labels index `classes`, which default to the class folders in natural order (the reference
    used file-system order, which differs between machines). Pass the class list saved with a
    checkpoint to evaluate with the labels it was trained with.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        found = list_classes(self.root)
        self.classes = list(classes) if classes is not None else found
        missing = [c for c in found if c not in self.classes]
        if missing:
            raise UserError(f"{self.root}: class folders {missing} are not in the class list {self.classes}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in found:
            folder = self.root / name
            files = natural_sorted(f for f in os.listdir(folder) if is_image_file(f))
            self.samples += [(str(folder / f), self.class_to_idx[name]) for f in files]
        if not self.samples:
            raise UserError(f"{self.root}: no images found in its class folders; run KIMIA_data/data_process.py first")
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, str]:
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label, path


def split_train_val(num_items: int, val_ratio: float = 0.1, seed: int = 1) -> tuple[list[int], list[int]]:
    """A random (not stratified) split of the reference's sizes: shuffle with `seed`, the first
    int(num_items * (1 - val_ratio)) indices train, the rest validate (as torch.utils.data.random_split).

    Not the reference's images: its NumPy draw runs over os.walk order, which depends on the file
    system, so no split can copy it across machines (docs/reproduction.md, "Data").
    """
    if not 0.0 <= val_ratio < 1.0:
        raise UserError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).tolist()
    num_train = int(num_items * (1.0 - val_ratio))
    return perm[:num_train], perm[num_train:]


# ----------------------------------------------------------------------------- runtime
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the --amp choices


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str | None = None) -> torch.device:
    """`name` if given (cpu, cuda, cuda:1, ...), else cuda when there is one, else cpu."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


from metrics import combine_learners, kimia_accuracy, map_at_r, recall_at_k, retrieval_metrics, topk_similar  # noqa: E402,F401
