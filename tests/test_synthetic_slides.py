"""KIMIA_data/synthetic.py whole slides: both readers open them at their scale, tissue where the
regions say and glass elsewhere, a true pyramid, determinism, the slide set and its command line."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from histo_retrieval.errors import UserError
from KIMIA_data import synthetic

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = (2048, 1536)  # levels 2048, 1024 and 512 px wide
REGIONS = [(0, 100, 150, 700, 600), (1, 1100, 700, 800, 700)]
GLASS_POINT = (1900, 80)  # level-0 (x, y) outside every region
READERS = ("openslide", "tiffslide")


def open_with(reader: str, path: Path):
    module = importlib.import_module(reader)
    return module.OpenSlide(path) if reader == "openslide" else module.TiffSlide(path)


def read_rgb(slide, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    """h x w x 3 uint8 from either reader's read_region (PIL RGBA image or tiffslide's)."""
    return np.asarray(slide.read_region((x, y), level, (w, h)).convert("RGB"))


def saturation(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float64)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("slides")
    return {codec: synthetic.write_slide(root / f"{codec}.tif", REGIONS, size=SIZE, mpp=0.25, seed=5,
                                         compression=codec)
            for codec in synthetic.SLIDE_COMPRESSIONS}


@pytest.mark.parametrize("codec", synthetic.SLIDE_COMPRESSIONS)
@pytest.mark.parametrize("reader", READERS)
def test_both_readers_open_the_pyramid_at_its_scale(slides: dict[str, dict], reader: str, codec: str) -> None:
    record = slides[codec]
    with open_with(reader, Path(record["path"])) as slide:
        assert float(slide.properties[f"{reader}.mpp-x"]) == pytest.approx(0.25)
        assert float(slide.properties[f"{reader}.mpp-y"]) == pytest.approx(0.25)
        assert slide.properties[f"{reader}.vendor"] == "aperio"
        assert slide.level_count == 3
        assert [list(d) for d in slide.level_dimensions] == record["level_dimensions"]
        assert tuple(slide.level_dimensions[0]) == SIZE
        assert list(slide.level_downsamples) == pytest.approx([1.0, 2.0, 4.0])
        assert "thumbnail" in slide.associated_images
    assert record["size"] == list(SIZE) and record["mpp"] == 0.25
    assert record["unit"] == pytest.approx(synthetic.PATCH_MPP / 0.25)
    assert record["regions"] == [{"class": f"s{c}", "class_index": c, "x": x, "y": y, "w": w, "h": h}
                                 for c, x, y, w, h in REGIONS]


@pytest.mark.parametrize("codec", synthetic.SLIDE_COMPRESSIONS)
def test_regions_are_tissue_and_the_rest_is_glass(slides: dict[str, dict], codec: str) -> None:
    import openslide
    with openslide.OpenSlide(slides[codec]["path"]) as slide:
        for _, x, y, w, h in REGIONS:
            centre = read_rgb(slide, x + w // 4, y + h // 4, 0, w // 2, h // 2)
            assert saturation(centre).mean() > 40  # stained tissue (lymphoid s0, hepatocytes s1)
            assert centre.mean() < 225
        glass = read_rgb(slide, *GLASS_POINT, 0, 100, 100)
        assert saturation(glass).mean() < 5
        assert 238 <= glass.mean() <= 252 and glass.min() >= 230
        # a box's corner stays glass: the tissue outline is rounded and pulled in
        _, x, y, _, _ = REGIONS[0]
        assert saturation(read_rgb(slide, x, y, 0, 4, 4)).mean() < 5


@pytest.mark.parametrize("codec", synthetic.SLIDE_COMPRESSIONS)
def test_lower_levels_are_downsamples_and_the_readers_agree(slides: dict[str, dict], codec: str) -> None:
    path = Path(slides[codec]["path"])
    with open_with("openslide", path) as slide:
        level0 = read_rgb(slide, 0, 0, 0, *SIZE)
        level1 = read_rgb(slide, 0, 0, 1, SIZE[0] // 2, SIZE[1] // 2)
    expected = cv2.resize(level0, (SIZE[0] // 2, SIZE[1] // 2), interpolation=cv2.INTER_AREA)
    difference = np.abs(level1.astype(np.int16) - expected)
    assert difference.mean() < (1.5 if codec == "jpeg" else 0.01)
    assert np.percentile(difference, 99) <= (16 if codec == "jpeg" else 0)  # JPEG at quality 90: nuclei edges
    with open_with("openslide", path) as slide, open_with("tiffslide", path) as other:
        for level in (0, 1):
            window = (300, 200, level, 500, 400)
            assert np.array_equal(read_rgb(other, *window), read_rgb(slide, *window))


def test_same_seed_same_pixels_other_seed_other_pixels(tmp_path: Path) -> None:
    import openslide
    regions = [(2, 100, 100, 500, 400)]

    def pixels(name: str, seed: int) -> bytes:
        record = synthetic.write_slide(tmp_path / name, regions, size=(1024, 768), seed=seed)
        with openslide.OpenSlide(record["path"]) as slide:
            return read_rgb(slide, 0, 0, 0, 1024, 768).tobytes()

    first = pixels("a.tif", 7)
    assert pixels("b.tif", 7) == first
    assert pixels("c.tif", 8) != first
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, none left behind


def test_bad_regions_and_settings_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    for regions, options in [([(0, 900, 0, 200, 100)], {}), ([(99, 0, 0, 10, 10)], {}), ([(0, 0, 0)], {}),
                             ([], {"size": (100, 100)}), ([], {"mpp": 0}), ([], {"tile": 100}),
                             ([], {"levels": 20}), ([], {"compression": "lzw"})]:
        with pytest.raises(UserError):
            synthetic.write_slide(path, regions, **{"size": (1024, 768), **options})
    assert not path.exists()
    record = synthetic.write_slide(path, [], size=(1024, 768), levels=1)  # glass alone, one level
    assert record["level_dimensions"] == [[1024, 768]] and record["regions"] == []


def test_slide_set_writes_slides_and_their_regions(tmp_path: Path) -> None:
    import openslide
    out = tmp_path / "set"
    records = synthetic.write_slide_set(out, count=3, classes=2, size=(1536, 1024), mpp=0.5, seed=1)
    assert json.loads((out / "slides.json").read_text()) == records
    assert sorted(p.name for p in out.iterdir()) == ["slide_000.tif", "slide_001.tif", "slide_002.tif", "slides.json"]
    layouts = set()
    for k, record in enumerate(records):
        assert record["file"] == f"slide_{k:03d}.tif" and Path(record["path"]) == out / record["file"]
        assert 1 <= len(record["regions"]) <= 3 and record["regions"][0]["class_index"] == k % 2
        boxes = [(r["x"], r["y"], r["w"], r["h"]) for r in record["regions"]]
        layouts.add(tuple(boxes))
        for i, (x, y, w, h) in enumerate(boxes):
            assert 0 <= x and x + w <= 1536 and 0 <= y and y + h <= 1024
            for bx, by, bw, bh in boxes[i + 1:]:
                assert x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y  # apart
        with openslide.OpenSlide(out / record["file"]) as slide:
            assert slide.dimensions == (1536, 1024) and float(slide.properties["openslide.mpp-x"]) == 0.5
            for region in record["regions"]:
                x, y, w, h = (region[key] for key in "xywh")
                assert saturation(read_rgb(slide, x + w // 4, y + h // 4, 0, w // 2, h // 2)).mean() > 40
    assert len(layouts) == 3
    # a re-run replaces what the last one wrote; a folder of something else is refused
    synthetic.write_slide_set(out, count=1, size=(1024, 768))
    assert sorted(p.name for p in out.iterdir()) == ["slide_000.tif", "slides.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="other than"):
        synthetic.write_slide_set(tmp_path / "other", count=1, size=(1024, 768))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "KIMIA_data/synthetic.py", *args], check=False, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_command_line_writes_the_slide_set(tmp_path: Path) -> None:
    done = run_cli("--slides", str(tmp_path / "s"), "--slide-count", "2", "--slide-size", "1024x768",
                   "--slide-mpp", "0.25", "--classes", "2")
    assert done.returncode == 0, done.stderr
    records = json.loads((tmp_path / "s" / "slides.json").read_text())
    assert [r["file"] for r in records] == ["slide_000.tif", "slide_001.tif"]
    assert all(r["size"] == [1024, 768] and r["mpp"] == 0.25 for r in records)
    assert {r["regions"][0]["class"] for r in records} == {"s0", "s1"}
    assert not (tmp_path / "s" / "Training").exists()  # the slides instead of the patch set
    for args in (["--slides", str(tmp_path / "t"), "--slide-size", "1024by768"],
                 ["--slides", str(tmp_path / "t"), "--slide-size", "64x64"],
                 ["--slides", str(tmp_path / "t"), "--slide-mpp", "-1"],
                 ["--slides", str(tmp_path / "t"), "--slide-count", "0"],
                 ["--out", str(tmp_path / "p"), "--slide-count", "2"]):
        bad = run_cli(*args)
        assert bad.returncode == 2, args
        assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    assert not (tmp_path / "t").exists() and not (tmp_path / "p").exists()
