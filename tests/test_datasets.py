"""histo_retrieval.data.datasets: KimiaDataset (natural class order), the reference's transforms, the
seeded split and the per-class cut."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histo_retrieval import errors
from histo_retrieval.data import datasets as data
from histo_retrieval.data.datasets import subsample_per_class


def make_split(root: Path, counts: dict[str, int], size: int = 40) -> None:
    for class_index, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for k in range(count):
            value = 10 * class_index + k
            Image.new("RGB", (size, size), (value, value, value)).save(root / name / f"{name}_{k}.png")


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


def test_subsample_per_class_keeps_int_share_of_each_class() -> None:
    targets = [0] * 10 + [1] * 7 + [2] * 3
    kept = subsample_per_class(targets, 0.5, seed=1)
    assert [sum(targets[i] == c for i in kept) for c in range(3)] == [5, 3, 1]
    assert kept == subsample_per_class(targets, 0.5, seed=1) != subsample_per_class(targets, 0.5, seed=2)
