"""Which file the viewer shows for a slide id: a removed slide's id is never given again, a slide kept
open is checked against the index's record of its id and against its file before every read, a file
changed since it was indexed is refused (HTTP 409, and no patch of it drawn by `query`) rather than
mixed with the index, and a plain image is decoded once, not for every patch image or region search."""
from __future__ import annotations

import csv
import io
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from openslide import OpenSlide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

import retrieve
from histo_retrieval.search import app as server
from histo_retrieval.search import service as search_service
from histo_retrieval.search import slides as slide_module
from histo_retrieval.search.service import TILE_QUALITY, SearchService, jpeg_bytes
from histo_retrieval.search.index import SlideChanged, SlideIndex, file_stat
from histo_retrieval.search.queries import patch_pixels
from histo_retrieval.search.slides import best_level, open_slide, read_scaled
from KIMIA_data import synthetic

SIZE = (1024, 768)
MPP = "1.0"  # patches of 32 px cover 64 level-0 pixels of these 0.5 um/px slides
DEEPEST = 10  # 2**10 >= 1024: the full-resolution Deep Zoom level
CHANGED = "changed since it was indexed"


def run(*argv: str) -> int:
    return retrieve.main(retrieve.get_args_parser().parse_args([*argv]))


def cpu(*argv: str) -> list[str]:
    return [*argv, "--device", "cpu", "--workers", "0", "--batch-size", "16"]


@pytest.fixture(scope="module")
def material(tmp_path_factory, write_checkpoint) -> dict:
    root = tmp_path_factory.mktemp("identity")
    records = synthetic.write_slide_set(root / "slides", count=3, classes=3, size=SIZE, seed=11)
    checkpoint = root / "se_resnet50_MSLoss_0.5000.pth"
    write_checkpoint(checkpoint, "se_resnet50", crop_size=32, attention=False)
    return {"root": root, "checkpoint": checkpoint, "slides": [str(root / "slides" / r["file"]) for r in records]}


def index_slides(material: dict, index: Path, *paths, extra: tuple[str, ...] = ()) -> int:
    return run(*cpu("index", str(material["checkpoint"]), *map(str, paths), "--index", str(index), "--mpp", MPP,
                    *extra))


def source_ids(index: Path) -> dict[str, int]:
    with sqlite3.connect(index / "patches.sqlite") as db:
        return dict(db.execute("SELECT path, id FROM sources"))


def patches_of(index: Path, source_id: int) -> list[tuple[int, int, int, int, int]]:
    """(id, x, y, width, height) of a source's patches."""
    with sqlite3.connect(index / "patches.sqlite") as db:
        return db.execute("SELECT id, x, y, width, height FROM patches WHERE source_id = ? ORDER BY id",
                          (source_id,)).fetchall()


def shown(response) -> bytes:
    assert response.status_code == 200, response.text
    return response.content


def file_tiles(path: str) -> DeepZoomGenerator:
    """The Deep Zoom tiles of a slide file, read from it directly."""
    return DeepZoomGenerator(OpenSlide(path), 254, 1, limit_bounds=False)


def file_tile(tiles: DeepZoomGenerator, level: int, col: int, row: int) -> bytes:
    """A tile read from the file directly, encoded as the service encodes its tiles."""
    return jpeg_bytes(tiles.get_tile(level, (col, row)), TILE_QUALITY)


def file_patch(path: str, box: tuple[int, int, int, int], size: int = 32, fallback_mpp: float | None = None) -> bytes:
    """A patch read from the file directly, encoded as the service encodes patch images."""
    x, y, width, height = box
    with open_slide(path, fallback_mpp) as slide:
        level = best_level(slide.level_downsamples, width / size)
        return jpeg_bytes(read_scaled(slide, level, x, y, width, height, size, size), max_side=256)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).mean())


def tile_url(source_id: int, level: int, col: int, row: int) -> str:
    return f"/api/slides/{source_id}/image_files/{level}/{col}_{row}.jpeg"


def open_client(index: Path):
    service = SearchService.open(str(index), "cpu", batch_size=16)
    return service, TestClient(server.create_app(service, allowed_hosts=["testserver"]))


