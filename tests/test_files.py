"""histo_retrieval.files: natural order, the class and image listings, atomic writes, CSV rows."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from histo_retrieval import errors, files


def test_natural_order() -> None:
    names = ["s10", "s2", "s1", "s0", "S3", "s23", "s11"]
    assert files.natural_sorted(names) == ["s0", "s1", "s2", "S3", "s10", "s11", "s23"]
    assert files.natural_sorted(["img_10.png", "img_9.png"]) == ["img_9.png", "img_10.png"]


def test_list_classes_is_natural_and_skips_hidden_and_files(tmp_path: Path) -> None:
    for name in ("s10", "s2", "s0", ".cache"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert files.list_classes(tmp_path) == ["s0", "s2", "s10"]
    with pytest.raises(errors.UserError, match="no such folder.*data_process.py"):
        files.list_classes(tmp_path / "missing")


@pytest.mark.parametrize("name, expected", [
    ("a.jpg", True), ("a.JPEG", True), ("a.png", True), ("a.Tif", True), ("a.tiff", True), ("a.BMP", True),
    (".a.png", False), ("a.txt", False), ("a.png.part", False), ("png", False)])
def test_is_image_file(name: str, expected: bool) -> None:
    assert files.is_image_file(name) is expected


def test_list_images_gives_paths_and_first_level_classes_in_natural_order(tmp_path: Path) -> None:
    for relative in ("s10/a.png", "s2/b/c.jpg", "s2/a10.png", "s2/a9.png", "loose.tif", ".hidden/x.png", "s2/notes.txt"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    found = [(os.path.relpath(path, tmp_path), label) for path, label in files.list_images(tmp_path)]
    assert found == [("loose.tif", None), ("s2/a9.png", "s2"), ("s2/a10.png", "s2"), ("s2/b/c.jpg", "s2"),
                     ("s10/a.png", "s10")]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    files.atomic_write_text(target, "old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, fail)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.txt"]  # no temp file left behind


def test_append_csv_row(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    files.append_csv_row(path, {"epoch": 0, "loss": 1.5})
    files.append_csv_row(path, {"epoch": 1, "loss": 1.25, "lr": 0.001})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"epoch": "0", "loss": "1.5", "lr": ""}, {"epoch": "1", "loss": "1.25", "lr": "0.001"}]
