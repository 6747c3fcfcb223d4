"""core/: natural class order, listings, the seeded split, KimiaDataset, transforms, atomic writes, errors,
the runtime checks and the unreadable-image policy."""
from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histo_retrieval import errors, files, images, runtime
from histo_retrieval.data import datasets as data
from histo_retrieval.evaluation import checkpoint


def make_split(root: Path, counts: dict[str, int], size: int = 40) -> None:
    for class_index, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for k in range(count):
            value = 10 * class_index + k
            Image.new("RGB", (size, size), (value, value, value)).save(root / name / f"{name}_{k}.png")


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


def test_split_is_seeded_deterministic_and_matches_random_split() -> None:
    train, val = data.split_train_val(250)
    assert (train, val) == data.split_train_val(250)
    assert len(train) == 225 and len(val) == 25  # int(250 * 0.9)
    assert sorted(train + val) == list(range(250))
    reference = torch.utils.data.random_split(range(250), [225, 25], generator=torch.Generator().manual_seed(1))
    assert train == list(reference[0].indices) and val == list(reference[1].indices)
    assert data.split_train_val(250, seed=2) != (train, val)
    assert data.split_train_val(7, val_ratio=0.0)[1] == []
    with pytest.raises(errors.UserError, match="--val-ratio"):
        data.split_train_val(10, val_ratio=1.0)


def test_dataset_labels_follow_natural_order(tmp_path: Path) -> None:
    make_split(tmp_path, {"s10": 2, "s2": 1, "s0": 3})
    (tmp_path / "s0" / "readme.txt").write_text("ignored")
    dataset = data.KimiaDataset(tmp_path, transform=data.eval_transform(32))
    assert dataset.classes == ["s0", "s2", "s10"]
    assert len(dataset) == 6 and dataset.targets == [0, 0, 0, 1, 2, 2]
    image, label, path = dataset[3]
    assert (label, Path(path).name) == (1, "s2_0.png")
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.max() <= 1.0 and float(image[0, 0, 0]) == pytest.approx(10 / 255)


def test_dataset_with_a_saved_class_list(tmp_path: Path) -> None:
    make_split(tmp_path, {"s1": 1, "s5": 1})
    dataset = data.KimiaDataset(tmp_path, classes=["s0", "s1", "s5"])
    assert dataset.targets == [1, 2]
    assert isinstance(dataset[0][0], Image.Image)
    with pytest.raises(errors.UserError, match=r"class folders \['s5'\] are not in the class list"):
        data.KimiaDataset(tmp_path, classes=["s1"])


def test_empty_dataset_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "s0").mkdir()
    with pytest.raises(errors.UserError, match="no images found"):
        data.KimiaDataset(tmp_path)


def test_transforms_follow_the_reference() -> None:
    image = Image.fromarray(np.arange(300 * 300 * 3, dtype=np.uint8).reshape(300, 300, 3))
    evaluated = data.eval_transform()(image)
    assert evaluated.shape == (3, 224, 224)
    assert torch.equal(evaluated, data.eval_transform()(image))  # centre crop: no randomness
    expected = torch.from_numpy(np.asarray(image)[38:262, 38:262].transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.allclose(evaluated, expected)
    torch.manual_seed(0)
    assert data.train_transform()(image).shape == (3, 224, 224)


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


def test_atomic_save_and_nested_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "ckpt.pth"
    checkpoint.save_torch_file({"epoch": 3, "w": torch.ones(2)}, target)
    loaded = torch.load(target, map_location="cpu", weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.ones(2))


def test_append_csv_row(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    files.append_csv_row(path, {"epoch": 0, "loss": 1.5})
    files.append_csv_row(path, {"epoch": 1, "loss": 1.25, "lr": 0.001})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"epoch": "0", "loss": "1.5", "lr": ""}, {"epoch": "1", "loss": "1.25", "lr": "0.001"}]


def test_run_script_turns_a_user_error_into_one_line_and_status_2(capsys) -> None:
    def main(args) -> None:
        raise errors.UserError("--data-dir x: no such folder")

    assert errors.run_script(main, None) == 2
    assert capsys.readouterr().err == "error: --data-dir x: no such folder\n"
    assert errors.run_script(lambda args: 1, None) == 1 and errors.run_script(lambda args: {"a": 1}, None) == 0


def test_one_line_keeps_the_first_line_within_the_limit() -> None:
    assert errors.one_line(RuntimeError("Error(s) in loading:\n\tMissing  key")) == "Error(s) in loading:"
    assert errors.one_line(ValueError("")) == "ValueError"
    assert errors.one_line(OSError("x" * 300)) == "x" * 197 + "..."


def test_seed_and_device() -> None:
    runtime.seed_everything(5)
    first = (torch.rand(3), np.random.rand(), random.random())
    runtime.seed_everything(5)
    second = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
    assert runtime.select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.select_device().type == expected
    if not torch.cuda.is_available():
        with pytest.raises(errors.UserError, match="CUDA is not available"):
            runtime.select_device("cuda")


def test_list_images_gives_paths_and_first_level_classes_in_natural_order(tmp_path: Path) -> None:
    for relative in ("s10/a.png", "s2/b/c.jpg", "s2/a10.png", "s2/a9.png", "loose.tif", ".hidden/x.png", "s2/notes.txt"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    found = [(os.path.relpath(path, tmp_path), label) for path, label in files.list_images(tmp_path)]
    assert found == [("loose.tif", None), ("s2/a9.png", "s2"), ("s2/a10.png", "s2"), ("s2/b/c.jpg", "s2"),
                     ("s10/a.png", "s10")]


def test_unreadable_covers_what_pillow_raises_for_broken_files(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    foreign = tmp_path / "foreign.png"
    foreign.write_text("not an image")
    for path in (truncated, foreign):
        with pytest.raises(images.UNREADABLE):
            images.load_rgb(path)
    assert images.load_rgb(good).getpixel((0, 0)) == (200, 10, 10)
    assert issubclass(Image.DecompressionBombError, images.UNREADABLE)


def test_report_unreadable_lists_each_file_once(capsys) -> None:
    images.report_unreadable([("b.png", "broken"), ("a.png", "truncated"), ("b.png", "broken")])
    assert capsys.readouterr().err == "2 unreadable image(s) were left out:\n  a.png (truncated)\n  b.png (broken)\n"


def test_amp_on_a_cpu_without_native_instructions_is_refused_unless_forced(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "cpu_runs_natively", lambda dtype: False)
    with pytest.raises(errors.UserError, match=r"^--amp bf16: this CPU \(.*\) has no bfloat16 .* instructions, so it is "
                                               r"emulated: .*7x slower.*; use --amp off, or add --amp-force"):
        runtime.check_amp("bf16", torch.device("cpu"))
    runtime.check_amp("bf16", torch.device("cpu"), force=True)
    runtime.check_amp("off", torch.device("cpu"))
    monkeypatch.setattr(runtime, "cpu_runs_natively", lambda dtype: True)
    runtime.check_amp("bf16", torch.device("cpu"))
    with pytest.raises(errors.UserError, match="--amp fp16 needs CUDA to train"):
        runtime.check_amp("fp16", torch.device("cpu"), force=True)


def test_cpu_query_answers_for_both_half_types() -> None:
    assert isinstance(runtime.cpu_runs_natively(torch.bfloat16), bool)
    assert isinstance(runtime.cpu_runs_natively(torch.float16), bool)
