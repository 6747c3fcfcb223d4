"""Yottixel's mosaic (histo_retrieval.search.mosaic): deterministic for a seed, every colour cluster
covered, the documented size, chosen from the thumbnail alone, and slides with few patches."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from sklearn.cluster import KMeans

from histo_retrieval.errors import UserError
from histo_retrieval.search.mosaic import (N_INIT, MosaicSettings, cluster_share, colour_clusters, mosaic_grid,
                                           patch_colours, select_mosaic, slide_mosaic)
from histo_retrieval.search.slides import ReadPlan, TissueGrid, Tiling, open_slide, tissue_grid
from KIMIA_data import synthetic

TILING = Tiling(1.0, 32, 0.5)  # 64 level-0 pixels a patch on these 0.5 um/px slides


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mosaic")
    records = synthetic.write_slide_set(root, count=1, classes=3, size=(1536, 1024), seed=3)
    return str(root / records[0]["file"])


@pytest.fixture(scope="module")
def grid(slide_path) -> TissueGrid:
    with open_slide(slide_path) as slide:
        return tissue_grid(slide, TILING)


def hand_grid(colours: dict[tuple[int, int], tuple[int, int, int]], cell: int = 8, size0: int = 64) -> TissueGrid:
    """A grid whose patch at grid cell (column, row) has a thumbnail footprint of one colour."""
    columns, rows = max(c for c, _ in colours) + 1, max(r for _, r in colours) + 1
    thumbnail = np.full((rows * cell, columns * cell, 3), 255, np.uint8)
    cells = sorted(colours, key=lambda cr: (cr[1], cr[0]))  # row by row, as tissue_grid lays them out
    for column, row in cells:
        thumbnail[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell] = colours[column, row]
    positions = np.array([[column * size0, row * size0] for column, row in cells], np.int64)
    return TissueGrid(positions, np.ones(len(cells), np.float32), ReadPlan(0, size0, size0, 32), thumbnail,
                      size0 / cell)


def naive_colours(grid: TissueGrid) -> np.ndarray:
    """Each patch's mean RGB, cropped from the thumbnail one by one."""
    d, size0 = grid.thumbnail_downsample, grid.read.size0
    out = []
    for x, y in grid.positions:
        left, top = round(x / d), round(y / d)
        right, bottom = max(round((x + size0) / d), left + 1), max(round((y + size0) / d), top + 1)
        out.append(grid.thumbnail[top:bottom, left:right].reshape(-1, 3).astype(np.float64).mean(0))
    return np.array(out)


def naive_share(size: int, percent: float) -> int:
    return max(1, math.ceil(Fraction(str(percent)) * size / 100))


def test_the_colour_of_a_patch_is_the_mean_of_its_thumbnail_footprint(grid):
    assert len(grid.positions) > 20
    np.testing.assert_allclose(patch_colours(grid), naive_colours(grid), atol=1e-9)


def test_the_same_seed_gives_the_same_mosaic_and_another_seed_may_not(grid):
    first = select_mosaic(grid, MosaicSettings(seed=0))
    assert np.array_equal(first, select_mosaic(grid, MosaicSettings(seed=0)))
    assert np.all(np.diff(first) > 0)  # in the grid's order, no patch twice
    others = [select_mosaic(grid, MosaicSettings(seed=seed)) for seed in range(1, 6)]
    assert any(not np.array_equal(first, other) for other in others)


@pytest.mark.parametrize("settings", [MosaicSettings(), MosaicSettings(3, 30.0, 1), MosaicSettings(5, 12.5, 7)])
def test_every_colour_cluster_gives_its_documented_share(grid, settings):
    chosen = select_mosaic(grid, settings)
    k = min(settings.clusters, len(grid.positions))
    labels = KMeans(n_clusters=k, random_state=settings.seed, n_init=N_INIT).fit(naive_colours(grid)).labels_
    assert np.array_equal(labels, colour_clusters(grid, settings))
    sizes = np.bincount(labels)
    picked = np.bincount(labels[chosen], minlength=len(sizes))
    assert all(picked[c] >= 1 for c in range(len(sizes)) if sizes[c])  # every colour cluster is covered
    assert picked.tolist() == [naive_share(int(n), settings.percent) if n else 0 for n in sizes]
    assert len(chosen) == sum(naive_share(int(n), settings.percent) for n in sizes if n)


@pytest.mark.parametrize("size,percent,share", [(1, 5, 1), (19, 5, 1), (20, 5, 1), (21, 5, 2), (100, 5, 5),
                                                (101, 5, 6), (40, 50, 20), (41, 50, 21), (7, 100, 7),
                                                (3, 0.1, 1)])
def test_a_cluster_gives_max_1_ceil_percent_of_its_patches(size, percent, share):
    assert cluster_share(size, percent) == share == naive_share(size, percent)