# ----------------------------------------------------------------------------- ids never reused
def test_a_removed_slides_id_is_never_given_again_nor_its_tiles_served(material, tmp_path):
    index = tmp_path / "index"
    first, second, third = material["slides"]
    assert index_slides(material, index, first, second) == 0
    service, client = open_client(index)  # open across the remove and the index run, as a running server
    try:
        old = source_ids(index)[second]
        assert old == max(source_ids(index).values())
        old_patch = patches_of(index, old)[0][0]
        for level, col, row in ((DEEPEST, 0, 0), (DEEPEST, 1, 1), (DEEPEST - 3, 0, 0)):
            shown(client.get(tile_url(old, level, col, row)))  # the old slide is open in the service now
        shown(client.get(f"/api/patches/{old_patch}/image.jpeg"))

        assert run("remove", "--index", str(index), second) == 0
        assert index_slides(material, index, third) == 0
        new = source_ids(index)[third]
        assert new != old and new > old

        for url in (f"/api/slides/{old}", f"/api/slides/{old}/image.dzi", tile_url(old, DEEPEST, 1, 1),
                    f"/api/slides/{old}/thumbnail.jpeg", f"/api/patches/{old_patch}/image.jpeg"):
            response = client.get(url)
            assert response.status_code == 404 and "no such" in response.json()["detail"], url

        dzi = client.get(f"/api/slides/{new}/image.dzi").text
        assert f'Width="{SIZE[0]}" Height="{SIZE[1]}"' in dzi
        new_tiles, old_tiles = file_tiles(third), file_tiles(second)
        apart = []
        for level in (DEEPEST, DEEPEST - 3):
            cols, rows = new_tiles.level_tiles[level]
            for col in range(cols):
                for row in range(rows):
                    served = shown(client.get(tile_url(new, level, col, row)))
                    assert served == file_tile(new_tiles, level, col, row)
                    apart.append(difference(pixels(served), pixels(file_tile(old_tiles, level, col, row))))
        assert max(apart) > 20  # the two slides differ: the tiles above could not be the old ones

        downsample = service.index.thumbnail(new).downsample
        thumbnail = pixels(shown(client.get(f"/api/slides/{new}/thumbnail.jpeg")))
        with open_slide(third) as slide:
            expected = slide.thumbnail(downsample).astype(np.float64)
        assert difference(thumbnail, expected) < 6  # the index's JPEG of it

        patches = patches_of(index, new)
        assert patches and min(p[0] for p in patches) > old_patch
        for patch_id, *box in patches[::3]:
            assert shown(client.get(f"/api/patches/{patch_id}/image.jpeg")) == file_patch(third, box)
    finally:
        client.close()
        service.close()


def test_a_slide_kept_open_is_checked_against_the_indexs_record_of_its_id(material, tmp_path):
    """An index written before ids were kept unique may have given a removed slide's id to another
    file: the slide kept open under that id must not answer for it."""
    index = tmp_path / "index"
    first, second, third = material["slides"]
    assert index_slides(material, index, first, second) == 0
    service, client = open_client(index)
    try:
        reused = source_ids(index)[second]
        shown(client.get(tile_url(reused, DEEPEST, 1, 1)))  # kept open now
        size, mtime = file_stat(third)
        with sqlite3.connect(index / "patches.sqlite") as db:  # as an old `remove` and `index` left it
            db.execute("UPDATE sources SET path = ?, file_size = ?, mtime = ? WHERE id = ?",
                       (third, size, mtime, reused))
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        served = shown(client.get(tile_url(reused, DEEPEST, 1, 1)))
        assert served == file_tile(file_tiles(third), DEEPEST, 1, 1) != file_tile(file_tiles(second), DEEPEST, 1, 1)
    finally:
        client.close()
        service.close()


def test_an_index_without_the_id_counter_still_never_gives_an_id_twice(material, tmp_path):
    """Index folders from before the counter: their sources table is as it was (no AUTOINCREMENT)."""
    index = tmp_path / "index"
    first, second, third = material["slides"]
    assert index_slides(material, index, first, second) == 0
    with sqlite3.connect(index / "patches.sqlite") as db:
        db.execute("DELETE FROM meta WHERE key = 'next_source_id'")
    removed = source_ids(index)[second]
    assert removed == max(source_ids(index).values())
    assert run("remove", "--index", str(index), second) == 0
    assert index_slides(material, index, third) == 0
    assert source_ids(index)[third] > removed
    assert index_slides(material, index, second) == 0
    assert source_ids(index)[second] > source_ids(index)[third]


