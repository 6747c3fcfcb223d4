"""The whole-slide search on synthetic slides: reading at a scale, tissue only, queries by region,
patch and slide, a killed run and its rerun, corrupt slides, the tiffslide fallback, torchrun shards."""
from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrieve
from histo_retrieval.search import slides as slide_module
from histo_retrieval.search.slides import Tiling, open_slide, read_patch, read_plan, tissue_grid
from KIMIA_data import synthetic

REPO = Path(__file__).resolve().parents[1]
SIZE = (1536, 1024)
MPP = "1.0"  # the index's scale: patches of 32 px cover 64 level-0 pixels of these 0.5 um/px slides


def run(*argv: str) -> int:
    return retrieve.main(retrieve.get_args_parser().parse_args([*argv]))


def cpu(*argv: str) -> list[str]:
    return [*argv, "--device", "cpu", "--workers", "0", "--batch-size", "16"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory, write_checkpoint) -> dict:
    root = tmp_path_factory.mktemp("slides")
    records = synthetic.write_slide_set(root / "slides", count=3, classes=3, size=SIZE, seed=3)
    checkpoint = root / "se_resnet50_MSLoss_0.5000.pth"
    write_checkpoint(checkpoint, "se_resnet50", crop_size=32, attention=False)
    index = root / "index"
    paths = [str(root / "slides" / r["file"]) for r in records]
    assert run(*cpu("index", str(checkpoint), *paths, "--index", str(index), "--mpp", MPP)) == 0
    return {"root": root, "records": records, "paths": paths, "checkpoint": checkpoint, "index": index}


def patch_rows(index: Path) -> list[tuple]:
    """(source path, x, y, width, height) of every patch, in id order."""
    with sqlite3.connect(index / "patches.sqlite") as db:
        return db.execute("SELECT s.path, p.x, p.y, p.width, p.height FROM patches p JOIN sources s "
                          "ON s.id = p.source_id ORDER BY s.path, p.y, p.x").fetchall()


def stored_vectors(index: Path) -> dict[str, np.ndarray]:
    from histo_retrieval.search.index import SlideIndex

    with SlideIndex.open(index) as opened:
        return {source.path: opened.source_vectors(source.id)[1] for source in opened.sources()}


def inside_any(record: dict, x: int, y: int, size: int) -> bool:
    return any(r["x"] <= x + size / 2 <= r["x"] + r["w"] and r["y"] <= y + size / 2 <= r["y"] + r["h"]
               for r in record["regions"])


def test_slides_are_read_at_the_index_scale_from_the_level_nearest_above(archive):
    with open_slide(archive["paths"][0]) as slide:
        assert slide.backend == "openslide" and slide.mpp == 0.5 and slide.level_downsamples[:2] == (1.0, 2.0)
        plan = read_plan(slide, Tiling(mpp=1.0, patch_size=32))
        assert (plan.level, plan.level_size, plan.size0) == (1, 32, 64)  # level 1 is exactly 1.0 um/px
        plan = read_plan(slide, Tiling(mpp=0.8, patch_size=32))
        assert (plan.level, plan.size0) == (0, 51)  # 0.8 lies between levels 0 and 1: read the finer
        patch = read_patch(slide, plan, 0, 0)
        assert patch.shape == (32, 32, 3) and patch.dtype == np.uint8


def test_background_is_never_indexed(archive):
    rows = patch_rows(archive["index"])
    assert rows
    by_path = {str(Path(archive["root"] / "slides" / r["file"])): r for r in archive["records"]}
    for path, x, y, width, height in rows:
        assert (width, height) == (64, 64)
        assert inside_any(by_path[path], x, y, width), f"{path} @ {x},{y} lies on glass"
    with open_slide(archive["paths"][0]) as slide:  # and most of the tissue is found
        grid = tissue_grid(slide, Tiling(1.0, 32, 0.5))
        tissue_cells = sum(inside_any(by_path[archive["paths"][0]], x, y, 64) for x, y in
                           ((x, y) for y in range(0, SIZE[1] - 63, 64) for x in range(0, SIZE[0] - 63, 64)))
        assert len(grid.positions) >= 0.7 * tissue_cells


