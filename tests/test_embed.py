"""retrieve.py embed: features in the layout of CLAM and TRIDENT (histo_retrieval.search.features), checked
against timm's own transform and forward, the tissue grid read directly, a rerun after a kill, and the errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config

import retrieve
from histo_retrieval.distributed import run_distributed_script
from histo_retrieval.search.index import SlideIndex
from histo_retrieval.search.slides import Tiling, open_slide, read_patch, tissue_grid
from KIMIA_data import synthetic

REPO = Path(__file__).resolve().parents[1]
# (class folder, file, width, height): sizes above and below the input size, some not square
PATCHES = [("s0", "p1.png", 40, 30), ("s0", "p2.png", 64, 64), ("s0", "p10.png", 300, 180),
           ("s1", "q1.jpg", 50, 90), ("s1", "q2.png", 230, 260)]


def embed(*argv: str) -> int:
    """retrieve.py embed as its __main__ runs it: the exit status, a UserError as one line and status 2;
    sys.argv is the command's, which the files record."""
    argv = ("embed", *argv, "--device", "cpu", "--workers", "0", "--batch-size", "4")
    with mock.patch.object(sys, "argv", ["retrieve.py", *argv]):
        return run_distributed_script(retrieve.main, retrieve.get_args_parser().parse_args(argv))


def timm_weights(path: Path, architecture: str) -> Path:
    """A randomly initialised timm network's weights, in the file format `path`'s suffix names."""
    torch.manual_seed(7)
    state = timm.create_model(architecture, pretrained=False, num_classes=0).state_dict()
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def timm_reference(architecture: str, weights: Path) -> tuple[torch.nn.Module, object]:
    """The plain timm model and its own eval transform, as a user of timm would run them."""
    model = timm.create_model(architecture, pretrained=False, num_classes=0)
    state = torch.load(weights) if weights.suffix == ".pth" else load_file(weights)
    model.load_state_dict(state)
    return model.eval(), create_transform(**resolve_data_config({}, model=model))


def forward(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.functional.normalize(model(images), dim=1).numpy()


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("patches") / "tissue"
    rng = np.random.default_rng(5)
    for folder, name, width, height in PATCHES:
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / folder / name)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {"vit_tiny_patch16_224": timm_weights(root / "vit_tiny.pth", "vit_tiny_patch16_224"),
            "resnet18": timm_weights(root / "resnet18.safetensors", "resnet18")}