# ----------------------------------------------------------------------------- a slide file changed
def replace_in_place(path: Path, source: str) -> None:
    """Another image at the same path (a new export of the scan), with a later modification time."""
    before = os.stat(path)
    shutil.copyfile(source, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))


def test_a_slide_changed_since_it_was_indexed_answers_409_until_it_is_indexed_again(material, tmp_path):
    first, second, third = material["slides"]
    slide = tmp_path / "case.tif"
    shutil.copyfile(first, slide)
    index = tmp_path / "index"
    assert index_slides(material, index, slide, second) == 0
    service, client = open_client(index)
    try:
        sid = source_ids(index)[str(slide)]
        patch_id, *box = patches_of(index, sid)[5]
        shown(client.get(tile_url(sid, DEEPEST, 1, 1)))  # kept open now
        shown(client.get(f"/api/patches/{patch_id}/image.jpeg"))
        replace_in_place(slide, third)

        region = {"slide_id": sid, "x": box[0], "y": box[1], "width": 64, "height": 64}
        for response in (client.get(tile_url(sid, DEEPEST, 1, 1)), client.get(tile_url(sid, DEEPEST, 2, 2)),
                         client.get(f"/api/slides/{sid}/image.dzi"), client.get(f"/api/patches/{patch_id}/image.jpeg"),
                         client.post("/api/search/region", json=region)):
            assert response.status_code == 409, response.text
            detail = response.json()["detail"]
            assert CHANGED in detail and "--replace" in detail and "case.tif" in detail
        # What the index itself holds is still listed and shown.
        assert client.get(f"/api/slides/{sid}").status_code == 200
        assert client.get(f"/api/slides/{sid}/thumbnail.jpeg").status_code == 200

        assert index_slides(material, index, slide, extra=("--replace",)) == 0  # what the message says to do
        again = source_ids(index)[str(slide)]
        assert again > sid
        assert client.get(tile_url(sid, DEEPEST, 1, 1)).status_code == 404
        assert shown(client.get(tile_url(again, DEEPEST, 1, 1))) == file_tile(file_tiles(third), DEEPEST, 1, 1)
        patch_id, *box = patches_of(index, again)[0]
        assert shown(client.get(f"/api/patches/{patch_id}/image.jpeg")) == file_patch(third, box)
        assert client.post("/api/search/region", json={**region, "slide_id": again}).status_code == 200
    finally:
        client.close()
        service.close()