def test_a_region_finds_its_own_location_and_its_slide_first(archive, tmp_path):
    path, x, y, width, height = patch_rows(archive["index"])[len(patch_rows(archive["index"])) // 2]
    out = tmp_path / "out"
    assert run(*cpu("query", "--index", str(archive["index"]), path, "--region", f"{x},{y},{width},{height}",
                    "--out-dir", str(out), "--top-k", "5", "--heatmap")) == 0
    with open(out / "matches.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert (first["source"], int(first["x"]), int(first["y"])) == (path, x, y)
    assert float(first["similarity"]) == pytest.approx(1.0, abs=1e-5)
    assert first["mpp"] == "1.0" and first["query"] == f"{path}@{x},{y},{width},{height}"
    with open(out / "slides.csv", newline="") as f:
        assert next(csv.DictReader(f))["source"] == path
    figure = next(out.glob("000_*.png"))
    with Image.open(figure) as image:
        assert image.size[0] > 600 and image.size[1] > 400  # matches, then slide thumbnails


def test_a_larger_region_is_tiled_and_ranks_its_slide_first(archive, tmp_path):
    path, x, y, _, _ = patch_rows(archive["index"])[0]
    out = tmp_path / "out"
    assert run(*cpu("query", "--index", str(archive["index"]), path, "--region", f"{x},{y},128,128",
                    "--out-dir", str(out), "--top-k", "3")) == 0
    with open(out / "matches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({(r["query_x"], r["query_y"]) for r in rows}) == 4  # a 2 x 2 grid of 64 px patches
    with open(out / "slides.csv", newline="") as f:
        assert next(csv.DictReader(f))["source"] == path


def test_an_image_cut_from_a_slide_finds_that_location(archive, tmp_path):
    path, x, y, width, _ = patch_rows(archive["index"])[5]
    with open_slide(path) as slide:
        pixels = read_patch(slide, read_plan(slide, Tiling(1.0, 32)), x, y)
    query = tmp_path / "cut.png"
    Image.fromarray(pixels).save(query)
    out = tmp_path / "out"
    assert run(*cpu("query", "--index", str(archive["index"]), str(query), "--out-dir", str(out))) == 0
    with open(out / "matches.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert (first["source"], int(first["x"]), int(first["y"])) == (path, x, y)


def test_a_whole_slide_query_never_returns_its_own_slide(archive, tmp_path):
    own = archive["paths"][1]
    out = tmp_path / "out"
    assert run(*cpu("query", "--index", str(archive["index"]), own, "--out-dir", str(out), "--top-k", "3")) == 0
    with open(out / "matches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "slides.csv", newline="") as f:
        ranked = [r["source"] for r in csv.DictReader(f)]
    count = sum(1 for r in patch_rows(archive["index"]) if r[0] == own)
    assert len(rows) == 3 * count and own not in {r["source"] for r in rows}
    assert own not in ranked and set(ranked) <= set(archive["paths"])


def test_tiffslide_reads_the_same_patches_when_openslide_is_missing(archive, tmp_path, monkeypatch):
    monkeypatch.setattr(slide_module, "_openslide", lambda: None)
    with open_slide(archive["paths"][0]) as slide:
        assert slide.backend == "tiffslide" and slide.mpp == 0.5
    index = tmp_path / "index"
    assert run(*cpu("index", str(archive["checkpoint"]), archive["paths"][0], "--index", str(index),
                    "--mpp", MPP)) == 0
    ours = [r for r in patch_rows(archive["index"]) if r[0] == archive["paths"][0]]
    assert patch_rows(index) == ours
    np.testing.assert_allclose(stored_vectors(index)[archive["paths"][0]],
                               stored_vectors(archive["index"])[archive["paths"][0]], atol=1e-5)


def test_a_slide_without_scale_is_refused_unless_slide_mpp_gives_it(archive, tmp_path, capsys):
    plain = tmp_path / "plain.png"
    with open_slide(archive["paths"][0]) as slide:
        Image.fromarray(slide.read(0, 0, 1, SIZE[0] // 2, SIZE[1] // 2)).save(plain)  # level 1: 1.0 um/px
    index = tmp_path / "index"
    assert run(*cpu("index", str(archive["checkpoint"]), str(plain), "--index", str(index), "--mpp", MPP)) == 1
    assert "gives no scale (microns per pixel); pass it with --slide-mpp" in capsys.readouterr().err
    assert run(*cpu("index", str(archive["checkpoint"]), str(plain), "--index", str(index), "--mpp", MPP,
                    "--slide-mpp", "1.0")) == 0
    plain_rows = {(2 * x, 2 * y) for _, x, y, _, _ in patch_rows(index)}  # in the slide's level 0
    assert plain_rows and all(w == 32 for _, _, _, w, _ in patch_rows(index))  # 32 px of a 1.0 um/px image
    original = {(x, y) for p, x, y, _, _ in patch_rows(archive["index"]) if p == archive["paths"][0]}
    assert len(plain_rows & original) >= 0.8 * len(original)


def test_a_corrupt_slide_is_named_skipped_and_the_others_indexed(archive, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(Path(archive["paths"][0]).read_bytes()[:5000])
    index = tmp_path / "index"
    assert run(*cpu("index", str(archive["checkpoint"]), str(corrupt), archive["paths"][2], "--index", str(index),
                    "--mpp", MPP)) == 1
    err = capsys.readouterr().err
    assert "1 source(s) could not be indexed:" in err and str(corrupt) in err
    assert {r[0] for r in patch_rows(index)} == {archive["paths"][2]}
    assert run("list", "--index", str(index), "--failed") == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if str(corrupt) in line]
    assert len(listed) == 1 and "failed: " in listed[0]


def test_replace_reindexes_a_slide_without_duplicates(archive, tmp_path):
    index = tmp_path / "index"
    path = archive["paths"][0]
    for extra in ((), ("--replace",)):
        assert run(*cpu("index", str(archive["checkpoint"]), path, "--index", str(index), "--mpp", MPP, *extra)) == 0
    ours = [r for r in patch_rows(archive["index"]) if r[0] == path]
    assert patch_rows(index) == ours
    with sqlite3.connect(index / "patches.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM sources").fetchone()[0] == 1


@pytest.mark.slow
def test_a_killed_index_run_and_its_rerun_give_the_uninterrupted_index(archive, tmp_path):
    index = tmp_path / "index"
    command = [sys.executable, str(REPO / "retrieve.py"), *cpu("index", str(archive["checkpoint"]), *archive["paths"],
                                                                "--index", str(index), "--mpp", MPP), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its loader workers die with it
    deadline = time.time() + 240
    try:
        while time.time() < deadline and process.poll() is None:  # kill it once one slide is in
            try:
                with sqlite3.connect(f"file:{index / 'patches.sqlite'}?mode=ro", uri=True) as db:
                    if db.execute("SELECT COUNT(*) FROM sources").fetchone()[0] >= 1:
                        break
            except sqlite3.OperationalError:
                pass
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    partial = patch_rows(index)
    assert 0 < len({r[0] for r in partial}) < 3, "the run was not stopped half-way"
    assert run("list", "--index", str(index)) == 0  # the stopped index opens and answers
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    assert patch_rows(index) == patch_rows(archive["index"])
    for path, vectors in stored_vectors(archive["index"]).items():
        np.testing.assert_allclose(stored_vectors(index)[path], vectors, atol=1e-5)
    with sqlite3.connect(index / "patches.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM patches").fetchone()[0] == len(patch_rows(archive["index"]))


@pytest.mark.slow
def test_torchrun_shards_merge_into_the_single_process_index(archive, tmp_path):
    index = tmp_path / "index"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
               str(REPO / "retrieve.py"), *cpu("index", str(archive["checkpoint"]), *archive["paths"],
                                               "--index", str(index), "--mpp", MPP)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert patch_rows(index) == patch_rows(archive["index"])
    assert not list((index / "shards").glob("*.sqlite"))
    for path, vectors in stored_vectors(archive["index"]).items():
        np.testing.assert_allclose(stored_vectors(index)[path], vectors, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_a_region_and_forget_a_removed_slide(archive, tmp_path, kind):
    from histo_retrieval.search import vector_index
    from histo_retrieval.search.index import SlideIndex

    index = tmp_path / kind
    assert run(*cpu("index", str(archive["checkpoint"]), *archive["paths"], "--index", str(index), "--mpp", MPP,
                    "--index-type", kind)) == 0
    with SlideIndex.open(index) as opened:
        assert vector_index.index_kind(opened.vectors) == kind  # IVF trained when the first run closed
        assert opened.vectors.ntotal == len(patch_rows(archive["index"]))
    path, x, y, width, height = [r for r in patch_rows(index) if r[0] == archive["paths"][2]][3]
    out = tmp_path / "out"
    search = cpu("query", "--index", str(index), path, "--region", f"{x},{y},{width},{height}", "--out-dir", str(out),
                 "--top-k", "5", "--nprobe", "1000", "--ef-search", "512")
    assert run(*search) == 0
    with open(out / "matches.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert (first["source"], int(first["x"]), int(first["y"])) == (path, x, y)
    assert run("remove", "--index", str(index), path) == 0
    with SlideIndex.open(index) as opened:
        assert vector_index.index_kind(opened.vectors) == kind
        assert opened.vectors.ntotal == len(patch_rows(index))
    assert run(*search) == 0
    with open(out / "matches.csv", newline="") as f:
        assert path not in {row["source"] for row in csv.DictReader(f)}


def test_the_fast_paths_of_reading_give_the_same_pixels(archive):
    """Slide.read skips the composite where every pixel is scanned, and the index cuts its eval crop
    from the array: both exactly as the general path (composite, then CenterCrop through PIL)."""
    from histo_retrieval.data.datasets import eval_crop, eval_crop_array

    with open_slide(archive["paths"][0]) as slide:
        for x, y, level, size in ((0, 0, 0, 64), (300, 200, 1, 50), (1500, 1000, 0, 40)):  # the last crosses the edge
            region = slide.handle.read_region((x, y), level, (size, size))
            rgba = np.asarray(region).astype(np.uint16)
            general = (rgba[..., :3] * rgba[..., 3:] // 255 + (255 - rgba[..., 3:])).astype(np.uint8)
            assert np.array_equal(slide.read(x, y, level, size, size), general)
    rng = np.random.default_rng(0)
    for height, width, crop in ((64, 64, 32), (65, 70, 32), (33, 40, 32), (32, 32, 32), (20, 40, 32)):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        assert torch.equal(eval_crop_array(pixels, crop), eval_crop(crop)(Image.fromarray(pixels)))
