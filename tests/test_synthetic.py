"""KIMIA_data/synthetic.py: determinism, the two written forms, class structure, contact sheet, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from KIMIA_data import synthetic
from histo_retrieval.errors import UserError, run_script

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY = dict(num_classes=3, patch_size=48, train_per_class=3, test_per_class=2, workers=1)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_release_layout_and_determinism(tmp_path: Path) -> None:
    record = synthetic.make_rgb_release(tmp_path / "a", seed=3, **TINY)
    files = file_bytes(tmp_path / "a")
    assert sorted(files) == sorted([f"Training/s{c}/train_{k}.jpg" for c in range(3) for k in range(3)]
                                   + [f"RGBPatches-test/s{c}/test_{k}.jpg" for c in range(3) for k in range(2)])
    for name in files:
        with Image.open(tmp_path / "a" / name) as image:
            assert (image.mode, image.size) == ("RGB", (48, 48))
    assert record["classes"] == ["s0", "s1", "s2"] and record["seed"] == 3
    assert json.loads((tmp_path / "a" / synthetic.MARKER_NAME).read_text())["files"] == record["files"]
    # same seed, any number of workers: same bytes; another seed: other images
    synthetic.make_rgb_release(tmp_path / "b", seed=3, **{**TINY, "workers": 2})
    assert file_bytes(tmp_path / "b") == files
    synthetic.make_rgb_release(tmp_path / "c", seed=4, **TINY)
    assert file_bytes(tmp_path / "c") != files


def test_hdf5_has_the_official_layout(tmp_path: Path) -> None:
    h5_path = tmp_path / "Kimia_Path24.h5"
    record = synthetic.make_rgb_release(tmp_path / "release", hdf5=h5_path, scan_size=240, **TINY)
    assert h5_path.stat().st_size < 2_000_000
    with h5py.File(h5_path, "r") as h5:
        assert sorted(h5) == ["scan0", "scan1", "scan2", "test_data"]
        assert h5["scan0/data"].shape == (240, 240, 3) and h5["scan0/data"].dtype == np.uint8
        assert h5["scan0/data"].chunks is not None  # readable in windows
        assert h5["scan0/thumbnail"].shape[0] < 240
        assert h5["test_data/patches"].shape == (6, 48, 48, 3)
        assert list(h5["test_data/targets"][()]) == [0, 0, 1, 1, 2, 2]
        scan = h5["scan1/data"][()]
        patches = h5["test_data/patches"][()]
    # the test regions are whitened in the scan: whole 48 x 48 squares of pure white
    corners = synthetic.plan_scan(240, 48, 2).test_corners
    for y, x in corners:
        assert (scan[y:y + 48, x:x + 48] == 255).all()
    # and the HDF5 test patches are the RGB release's test patches (up to JPEG loss)
    jpeg = np.asarray(Image.open(tmp_path / "release/RGBPatches-test/s1/test_0.jpg"), np.float64)
    assert np.argmin([np.abs(jpeg - patch).mean() for patch in patches]) == 2
    assert record["hdf5"] == str(h5_path)


def test_patches_vary_in_stain_and_classes_share_palettes(tmp_path: Path) -> None:
    palettes = Counter(t.palette for t in synthetic.TISSUE_CLASSES)
    assert len(synthetic.TISSUE_CLASSES) == 24 and set(palettes.values()) == {6}
    synthetic.make_rgb_release(tmp_path, num_classes=1, patch_size=64, train_per_class=12, test_per_class=1,
                               workers=1)
    means = [np.asarray(Image.open(p), np.float64).mean() for p in (tmp_path / "Training/s0").iterdir()]
    assert np.std(means) > 2.0  # stain intensity differs from patch to patch


def low_resolution_features(path: Path, px: int = 64) -> np.ndarray:
    """Colour statistics and the radial power spectrum of the patch as the CPU demo sees it."""
    with Image.open(path) as image:
        small = image.convert("RGB").resize((300, 300), Image.BICUBIC).resize((px, px), Image.BICUBIC)
    rgb = np.asarray(small, np.float64) / 255.0
    grey = rgb.mean(axis=2)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean())))
    radius = np.hypot(*(np.indices(power.shape) - px // 2)).astype(int).ravel()
    radial = np.bincount(radius, power.ravel())[1:px // 2] / np.bincount(radius)[1:px // 2]
    return np.concatenate([rgb.mean(axis=(0, 1)), rgb.std(axis=(0, 1)), np.log(radial + 1e-6)])


def test_first_eight_classes_are_separable_at_64_px(tmp_path: Path) -> None:
    """What the CPU demo relies on: even a 1-nearest-neighbour on simple features at 64 px tells
    the first 8 classes apart, although they share palettes and vary in stain and rotation."""
    synthetic.make_rgb_release(tmp_path, num_classes=8, patch_size=96, train_per_class=6, test_per_class=4,
                               workers=2)
    files = sorted(tmp_path.glob("*/*/*.jpg"))
    labels = np.array([int(f.parent.name[1:]) for f in files])
    features = np.stack([low_resolution_features(f) for f in files])
    features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-9)
    distances = ((features[:, None] - features[None]) ** 2).sum(axis=-1)
    np.fill_diagonal(distances, np.inf)
    accuracy = (labels[distances.argmin(axis=1)] == labels).mean()
    assert accuracy >= 0.9


def test_contact_sheet(tmp_path: Path) -> None:
    sheet = tmp_path / "docs" / "sheet.png"
    synthetic.make_rgb_release(tmp_path / "release", contact_sheet_path=sheet, thumbnails_per_class=2, **TINY)
    with Image.open(sheet) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width == 3 * (2 * 80 + 8) + 8 and height == 80 + 14 + 8 + 8


def test_rerun_replaces_its_own_files_only(tmp_path: Path) -> None:
    out = tmp_path / "release"
    synthetic.make_rgb_release(out, **TINY)
    keep = out / "Training" / "mine.txt"
    keep.write_text("a user's note")
    synthetic.make_rgb_release(out, **{**TINY, "train_per_class": 2})
    assert not (out / "Training/s0/train_2.jpg").exists()  # stale patch of the first run removed
    assert (out / "Training/s0/train_1.jpg").exists() and keep.read_text() == "a user's note"


def test_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--classes must be between 1 and 24"):
        synthetic.make_rgb_release(tmp_path / "a", num_classes=25)
    with pytest.raises(UserError, match="--scan-size 100 is too small.*use at least"):
        synthetic.make_rgb_release(tmp_path / "a", patch_size=64, scan_size=100)
    foreign = tmp_path / "real_data"
    foreign.mkdir()
    (foreign / "slide.jpg").write_bytes(b"precious")
    with pytest.raises(UserError, match="not made by synthetic.py"):
        synthetic.make_rgb_release(foreign, **TINY)
    assert (foreign / "slide.jpg").read_bytes() == b"precious"


@pytest.mark.slow
def test_script(tmp_path: Path) -> None:
    script = REPO_ROOT / "KIMIA_data" / "synthetic.py"
    done = subprocess.run([sys.executable, str(script), "--out", "src", "--classes", "2", "--patch-size", "48",
                           "--train-per-class", "2", "--test-per-class", "1", "--hdf5", "k.h5",
                           "--contact-sheet", "sheet.png"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 6 patches of 2 classes" in done.stdout
    assert (tmp_path / "k.h5").is_file() and (tmp_path / "sheet.png").is_file()


def test_main_reports_bad_settings_on_one_line(tmp_path: Path, capsys) -> None:
    args = synthetic.get_args_parser().parse_args(["--classes", "0", "--out", str(tmp_path / "x")])
    assert run_script(synthetic.main, args) == 2
    assert capsys.readouterr().err == "error: --classes must be between 1 and 24, got 0\n"
