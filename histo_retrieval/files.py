"""Names, listings and safe writes of files (torch-free).

Natural order (s2 before s10) is the order of every class list and image list of the project. Every
result file is written to a temp file beside it and renamed, so a killed process leaves the old file
or the new one, never half of one.
"""
from __future__ import annotations

import csv
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from histo_retrieval.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
_UMASK = os.umask(0)
os.umask(_UMASK)


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


def folder_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder` (one class folder), in natural order."""
    folder = Path(folder)
    return [folder / name for name in natural_sorted(os.listdir(folder))
            if is_image_file(name) and (folder / name).is_file()]


def list_images(root: str | os.PathLike) -> list[tuple[str, str | None]]:
    """(path, class) of every image under `root`, in natural order: the class is the first-level
    subfolder, None for an image directly in `root`. Hidden files and folders are skipped."""
    root = Path(root)
    found: list[tuple[str, str | None]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = natural_sorted(d for d in dirs if not d.startswith("."))
        relative = Path(folder).relative_to(root).parts
        found += [(os.path.join(folder, f), relative[0] if relative else None)
                  for f in natural_sorted(files) if is_image_file(f)]
    return found


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(temp_path) for a temp file beside `path`, then rename it over `path`."""
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike, fields: list[str] | None = None) -> None:
    """Write all rows (columns `fields`, default the first row's keys) to a CSV file, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields or list(rows[0]), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def read_csv(path: str | os.PathLike) -> tuple[list[dict[str, str]], list[str]]:
    """The rows and the columns of a CSV file."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])


def append_csv_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one row to a CSV file (new columns join the header), rewriting it atomically."""
    rows, fields = read_csv(path) if Path(path).exists() else ([], [])
    fields += [k for k in row if k not in fields]
    rows.append({k: row.get(k, "") for k in fields})
    write_csv(rows, path, fields)


def command_argv() -> list[str]:
    """The command that started this process, word by word: `python3 -m NAME ...` for a module run with -m
    (its file in sys.argv[0] would not run the same way), else `python3 SCRIPT ...`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name.removesuffix(".__main__")] if spec is not None else sys.argv[:1]
    return [os.path.basename(sys.executable), *program, *sys.argv[1:]]


def command_line() -> str:
    """The command that started this process, for saving beside results."""
    return " ".join(command_argv())