def test_the_nearest_patch_to_each_position_centroid_is_chosen():
    # one colour; 5 x 4 patches; 10% of 20 = 2 position clusters: the left and right halves,
    # whose centroids lie between patches: the nearest one first in the grid is chosen
    grid = hand_grid({(c, r): (200, 50, 120) for c in range(4) for r in range(5)})
    chosen = select_mosaic(grid, MosaicSettings(clusters=1, percent=10))
    labels = KMeans(n_clusters=2, random_state=0, n_init=N_INIT).fit(grid.positions + 32.0)
    expected = []
    for centroid in labels.cluster_centers_:
        distances = ((grid.positions + 32.0 - centroid) ** 2).sum(1)
        expected.append(int(np.flatnonzero(distances == distances.min())[0]))
    assert chosen.tolist() == sorted(expected)


def test_three_colours_give_patches_of_each_spread_over_the_slide():
    colours = {}
    for c in range(10):
        for r in range(6):
            colours[c, r] = (220, 80, 160) if r < 2 else (120, 40, 150) if r < 5 else (240, 200, 210)
    grid = hand_grid(colours)
    chosen = select_mosaic(grid, MosaicSettings(clusters=3, percent=10))
    rows = grid.positions[chosen, 1] // 64
    # 20, 30 and 10 patches: 2, 3 and 1 chosen, from rows 0-1, 2-4 and 5
    assert [int(np.sum(rows < 2)), int(np.sum((rows >= 2) & (rows < 5))), int(np.sum(rows == 5))] == [2, 3, 1]


def test_a_slide_with_fewer_patches_than_clusters_keeps_one_per_colour():
    grid = hand_grid({(0, 0): (250, 0, 0), (1, 0): (0, 250, 0), (2, 1): (0, 0, 250), (3, 1): (250, 250, 0)})
    chosen = select_mosaic(grid, MosaicSettings(clusters=9))
    assert chosen.tolist() == [0, 1, 2, 3]
    one = hand_grid({(2, 3): (250, 0, 0)})
    assert select_mosaic(one, MosaicSettings()).tolist() == [0]
    same = hand_grid({(c, 0): (250, 0, 0) for c in range(3)})  # three patches of one colour: one cluster
    assert len(select_mosaic(same, MosaicSettings())) == 1
    empty = TissueGrid(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), ReadPlan(0, 64, 64, 32),
                       np.zeros((8, 8, 3), np.uint8), 8.0)
    assert len(select_mosaic(empty, MosaicSettings())) == 0


def test_choosing_a_mosaic_reads_the_thumbnail_only(slide_path, grid):
    expected = select_mosaic(grid, MosaicSettings())
    with open_slide(slide_path) as slide:
        levels = []
        real_read = slide.read

        def read(x, y, level, width, height):
            if level == 0:
                raise AssertionError(f"a level-0 read at {x},{y}")
            levels.append(level)
            return real_read(x, y, level, width, height)

        slide.read = read
        small = slide_mosaic(slide, TILING, MosaicSettings())
        assert levels and 0 not in levels
        thumbnail = slide.thumbnail(grid.thumbnail_downsample)

        def refuse(*args):
            raise AssertionError("a read outside the thumbnail")

        slide.read, slide.thumbnail = refuse, lambda downsample: thumbnail  # nothing but the thumbnail
        again = slide_mosaic(slide, TILING, MosaicSettings())
    assert np.array_equal(small.positions, grid.positions[expected])
    assert np.array_equal(again.positions, small.positions) and np.array_equal(again.tissue, grid.tissue[expected])


def test_mosaic_grid_keeps_the_plan_and_thumbnail(grid):
    small = mosaic_grid(grid, MosaicSettings())
    assert small.read == grid.read and small.thumbnail is grid.thumbnail
    assert len(small.positions) == len(small.tissue) < len(grid.positions)


@pytest.mark.parametrize("settings,message", [(MosaicSettings(clusters=0), "--mosaic-clusters must be at least 1"),
                                              (MosaicSettings(percent=0), "--mosaic-percent"),
                                              (MosaicSettings(percent=101), "--mosaic-percent")])
def test_bad_settings_are_refused(grid, settings, message):
    with pytest.raises(UserError, match=message):
        select_mosaic(grid, settings)


# ----------------------------------------------------------------------------- retrieve.py --mosaic
def run(*argv: str) -> int:
    import retrieve

    return retrieve.main(retrieve.get_args_parser().parse_args([*argv]))