def plain_slide(path: Path, seed: int) -> Path:
    """A plain image read as a one-level slide: glass with a block of stained tissue."""
    rng = np.random.default_rng(seed)
    pixels = np.full((384, 512, 3), 242, np.uint8)
    pixels[64:320, 64:384] = np.clip(np.array([190, 90, 160]) + rng.normal(0, 25, (256, 320, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("architecture", ["vit_tiny_patch16_224", "resnet18"])
def test_a_folder_s_features_are_timm_s_own_forward_of_each_file(patches, weights, tmp_path, architecture):
    out = tmp_path / "features"
    assert embed("--encoder", f"timm:{architecture}", "--encoder-weights", str(weights[architecture]), str(patches),
                 "--out-dir", str(out)) == 0
    model, transform = timm_reference(architecture, weights[architecture])
    order = ["s0/p1.png", "s0/p2.png", "s0/p10.png", "s1/q1.jpg", "s1/q2.png"]  # natural order: p2 before p10
    expected = forward(model, torch.stack([transform(Image.open(patches / f).convert("RGB")) for f in order]))
    with h5py.File(out / "tissue.h5", "r") as f:
        assert list(f["files"].asstr()[:]) == order
        assert list(f["classes"].asstr()[:]) == ["s0", "s0", "s0", "s1", "s1"]
        assert f["features"].dtype == np.float32 and f["features"].shape == (5, model.num_features)
        np.testing.assert_allclose(f["features"][:], expected, atol=1e-5)
        assert f.attrs["encoder"] == f"timm:{architecture}" and f.attrs["kind"] == "folder"
        assert f.attrs["encoder_weights"] == str(weights[architecture])
        assert len(f.attrs["weights_sha256"]) == 64 and "embed" in f.attrs["command"]
    summary = json.loads((out / "embed.json").read_text())
    assert summary["outputs"]["tissue"]["patches"] == 5
    assert summary["settings"]["weights_sha256"] == h5py.File(out / "tissue.h5", "r").attrs["weights_sha256"]


def test_a_folder_without_class_subfolders_has_no_classes(weights, tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 50, 3), 80 * i, np.uint8)).save(folder / f"x{i}.png")
    out = tmp_path / "features"
    assert embed("--encoder", "histogram", str(folder), "--out-dir", str(out)) == 0
    with h5py.File(out / "flat.h5", "r") as f:
        assert set(f) == {"features", "files"} and list(f["files"].asstr()[:]) == ["x0.png", "x1.png"]
        np.testing.assert_allclose(np.linalg.norm(f["features"][:], axis=1), 1, atol=1e-6)


def test_a_slide_s_features_are_its_tissue_patches_read_at_the_run_s_scale(weights, tmp_path):
    records = synthetic.write_slide_set(tmp_path / "slides", count=1, classes=2, size=(1536, 1024), seed=4)
    slide_path = tmp_path / "slides" / records[0]["file"]
    out = tmp_path / "features"
    assert embed("--encoder", "timm:resnet18", "--encoder-weights", str(weights["resnet18"]), str(slide_path),
                 "--out-dir", str(out), "--mpp", "2", "--patch-size", "32") == 0
    tiling = Tiling(2.0, 32, 0.5)
    with open_slide(slide_path) as slide:  # the tissue grid and its patches, read directly
        grid = tissue_grid(slide, tiling)
        pixels = [read_patch(slide, grid.read, int(x), int(y)) for x, y in grid.positions]
    model, transform = timm_reference("resnet18", weights["resnet18"])
    expected = forward(model, torch.stack([transform(Image.fromarray(p)) for p in pixels]))
    with h5py.File(out / f"{slide_path.stem}.h5", "r") as f:
        assert set(f) == {"features", "coords"}
        assert f["coords"].dtype == np.int64 and f["features"].dtype == np.float32
        assert len(grid.positions) > 5 and f["features"].shape == (len(grid.positions), 512)
        np.testing.assert_array_equal(f["coords"][:], grid.positions)
        np.testing.assert_allclose(f["features"][:], expected, atol=1e-5)
        for attrs in (f.attrs, f["coords"].attrs):  # CLAM reads the file's, TRIDENT the coords'
            assert attrs["patch_size"] == 32 and attrs["patch_size_level0"] == 128 == grid.read.size0
        assert f["coords"].attrs["target_magnification"] == 5.0 and f["coords"].attrs["level0_magnification"] == 20.0
        assert f.attrs["mpp"] == 2.0 and f.attrs["slide_mpp"] == 0.5 and f.attrs["tissue_threshold"] == 0.5
        assert f.attrs["encoder"] == "timm:resnet18" and f.attrs["source"] == str(slide_path)
        settings = json.loads(f.attrs["settings"])
        assert settings["input_steps"] == {"crop_size": 224, "resize": 235, "interpolation": "bicubic"}
        assert json.loads(f.attrs["versions"])["timm"] == timm.__version__


def test_a_checkpoint_s_slide_features_are_the_vectors_its_index_holds(write_checkpoint, tmp_path):
    slide = plain_slide(tmp_path / "slides" / "case.png", 3)
    checkpoint = tmp_path / "se_resnet50_MSLoss_0.5000.pth"
    write_checkpoint(checkpoint, "se_resnet50", crop_size=32, attention=False)
    scale = ["--slide-mpp", "0.5", "--mpp", "2", "--device", "cpu", "--workers", "0", "--batch-size", "4"]
    assert retrieve.main(retrieve.get_args_parser().parse_args(
        ["index", str(checkpoint), str(slide), "--index", str(tmp_path / "index"), *scale])) == 0
    out = tmp_path / "features"
    assert embed("--encoder", str(checkpoint), str(slide), "--out-dir", str(out), *scale[:4]) == 0
    with SlideIndex.open(tmp_path / "index") as index:
        ids, vectors = index.source_vectors(index.source_by_path(str(slide)).id)
        patches = index.patches(ids)
        corners = np.array([[patches[i].x, patches[i].y] for i in ids], np.int64)
    with h5py.File(out / "case.h5", "r") as f:
        assert len(ids) > 3 and f.attrs["patch_size"] == 32 and f.attrs["patch_size_level0"] == 128
        np.testing.assert_array_equal(f["coords"][:], corners)
        np.testing.assert_allclose(f["features"][:], vectors, atol=1e-6)


def test_a_rerun_after_a_kill_skips_finished_slides_and_clears_leftovers(tmp_path, capsys):
    first, second = plain_slide(tmp_path / "a" / "case1.png", 1), plain_slide(tmp_path / "b" / "case2.png", 2)
    out = tmp_path / "features"
    common = ["--encoder", "histogram", "--out-dir", str(out), "--slide-mpp", "0.5", "--mpp", "2", "--patch-size", "16"]
    assert embed(str(first), str(second), *common) == 0
    finished = (out / "case1.h5").read_bytes()
    whole = h5py.File(out / "case2.h5", "r")["features"][:]
    # as a run killed while writing case2 leaves the folder: case1 done, case2 only a temporary file
    (out / "case2.h5").unlink()
    (out / ".case2.h5.k1ll3d.tmp").write_bytes(b"half an HDF5 file")
    capsys.readouterr()
    assert embed(str(first), str(second), *common) == 0
    assert f"{first}: {out / 'case1.h5'} exists, skipped (--replace writes it again)" in capsys.readouterr().out
    assert (out / "case1.h5").read_bytes() == finished
    np.testing.assert_array_equal(h5py.File(out / "case2.h5", "r")["features"][:], whole)
    assert sorted(p.name for p in out.iterdir()) == ["case1.h5", "case2.h5", "embed.json"]
    summary = json.loads((out / "embed.json").read_text())
    assert len(summary["runs"]) == 2 and set(summary["outputs"]) == {"case1", "case2"}
    assert embed(str(first), *common, "--replace") == 0  # --replace writes it again
    assert "skipped" not in capsys.readouterr().out


def test_another_encoder_into_the_same_folder_is_refused(tmp_path, capsys):
    slide = plain_slide(tmp_path / "case.png", 1)
    out = tmp_path / "features"
    common = [str(slide), "--out-dir", str(out), "--slide-mpp", "0.5", "--mpp", "2", "--patch-size", "16"]
    assert embed("--encoder", "histogram", *common) == 0
    capsys.readouterr()
    assert embed("--encoder", "histogram", "--encoder-options", '{"bins": 4}', *common) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "case.h5: made with other settings" in err and "weights_sha256" in err


def test_unknown_encoders_name_their_close_matches(tmp_path, capsys):
    slide = plain_slide(tmp_path / "case.png", 1)
    for spec, close in [("timm:vit_tiny_patch16_22", "vit_tiny_patch16_224"), ("histogam", "histogram")]:
        assert embed("--encoder", spec, "--encoder-weights", "random", str(slide), "--out-dir",
                     str(tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and close in err
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_are_refused_naming_the_file(weights, tmp_path, capsys):
    slide = plain_slide(tmp_path / "case.png", 1)
    assert embed("--encoder", "timm:resnet34", "--encoder-weights", str(weights["resnet18"]), str(slide),
                 "--out-dir", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(weights["resnet18"]) in err and "does not fit" in err
    assert not (tmp_path / "out").exists()


def test_two_sources_of_one_name_are_refused_before_anything_runs(tmp_path):
    one, two = plain_slide(tmp_path / "a" / "case.png", 1), plain_slide(tmp_path / "b" / "case.tif", 2)
    result = subprocess.run([sys.executable, str(REPO / "retrieve.py"), "embed", "--encoder", "histogram", str(one),
                             str(two), "--out-dir", str(tmp_path / "out")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {one} and {two} would both write {tmp_path / 'out' / 'case.h5'}; rename one, " \
                            "or embed them into separate --out-dir folders\n"
    assert not (tmp_path / "out").exists()


def test_unreadable_sources_are_reported_and_none_readable_is_an_error(tmp_path, capsys):
    good = plain_slide(tmp_path / "good.png", 1)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide")
    out = tmp_path / "features"
    common = ["--encoder", "histogram", "--out-dir", str(out), "--slide-mpp", "0.5", "--mpp", "2", "--patch-size", "16"]
    assert embed(str(good), str(bad), str(tmp_path / "gone.png"), *common) == 1
    err = capsys.readouterr().err
    assert f"  {bad} (" in err and f"  {tmp_path / 'gone.png'} (no such slide, image or folder)" in err
    assert sorted(p.name for p in out.iterdir()) == ["embed.json", "good.h5"]
    assert str(bad) in json.loads((out / "embed.json").read_text())["runs"][-1]["failed"]
    assert embed(str(bad), "--out-dir", str(tmp_path / "none"), *common[:2]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: none of the 1 source(s) could be embedded")
    assert not (tmp_path / "none").exists()
    assert embed(str(tmp_path / "gone.png"), "--out-dir", str(tmp_path / "none"), *common[:2]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'gone.png'}: no such slide, image or folder; nothing to " \
                                      f"embed, {tmp_path / 'none'} not created or changed\n"