def test_query_draws_no_patch_of_a_changed_slide_and_searches_it_as_a_new_slide(material, tmp_path, capsys):
    first, second, _ = material["slides"]
    slide = tmp_path / "case.tif"
    shutil.copyfile(first, slide)
    index = tmp_path / "index"
    assert index_slides(material, index, slide, second) == 0
    with SlideIndex.open(index) as opened:
        patch = opened.patches([patches_of(index, source_ids(index)[str(slide)])[5][0]]).popitem()[1]
        Image.fromarray(patch_pixels(opened, patch)).save(tmp_path / "query.png")
    before = os.stat(slide)  # the same pixels, touched: the index cannot tell it is the same image
    os.utime(slide, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    with SlideIndex.open(index) as opened, pytest.raises(SlideChanged, match=CHANGED):
        patch_pixels(opened, patch)
    capsys.readouterr()

    out = tmp_path / "patch_query"
    assert run(*cpu("query", "--index", str(index), str(tmp_path / "query.png"), "--top-k", "3",
                    "--out-dir", str(out))) == 0
    err = capsys.readouterr().err
    assert f"note: {slide}: the slide {CHANGED}" in err and "--replace" in err and "not drawn" in err
    with open(out / "matches.csv", newline="") as f:
        best = next(csv.DictReader(f))
    assert (best["source"], int(best["x"]), int(best["y"])) == (str(slide), patch.x, patch.y)  # still listed
    assert (out / "000_query.png").stat().st_size > 0

    out = tmp_path / "slide_query"
    assert run(*cpu("query", "--index", str(index), str(slide), "--top-k", "1", "--out-dir", str(out))) == 0
    assert "searched as a new slide" in capsys.readouterr().err
    with open(out / "matches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(patches_of(index, source_ids(index)[str(slide)]))
    # Not left out of its own search: each patch finds itself, as in any other slide.
    assert all((r["source"], r["x"], r["y"]) == (str(slide), r["query_x"], r["query_y"]) for r in rows)


# ----------------------------------------------------------------------------- plain images
@pytest.fixture(scope="module")
def plain(material, tmp_path_factory) -> dict:
    """Two plain-image slides (PNG, no scale in the file: indexed with --slide-mpp 0.5)."""
    root = tmp_path_factory.mktemp("plain")
    images = []
    for number, source in enumerate(material["slides"][:2]):
        with open_slide(source) as slide:
            images.append(str(root / f"plain_{number}.png"))
            Image.fromarray(slide.read(0, 0, 0, *SIZE)).save(images[-1])
    index = root / "index"
    assert index_slides(material, index, *images, extra=("--slide-mpp", "0.5")) == 0
    return {"images": images, "index": index}


def test_a_plain_image_is_decoded_once_for_its_tiles_patch_images_and_region_searches(plain, monkeypatch):
    decoded = []
    real_init = slide_module.Slide.__init__

    def counting(self, path, handle, backend, fallback_mpp):
        decoded.append((os.fspath(path), backend))
        real_init(self, path, handle, backend, fallback_mpp)

    monkeypatch.setattr(slide_module.Slide, "__init__", counting)
    service, client = open_client(plain["index"])
    try:
        sid = source_ids(plain["index"])[plain["images"][0]]
        patches = patches_of(plain["index"], sid)
        assert "Width=\"1024\"" in client.get(f"/api/slides/{sid}/image.dzi").text
        shown(client.get(tile_url(sid, DEEPEST, 1, 1)))
        for patch_id, *box in patches[:6]:
            served = shown(client.get(f"/api/patches/{patch_id}/image.jpeg"))
            assert served == file_patch(plain["images"][0], box, fallback_mpp=0.5)
        decoded.clear()  # file_patch's own reads above
        x, y = patches[0][1:3]
        search = client.post("/api/search/region", json={"slide_id": sid, "x": x, "y": y, "width": 128, "height": 64})
        assert search.status_code == 200 and len(search.json()["query_boxes"]) == 2
        assert search.json()["matches"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)  # the region's own patch
        shown(client.get(search.json()["query_image_url"]))
        for patch_id, *_ in patches[6:12]:
            shown(client.get(f"/api/patches/{patch_id}/image.jpeg"))
        assert decoded == []  # all from the image decoded for the first request
    finally:
        client.close()
        service.close()


def test_the_slides_kept_open_are_bounded_by_their_decoded_bytes(plain, monkeypatch):
    one = SIZE[0] * SIZE[1] * 3  # an RGB PNG, decoded
    service, client = open_client(plain["index"])
    try:
        a, b = (source_ids(plain["index"])[path] for path in plain["images"])

        def patch_image_of(sid: int) -> None:
            shown(client.get(f"/api/patches/{patches_of(plain['index'], sid)[0][0]}/image.jpeg"))

        monkeypatch.setattr(search_service, "OPEN_SLIDE_BYTES", one * 3 // 2)
        patch_image_of(a)
        assert list(service._open) == [a] and service._open[a].nbytes == one
        patch_image_of(b)
        assert list(service._open) == [b]  # both would be over the budget: the older went
        monkeypatch.setattr(search_service, "OPEN_SLIDE_BYTES", one * 2)
        patch_image_of(a)
        assert list(service._open) == [b, a]
        monkeypatch.setattr(search_service, "OPEN_SLIDE_BYTES", one // 2)
        patch_image_of(b)
        assert list(service._open) == [b]  # larger than the budget alone: the one in use stays
    finally:
        client.close()
        service.close()