def cpu(*argv: str) -> list[str]:
    """A run on the CPU; `index` with the colour histogram, at TILING's scale."""
    tiling = ["--encoder", "histogram", "--mpp", "1.0", "--patch-size", "32"] if argv[0] == "index" else []
    return [*argv, *tiling, "--device", "cpu", "--workers", "0", "--batch-size", "16"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("mosaic_slides")
    records = synthetic.write_slide_set(root, count=2, classes=3, size=(1536, 1024), seed=5)
    return [str(root / r["file"]) for r in records]


def indexed_boxes(index) -> dict[str, list[tuple[int, int, int, int]]]:
    import sqlite3

    with sqlite3.connect(index / "patches.sqlite") as db:
        rows = db.execute("SELECT s.path, p.x, p.y, p.width, p.height FROM patches p JOIN sources s "
                          "ON s.id = p.source_id ORDER BY p.id").fetchall()
    out: dict[str, list] = {}
    for path, *box in rows:
        out.setdefault(path, []).append(tuple(box))
    return out


def expected_boxes(path: str, settings: MosaicSettings | None) -> list[tuple[int, int, int, int]]:
    with open_slide(path) as slide:
        grid = tissue_grid(slide, TILING) if settings is None else slide_mosaic(slide, TILING, settings)
    return [(int(x), int(y), 64, 64) for x, y in grid.positions]


def test_an_index_built_with_mosaic_holds_each_slides_mosaic_and_says_so(slides, tmp_path, capsys):
    import json

    index = tmp_path / "mosaic_index"
    assert run(*cpu("index", *slides, "--index", str(index), "--mosaic", "--mosaic-percent", "10",
                    "--mosaic-seed", "2")) == 0
    held = indexed_boxes(index)
    settings = MosaicSettings(9, 10.0, 2)
    assert held == {path: expected_boxes(path, settings) for path in slides}
    assert all(len(held[path]) < len(expected_boxes(path, None)) for path in slides)
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["mosaic"] == {"clusters": 9, "percent": 10.0, "seed": 2}
    run("list", "--index", str(index))
    assert "each slide's mosaic only (9 colour clusters, 10% of each, seed 2)" in capsys.readouterr().out
    # adding with other mosaic settings, or none, is refused like any other setting
    with pytest.raises(UserError, match=r"refusing to mix: --mosaic off \(the index has on \(9 colour clusters, "
                                        r"10% of each, seed 2\)\)"):
        run(*cpu("index", slides[0], "--index", str(index), "--replace"))
    with pytest.raises(UserError, match=r"refusing to mix: --mosaic on \(9 colour clusters, 10% of each, seed 3\) "):
        run(*cpu("index", slides[0], "--index", str(index), "--mosaic", "--mosaic-percent", "10", "--mosaic-seed", "3"))
    assert indexed_boxes(index) == held


def test_an_index_without_mosaic_holds_every_tissue_patch_and_no_mosaic_key(slides, tmp_path):
    import json

    index = tmp_path / "full_index"
    assert run(*cpu("index", *slides, "--index", str(index))) == 0
    assert indexed_boxes(index) == {path: expected_boxes(path, None) for path in slides}
    assert "mosaic" not in json.loads((index / "manifest.json").read_text())
    with pytest.raises(UserError, match=r"refusing to mix: --mosaic on \(9 colour clusters, 5% of each, seed 0\) "
                                        r"\(the index has off\)"):
        run(*cpu("index", slides[0], "--index", str(index), "--mosaic"))


def test_a_mosaic_query_searches_a_full_index_with_the_slides_mosaic(slides, tmp_path):
    import csv

    index, out = tmp_path / "full_index", tmp_path / "out"
    assert run(*cpu("index", slides[1], "--index", str(index))) == 0
    assert run(*cpu("query", slides[0], "--index", str(index), "--out-dir", str(out), "--top-k", "3",
                    "--mosaic")) == 0
    with open(out / "matches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    queried = sorted({(int(r["query_x"]), int(r["query_y"])) for r in rows})
    assert queried == sorted((x, y) for x, y, _, _ in expected_boxes(slides[0], MosaicSettings()))
    assert len(rows) == 3 * len(queried) and {r["source"] for r in rows} == {slides[1]}
    with open(out / "slides.csv", newline="") as f:
        assert [r["source"] for r in csv.DictReader(f)] == [slides[1]]


def test_mosaic_settings_without_mosaic_and_with_a_region_are_refused(slides, tmp_path):
    with pytest.raises(UserError, match=r"--mosaic-clusters, --mosaic-seed given without --mosaic"):
        run(*cpu("index", slides[0], "--index", str(tmp_path / "x"), "--mosaic-clusters", "4", "--mosaic-seed", "1"))
    with pytest.raises(UserError, match=r"--mosaic-percent is a share of each cluster's patches, above 0 and at most 100, got 0.0"):
        run(*cpu("index", slides[0], "--index", str(tmp_path / "x"), "--mosaic", "--mosaic-percent", "0"))
    with pytest.raises(UserError, match="drop one of the two"):
        run("query", slides[0], "--index", str(tmp_path / "x"), "--mosaic", "--region", "0,0,64,64")
    assert not (tmp_path / "x").exists()
