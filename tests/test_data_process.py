"""KIMIA_data/data_process.py: the reference's pixels bit for bit, the --resize antialias option,
the three source layouts, every image kind, the HDF5 tile rule, corrupt files, re-runs, bad
arguments, start-up without torch, and the benchmark's quick mode."""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from KIMIA_data import data_process, synthetic
from histo_retrieval.errors import UserError, run_script

REPO_ROOT = Path(__file__).resolve().parents[1]

SIZE = 32  # outputs this small keep the tests quick; the code path is the one --size 300 takes


def texture(seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def arguments(source: Path, out: Path, *extra: str) -> argparse.Namespace:
    """data_process's arguments for one thread at SIZE; a later --workers or --size in `extra` wins."""
    return data_process.get_args_parser().parse_args([str(source), "--out", str(out), "--size", str(SIZE),
                                                      "--workers", "1", *extra])


def run(source: Path, out: Path, *extra: str) -> dict:
    return data_process.main(arguments(source, out, *extra))


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def outputs(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/*.png"))


def reference_png(source: Path, size: int, scratch: Path) -> tuple[np.ndarray, bytes]:
    """The reference script's steps for one image, written out: its pixels (BGR) and its PNG file."""
    image = cv2.imread(str(source))
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
    target = scratch / "reference.png"
    assert cv2.imwrite(str(target), image)
    return image, target.read_bytes()


def assert_reference_outputs(out: Path, size: int, scratch: Path) -> int:
    """Every output listed in the manifest has the reference's pixels and bytes; returns how many."""
    rows = read_manifest(out)
    for row in rows:
        expected, expected_bytes = reference_png(Path(row["source"]), size, scratch)
        written = out / row["output"]
        assert np.array_equal(cv2.imread(str(written), cv2.IMREAD_UNCHANGED), expected), row["source"]
        assert written.read_bytes() == expected_bytes, row["source"]
    return len(rows)


@pytest.fixture
def own_folders(tmp_path: Path) -> Path:
    """Layout 3 with every accepted image kind, plus files that must be ignored."""
    src = tmp_path / "own"
    for split in ("train", "test"):
        for name in ("s0", "s2", "s10"):
            (src / split / name).mkdir(parents=True)
    rgb = texture(0)
    train = src / "train"
    Image.fromarray(rgb).save(train / "s0" / "a.jpg")
    Image.fromarray(rgb).save(train / "s0" / "b.JPEG", format="JPEG")
    Image.fromarray(rgb).save(train / "s0" / "c.PNG", format="PNG")
    Image.fromarray(rgb).save(train / "s2" / "d.tif")
    Image.fromarray(rgb).save(train / "s2" / "e.TIFF", format="TIFF")
    Image.fromarray(rgb).save(train / "s2" / "f.bmp")
    Image.fromarray(rgb).convert("L").save(train / "s10" / "gray.png")
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])  # fully transparent
    Image.fromarray(rgba, "RGBA").save(train / "s10" / "clear.png")
    cv2.imwrite(str(train / "s10" / "deep.png"), np.full((48, 48), 65535 // 2, np.uint16))  # 16-bit grey
    cv2.imwrite(str(train / "s10" / "deep16.tif"), np.full((48, 48, 3), 65535, np.uint16))  # 16-bit colour
    Image.fromarray(rgb).save(train / "s10" / ".hidden.png")
    (train / "s10" / "notes.txt").write_text("not an image")
    for name in ("s0", "s2", "s10"):
        Image.fromarray(texture(1)).save(src / "test" / name / "q.png")
    return src


def test_own_folders_every_image_kind(own_folders: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    record = run(own_folders, out)
    assert "image folders (train/, test/)" in capsys.readouterr().out
    assert outputs(out) == sorted([
        "train/s0/s0_a.png", "train/s0/s0_b.png", "train/s0/s0_c.png",
        "train/s2/s2_d.png", "train/s2/s2_e.png", "train/s2/s2_f.png",
        "train/s10/s10_gray.png", "train/s10/s10_clear.png", "train/s10/s10_deep.png", "train/s10/s10_deep16.png",
        "test/s0/s0_q.png", "test/s2/s2_q.png", "test/s10/s10_q.png"])
    for path in out.glob("*/*/*.png"):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (SIZE, SIZE))
    assert record["classes"] == ["s0", "s2", "s10"]  # natural order
    assert record["counts"]["train"] == {"s0": 3, "s2": 3, "s10": 4}
    assert record["counts"]["test"] == {"s0": 1, "s2": 1, "s10": 1}
    assert record["resize"] == "reference"
    # grey, transparent and 16-bit sources too: whatever cv2.imread's colour flag makes of them
    assert assert_reference_outputs(out, SIZE, tmp_path) == 13
    rows = read_manifest(out)
    assert [(r["split"], r["class"]) for r in rows][:4] == [("train", "s0")] * 3 + [("train", "s2")]
    assert {r["output"] for r in rows} == set(outputs(out))
    assert {Path(r["source"]).name for r in rows if r["class"] == "s2" and r["split"] == "train"} == {
        "d.tif", "e.TIFF", "f.bmp"}


def test_reference_pixels_bit_for_bit_at_full_size(tmp_path: Path) -> None:
    """1000 px JPEG, PNG and TIFF patches (and odd shapes, grey, alpha, 16-bit) to 300 px, on two threads:
    the reference script's pixels and PNG bytes."""
    src = tmp_path / "src"
    for split in ("train", "test"):
        (src / split / "s0").mkdir(parents=True)
    big = texture(7, size=1000)
    train = src / "train" / "s0"
    Image.fromarray(big).save(train / "a.jpg", quality=90)
    Image.fromarray(big).save(train / "b.png")
    Image.fromarray(big).save(train / "c.tif")
    Image.fromarray(big[:230, :170]).save(train / "narrow.jpg")  # non-square, and enlarged
    Image.fromarray(big).convert("L").save(train / "grey.jpg")
    rng = np.random.default_rng(0)
    cv2.imwrite(str(train / "deep.png"), rng.integers(0, 65536, (400, 500, 3), dtype=np.uint16))
    alpha = rng.integers(0, 256, big.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([big, alpha]), "RGBA").save(train / "alpha.png")
    Image.fromarray(big[::-1]).save(src / "test" / "s0" / "q.jpg")
    out = tmp_path / "out"
    run(src, out, "--size", "300", "--workers", "2")
    assert assert_reference_outputs(out, 300, tmp_path) == 8


def test_antialias_keeps_the_previous_pixels(own_folders: Path, tmp_path: Path) -> None:
    """--resize antialias: Pillow's antialiased bicubic (within 1 level), transparency over white
    (the reference drops the alpha channel), 16-bit values rescaled."""
    out = tmp_path / "out"
    record = run(own_folders, out, "--resize", "antialias")
    assert record["resize"] == "antialias" and "antialiased" in record["resize_method"]
    for name in ("train/s0/a.jpg", "train/s0/c.PNG", "train/s2/d.tif", "train/s10/gray.png", "test/s2/q.png"):
        split, class_name, file_name = name.split("/")
        with Image.open(own_folders / name) as source:
            expected = np.asarray(source.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)).astype(int)
        written = np.asarray(Image.open(out / split / class_name / f"{class_name}_{Path(file_name).stem}.png"))
        assert np.abs(written.astype(int) - expected).max() <= 1, name
    assert np.asarray(Image.open(out / "train/s10/s10_clear.png")).min() == 255
    assert np.asarray(Image.open(out / "train/s10/s10_deep.png")).mean() == pytest.approx(127.5, abs=1)
    assert np.asarray(Image.open(out / "train/s10/s10_deep16.png")).min() == 255
    reference = tmp_path / "reference"
    run(own_folders, reference)
    assert np.asarray(Image.open(reference / "train/s10/s10_clear.png")).min() < 255  # alpha dropped


def test_two_inputs_with_one_output_name_are_refused(own_folders: Path, tmp_path: Path, capsys) -> None:
    Image.fromarray(texture(3)).save(own_folders / "train" / "s10" / "deep.jpg")  # deep.png exists
    assert run_script(data_process.command, arguments(own_folders, tmp_path / "out")) == 2
    message = capsys.readouterr().err
    assert "deep.png" in message and "deep.jpg" in message and "rename one" in message
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the other layouts
@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny synthetic RGB release and its HDF5 form: 3 classes, 3 train + 2 test patches of 64 px,
    scans of 5 x 5 tiles whose glass corners the tile rule drops."""
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.make_rgb_release(root / "release", num_classes=3, patch_size=64, train_per_class=3,
                               test_per_class=2, scan_size=320, hdf5=root / "Kimia_Path24.h5", workers=1)
    return root / "release", root / "Kimia_Path24.h5"


def test_rgb_release(synthetic_source, tmp_path: Path, capsys) -> None:
    release, _ = synthetic_source
    out = tmp_path / "out"
    record = run(release, out)
    assert "RGB folder release" in capsys.readouterr().out
    assert record["counts"] == {"train": {"s0": 3, "s1": 3, "s2": 3}, "test": {"s0": 2, "s1": 2, "s2": 2}}
    assert "train/s1/s1_train_2.png" in outputs(out) and "test/s2/s2_test_1.png" in outputs(out)
    assert len(read_manifest(out)) == 15


def test_hdf5_test_patches_and_tiles(synthetic_source, tmp_path: Path, capsys) -> None:
    _, h5_path = synthetic_source
    out = tmp_path / "out"
    record = run(h5_path.parent, out)  # a folder holding Kimia_Path24.h5 works too
    assert "HDF5 file (Kimia_Path24.h5)" in capsys.readouterr().out
    with h5py.File(h5_path, "r") as h5:
        targets = list(h5["test_data/targets"][()])
        scan = h5["scan1/data"][()]
        test_patch = h5["test_data/patches"][2]
    assert record["counts"]["test"] == {f"s{i}": targets.count(i) for i in range(3)}
    # exactly the tiles the rule keeps are written
    tile = 64
    kept = [(r, c) for r in range(scan.shape[0] // tile) for c in range(scan.shape[1] // tile)
            if not data_process.is_blank_tile(scan[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])]
    assert 0 < len(kept) < (scan.shape[0] // tile) ** 2  # the glass corners are dropped
    assert sorted(p.name for p in (out / "train/s1").iterdir()) == sorted(f"s1_tile_r{r}_c{c}.png" for r, c in kept)
    assert record["tile_rule"]["dropped"]["s1"] == (scan.shape[0] // tile) ** 2 - len(kept)
    rows = read_manifest(out)
    assert f"{h5_path}:test_data/patches[2]" in {r["source"] for r in rows}
    # the reference's resize of the RGB patch and tiles (a per-channel filter: RGB or BGR alike)
    expected = cv2.resize(test_patch, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(np.asarray(Image.open(out / "test/s1/s1_test_2.png")), expected)
    for r, c in kept:
        window = scan[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
        written = np.asarray(Image.open(out / f"train/s1/s1_tile_r{r}_c{c}.png"))
        assert np.array_equal(written, cv2.resize(window, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC))
    # --resize antialias: Pillow's bicubic, the same tiles kept
    record = run(h5_path, tmp_path / "antialias", "--resize", "antialias")
    assert record["tile_rule"]["dropped"]["s1"] == (scan.shape[0] // tile) ** 2 - len(kept)
    expected = np.asarray(Image.fromarray(test_patch).resize((SIZE, SIZE), Image.BICUBIC)).astype(int)
    written = np.asarray(Image.open(tmp_path / "antialias/test/s1/s1_test_2.png")).astype(int)
    assert np.abs(written - expected).max() <= 1


def test_hdf5_without_channel_axis(synthetic_source, tmp_path: Path) -> None:
    """Copies of the official file store grey patches (n x H x W); they become grey RGB PNGs."""
    _, h5_path = synthetic_source
    with h5py.File(h5_path, "r") as h5:
        scans = [h5[f"scan{i}/data"][()] for i in range(3)]
        patches, targets = list(h5["test_data/patches"][()]), list(h5["test_data/targets"][()])
    grey_path = tmp_path / "grey.h5"
    synthetic.write_hdf5(grey_path, scans, patches, targets, grayscale=True)
    with h5py.File(grey_path, "r") as h5:
        assert h5["test_data/patches"].ndim == 3 and h5["scan0/data"].ndim == 2
    record = run(grey_path, tmp_path / "out")
    assert sum(record["counts"]["test"].values()) == 6 and sum(record["counts"]["train"].values()) > 0
    with h5py.File(grey_path, "r") as h5:
        patch = h5["test_data/patches"][0]
        target = h5["test_data/targets"][0]
    grey = np.asarray(Image.open(tmp_path / f"out/test/s{target}/s{target}_test_0.png"))
    expected = cv2.resize(patch, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    for channel in range(3):
        assert np.array_equal(grey[..., channel], expected)


def test_hdf5_arrays_become_bgr_as_imread_would_make_them() -> None:
    """The reference path's conversion of HDF5 arrays: channel-first or not, grey replicated, alpha
    dropped (cv2.imread's colour flag), 16-bit values / 257."""
    rgb = texture(4, 16)
    bgr = rgb[..., ::-1]
    assert np.array_equal(data_process.to_bgr(rgb), bgr)
    assert np.array_equal(data_process.to_bgr(rgb.transpose(2, 0, 1)), bgr)
    assert np.array_equal(data_process.to_bgr(np.dstack([rgb, np.zeros((16, 16), np.uint8)])), bgr)
    assert np.array_equal(data_process.to_bgr(rgb.astype(np.uint16) * 257), bgr)
    assert np.array_equal(data_process.to_bgr(rgb[..., 1]), np.dstack([rgb[..., 1]] * 3))
    assert np.array_equal(data_process.to_bgr(rgb[..., 1:2]), np.dstack([rgb[..., 1]] * 3))


def test_tile_rule() -> None:
    tissue = np.full((64, 64, 3), (200, 120, 170), np.uint8)
    assert not data_process.is_blank_tile(tissue)
    whitened = tissue.copy()
    whitened[:40] = 255  # 5 of 8 block rows: 62.5% of the blocks blank
    assert data_process.is_blank_tile(whitened)
    whitened = tissue.copy()
    whitened[:24] = 255  # 37.5%
    assert not data_process.is_blank_tile(whitened)
    rng = np.random.default_rng(0)
    glass = rng.integers(228, 250, (64, 64, 3)).astype(np.uint8)
    assert data_process.is_blank_tile(glass)
    fat = np.full((64, 64, 3), 240, np.uint8)  # white cells with a membrane every 16 px
    fat[::16] = tissue[0, 0]
    fat[:, ::16] = tissue[0, 0]
    assert not data_process.is_blank_tile(fat)  # only 25% of the blocks hold no membrane


def test_jpeg_draft_decoding_stays_faithful(tmp_path: Path) -> None:
    """--resize antialias: the reduced-size JPEG decode is as close to the uncompressed image, once resized to 300 px,
    as a full decode is: the output stays a faithful bicubic resize."""
    source = texture(5, size=1000)
    path = tmp_path / "big.jpg"
    Image.fromarray(source).save(path, quality=90)
    assert data_process.load_image(path, 300).size == (500, 500)  # decoded at half size

    def resized(image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB").resize((300, 300), Image.BICUBIC), np.float64)

    truth = resized(Image.fromarray(source))
    ours = resized(data_process.load_image(path, 300))
    with Image.open(path) as full:
        full_decode = resized(full)
    assert np.abs(ours - full_decode).mean() < 2.0
    assert np.abs(ours - truth).mean() <= np.abs(full_decode - truth).mean() + 0.25


# ----------------------------------------------------------------------------- failures and re-runs
def test_corrupt_images_are_reported_after_the_others(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    for split in ("train", "test"):
        (src / split / "s0").mkdir(parents=True)
        Image.fromarray(texture(2)).save(src / split / "s0" / "good.png")
    data = (src / "train/s0/good.png").read_bytes()
    (src / "train/s0/truncated.png").write_bytes(data[: len(data) // 2])
    (src / "train/s0/garbage.jpg").write_bytes(b"not a jpeg at all")
    before = sorted((p.name, p.read_bytes()) for p in (src / "train/s0").iterdir())
    record = run(src, tmp_path / "out")
    assert record["failed"] == [str(src / "train/s0/garbage.jpg"), str(src / "train/s0/truncated.png")]
    err = capsys.readouterr().err
    assert "2 unreadable image(s) were left out" in err and "OpenCV cannot decode it" in err
    assert str(src / "train/s0/truncated.png") in err and str(src / "train/s0/garbage.jpg") in err
    assert run_script(data_process.command, arguments(src, tmp_path / "again")) == 1  # the command's exit status
    assert outputs(tmp_path / "out") == ["test/s0/s0_good.png", "train/s0/s0_good.png"]
    assert len(read_manifest(tmp_path / "out")) == 2
    assert sorted((p.name, p.read_bytes()) for p in (src / "train/s0").iterdir()) == before  # source untouched


def test_truncated_files_are_named_and_left_out_unless_kept(tmp_path: Path, capsys) -> None:
    """A cut-off JPEG decodes in OpenCV with a warning only (grey where the data stops): it is left out
    and named at the end, or written as OpenCV decodes it with --keep-truncated, named all the same;
    whole files keep the reference's pixels, trailing padding after the end marker included."""
    src = tmp_path / "src"
    for split in ("train", "test"):
        (src / split / "s0").mkdir(parents=True)
    Image.fromarray(texture(3, 96)).save(src / "train/s0/good.jpg", quality=90)
    whole = (src / "train/s0/good.jpg").read_bytes()
    assert whole.endswith(b"\xff\xd9")
    (src / "train/s0/cut.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    (src / "train/s0/padded.jpg").write_bytes(whole + b"\0" * 64)
    Image.fromarray(texture(4)).save(src / "train/s0/whole.png")
    png = (src / "train/s0/whole.png").read_bytes()
    (src / "train/s0/short.png").write_bytes(png[:-12])  # the IEND chunk gone
    Image.fromarray(texture(5, 96)).save(src / "test/s0/q.jpg")
    assert cv2.imread(str(src / "train/s0/cut.jpg")) is not None  # OpenCV decodes it, grey-filled
    png_decodes = cv2.imread(str(src / "train/s0/short.png")) is not None  # OpenCV 5.1 refuses it
    before = sorted((p.name, p.read_bytes()) for p in (src / "train/s0").iterdir())
    cut_jpg, cut_png = str(src / "train/s0/cut.jpg"), str(src / "train/s0/short.png")

    out = tmp_path / "out"
    capsys.readouterr()
    assert run_script(data_process.command, arguments(src, out)) == 1
    err = capsys.readouterr().err
    assert "2 unreadable image(s) were left out:" in err
    assert f"  {cut_jpg} (truncated: no JPEG end marker FF D9 at its end; left out, --keep-truncated writes it" in err
    assert f"  {cut_png} (truncated: no PNG end chunk IEND at its end;" in err
    assert outputs(out) == ["test/s0/s0_q.png", "train/s0/s0_good.png", "train/s0/s0_padded.png",
                            "train/s0/s0_whole.png"]
    assert assert_reference_outputs(out, SIZE, tmp_path) == 4  # every whole file: the reference's pixels and bytes
    record = data_process.main(arguments(src, out))  # a re-run skips the written ones and still names the cut ones
    assert record["failed"] == record["truncated"] == [cut_jpg, cut_png]

    kept = tmp_path / "kept"
    for attempt in range(2):  # the second run skips the outputs it wrote and still reports the cut file
        capsys.readouterr()
        assert run_script(data_process.command, arguments(src, kept, "--keep-truncated")) == 1
        err = capsys.readouterr().err
        assert f"{1 + png_decodes} truncated image(s) were kept as OpenCV decodes them, grey where the data " \
               "stops" in err
        assert f"  {cut_jpg} (truncated: no JPEG end marker FF D9 at its end)" in err
        assert f"  {cut_png} (truncated: no PNG end chunk IEND at its end" + \
            (")" if png_decodes else ", and OpenCV cannot decode it") in err
    assert outputs(kept) == ["test/s0/s0_q.png", "train/s0/s0_cut.png", "train/s0/s0_good.png",
                             "train/s0/s0_padded.png"] + ["train/s0/s0_short.png"] * png_decodes + [
                            "train/s0/s0_whole.png"]
    assert assert_reference_outputs(kept, SIZE, tmp_path) == 5 + png_decodes  # the cut ones as OpenCV decodes them
    record = data_process.main(arguments(src, kept, "--keep-truncated"))
    assert record["failed"] == [cut_png] * (not png_decodes) and record["truncated"] == [cut_jpg, cut_png]
    assert sorted((p.name, p.read_bytes()) for p in (src / "train/s0").iterdir()) == before  # source untouched


def test_truncation_check_reads_only_the_ends(tmp_path: Path) -> None:
    """JPEG and PNG files by their signature, whatever their name; other formats are not judged."""
    jpeg = tmp_path / "a.png"  # a JPEG under another name
    Image.fromarray(texture(6)).save(jpeg, format="JPEG")
    data = jpeg.read_bytes()
    assert data_process.truncation(jpeg) is None
    jpeg.write_bytes(data + b"\0" * (data_process.TAIL_BYTES - 2))
    assert data_process.truncation(jpeg) is None
    jpeg.write_bytes(data + b"\0" * data_process.TAIL_BYTES)  # more padding than the check allows for
    assert data_process.truncation(jpeg) == "truncated: no JPEG end marker FF D9 at its end"
    jpeg.write_bytes(data[:-2])
    assert data_process.truncation(jpeg) == "truncated: no JPEG end marker FF D9 at its end"
    tiff = tmp_path / "b.tif"
    Image.fromarray(texture(6)).save(tiff)
    tiff.write_bytes(tiff.read_bytes()[:-40])
    assert data_process.truncation(tiff) is None


def test_rerun_skips_complete_outputs_and_redoes_broken_ones(synthetic_source, tmp_path: Path, capsys) -> None:
    release, _ = synthetic_source
    out = tmp_path / "out"
    run(release, out)
    capsys.readouterr()
    broken = out / "train/s0/s0_train_0.png"
    broken.write_bytes(broken.read_bytes()[:50])  # as if an older tool had died mid-write
    stamp = (out / "train/s1/s1_train_0.png").stat().st_mtime_ns
    run(release, out)
    assert "1 written, 14 already complete (skipped)" in capsys.readouterr().out
    assert (out / "train/s1/s1_train_0.png").stat().st_mtime_ns == stamp
    assert data_process.is_complete(broken, SIZE)
    run(release, out, "--overwrite")
    assert "15 written, 0 already complete" in capsys.readouterr().out
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("resize", ["reference", "antialias"])
def test_parallel_workers_give_the_same_outputs(synthetic_source, tmp_path: Path, resize: str) -> None:
    release, _ = synthetic_source
    run(release, tmp_path / "one", "--resize", resize)
    threads = torch.get_num_threads()
    run(release, tmp_path / "three", "--resize", resize, "--workers", "3")
    assert torch.get_num_threads() == threads  # restored for the caller (demo.py trains next)
    assert outputs(tmp_path / "one") == outputs(tmp_path / "three") != []
    for name in outputs(tmp_path / "one"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()


# ----------------------------------------------------------------------------- bad input
def bad_run(capsys, source: Path, out: Path, *extra: str) -> str:
    assert run_script(data_process.command, arguments(source, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_missing_and_unrecognised_sources(tmp_path: Path, capsys) -> None:
    err = bad_run(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert "nowhere: no such file or folder" in err and "RGBPatches-test" in err and "train/" in err
    (tmp_path / "mixed" / "images").mkdir(parents=True)
    err = bad_run(capsys, tmp_path / "mixed", tmp_path / "out")
    assert "unrecognised layout" in err and "Kimia_Path24.h5" in err
    (tmp_path / "fake.h5").write_text("not hdf5")
    assert "not an HDF5 file" in bad_run(capsys, tmp_path / "fake.h5", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_default_source_says_how_to_make_the_synthetic_one(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(data_process, "DEFAULT_SOURCE", tmp_path / "KIMIAPath24_RGB")
    args = data_process.get_args_parser().parse_args(["--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="python3 KIMIA_data/synthetic.py"):
        data_process.main(args)


def test_class_names_with_underscores_are_refused_before_any_work(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    for split in ("train", "test"):
        (src / split / "liver_a").mkdir(parents=True)
        Image.fromarray(texture(0)).save(src / split / "liver_a" / "x.png")
    err = bad_run(capsys, src, tmp_path / "out")
    assert "liver_a" in err and "'_'" in err
    assert not (tmp_path / "out").exists()


def test_output_inside_the_source_is_refused(own_folders: Path, capsys) -> None:
    err = bad_run(capsys, own_folders, own_folders)
    assert "overlaps SOURCE" in err


def test_bad_numbers(own_folders: Path, tmp_path: Path, capsys) -> None:
    assert "--size" in bad_run(capsys, own_folders, tmp_path / "out", "--size", "0")
    assert "--workers" in bad_run(capsys, own_folders, tmp_path / "out", "--workers", "0")
    assert "--png-compression" in bad_run(capsys, own_folders, tmp_path / "out", "--png-compression", "10")
    args = arguments(own_folders, tmp_path / "out")
    args.resize = "lanczos"  # as a caller building the arguments in code might
    with pytest.raises(UserError, match="--resize must be one of reference, antialias, got 'lanczos'"):
        data_process.main(args)


def test_png_compression_changes_the_file_size_not_the_pixels(own_folders: Path, tmp_path: Path) -> None:
    run(own_folders, tmp_path / "default")
    record = run(own_folders, tmp_path / "stored", "--png-compression", "0")
    assert record["png_compression"] == 0
    names = outputs(tmp_path / "default")
    assert names == outputs(tmp_path / "stored")
    for name in names:
        default, stored = tmp_path / "default" / name, tmp_path / "stored" / name
        assert np.array_equal(np.asarray(Image.open(default)), np.asarray(Image.open(stored)))
    total = {kind: sum((tmp_path / kind / name).stat().st_size for name in names) for kind in ("default", "stored")}
    assert total["stored"] > 1.2 * total["default"]


# ----------------------------------------------------------------------------- the script itself
HEAVY_MODULES = {"torch", "torchvision", "PIL", "tqdm", "h5py", "matplotlib", "sklearn"}


def imported_modules(script_args: list[str]) -> set[str]:
    """Top-level modules a fresh interpreter imports to run data_process.py with `script_args`."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(REPO_ROOT / "KIMIA_data" / "data_process.py"),
                           *script_args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.slow
def test_default_path_imports_nothing_heavy(synthetic_source, tmp_path: Path) -> None:
    """--help and a whole default run start with cv2 and numpy only; --resize antialias needs torch and
    Pillow (which shows that the check sees them when they are there)."""
    release, _ = synthetic_source
    help_modules = imported_modules(["--help"])
    assert "cv2" in help_modules and not help_modules & HEAVY_MODULES
    run_args = [str(release), "--size", str(SIZE), "--workers", "2", "--out"]
    default = imported_modules(run_args + [str(tmp_path / "default")])
    assert "cv2" in default and not default & HEAVY_MODULES, default & HEAVY_MODULES
    assert assert_reference_outputs(tmp_path / "default", SIZE, tmp_path) == 15  # the command's memory setting too
    antialias = imported_modules(run_args + [str(tmp_path / "antialias"), "--resize", "antialias"])
    assert {"torch", "PIL"} <= antialias


@pytest.mark.slow
def test_keep_freed_memory_stops_the_page_faults_of_every_image(tmp_path: Path) -> None:
    """Decoding 1000 px patches faults in over a thousand fresh pages per image under glibc's defaults;
    after keep_freed_memory() (what the command calls first) the freed memory is reused."""
    for k in range(8):
        cv2.imwrite(str(tmp_path / f"{k}.jpg"), texture(k, size=1000))
    program = f"""
import resource, sys
import cv2
from KIMIA_data import data_process
if sys.argv[1] == "keep":
    data_process.keep_freed_memory()
cv2.imread({str(tmp_path / "0.jpg")!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(1, 8):
    cv2.imread(f"{tmp_path}/{{k}}.jpg")
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 7)
"""
    faults = {mode: float(subprocess.run([sys.executable, "-c", program, mode], cwd=REPO_ROOT, capture_output=True,
                                         text=True, check=True, timeout=60).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 500 and faults["keep"] < 0.1 * faults["default"], faults


@pytest.mark.slow
def test_benchmark_quick_mode() -> None:
    """bench/data_process_speed.py --quick times the reference script and our command, and checks their files match."""
    result = subprocess.run([sys.executable, "-m", "bench.data_process_speed", "--quick"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "24 JPEGs of 200x200" in result.stdout and "the defaults wrote the reference's files, byte for byte" in result.stdout
    commands = re.findall(r"^\| ([^|]+?) \| [\d.]+ \| [\d.]+-[\d.]+ \| [\d.]+ \|", result.stdout, re.M)
    assert commands == ["reference script (cv2, 1 process)", "data_process.py (defaults)", "data_process.py --workers 1",
                        "data_process.py --resize antialias"]


@pytest.mark.slow
def test_script_runs_from_any_directory(synthetic_source, tmp_path: Path) -> None:
    release, _ = synthetic_source
    script = REPO_ROOT / "KIMIA_data" / "data_process.py"
    done = subprocess.run([sys.executable, str(script), str(release), "--out", "out", "--size", str(SIZE),
                           "--workers", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "found: RGB folder release" in done.stdout and "s2" in done.stdout
    assert len(outputs(tmp_path / "out")) == 15


def test_antialias_resize_is_pillows_bicubic_not_opencvs() -> None:
    """--resize antialias: BGR, within one grey level of Pillow's BICUBIC, for shrinking and enlarging; on
    fine texture it is far from cv2's INTER_CUBIC, which does not low-pass filter when it shrinks (the
    reference's)."""
    rng = np.random.default_rng(0)
    fine = rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    for source, size in ((fine, 300), (fine[:90, :70], 300), (texture(3, 120), 50)):
        ours = data_process.resize_bicubic(Image.fromarray(source), size)[..., ::-1].astype(int)
        pillow = np.asarray(Image.fromarray(source).resize((size, size), Image.BICUBIC)).astype(int)
        assert ours.shape == (size, size, 3) and np.abs(ours - pillow).max() <= 1
    opencv = cv2.resize(fine, (300, 300), interpolation=cv2.INTER_CUBIC).astype(int)
    ours = data_process.resize_bicubic(Image.fromarray(fine), 300)[..., ::-1].astype(int)
    assert ours.std() < 0.5 * opencv.std()  # the antialiasing filter averages the noise away
