"""The search page's API through FastAPI's test client: what the index holds, tiles, searches by
upload and by region, heat maps, and every way a request can be wrong or reach for a file."""
from __future__ import annotations

import csv
import hashlib
import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import retrieve
from histo_retrieval.search import app as server
from histo_retrieval.search import service as search_service
from histo_retrieval.search import slides as slide_module
from histo_retrieval.search.service import SearchService
from histo_retrieval.search.queries import heat_colours, patch_pixels, query_jobs, run_queries
from histo_retrieval.search.slides import open_slide


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def db_rows(index: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(index / "patches.sqlite") as db:
        return db.execute(sql).fetchall()


def first_slide(client) -> dict:
    return client.get("/api/slides", params={"kind": "slide"}).json()[0]


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def test_the_summary_and_slide_list_are_what_the_index_holds(client, served_index):
    summary = client.get("/api/index").json()
    patches = db_rows(served_index["index"], "SELECT COUNT(*) FROM patches")[0][0]
    assert (summary["slides"], summary["folders"], summary["patches"]) == (3, 1, patches)
    assert (summary["model_name"], summary["mpp"], summary["patch_size"], summary["dim"]) == ("se_resnet50", 1.0, 32, 512)
    assert summary["classes"] == ["s0", "s1"]

    listed = client.get("/api/slides").json()
    by_name = {row["name"]: row for row in listed}
    assert set(by_name) == {"slide_000.tif", "slide_001.tif", "slide_002.tif", "patches"}
    counts = {Path(path).name: n for path, n in db_rows(served_index["index"], "SELECT path, patch_count FROM sources")}
    assert {row["name"]: row["patch_count"] for row in listed} == counts
    slide = by_name["slide_001.tif"]
    assert (slide["width"], slide["height"], slide["slide_mpp"]) == (1536, 1024, 0.5)
    assert slide["dzi_url"] == f"/api/slides/{slide['id']}/image.dzi" and by_name["patches"]["dzi_url"] is None
    assert [row["name"] for row in client.get("/api/slides", params={"q": "001"}).json()] == ["slide_001.tif"]
    assert {row["kind"] for row in client.get("/api/slides", params={"kind": "folder"}).json()} == {"folder"}
    assert client.get(f"/api/slides/{slide['id']}").json() == slide

    thumbnail = client.get(slide["thumbnail_url"])
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size[0] > 0


def test_deep_zoom_tiles_are_the_slides_pixels(client, served_index):
    slide = first_slide(client)
    dzi = client.get(slide["dzi_url"])
    assert dzi.headers["content-type"].startswith("application/xml")
    assert 'Width="1536" Height="1024"' in dzi.text and 'TileSize="254"' in dzi.text
    deepest = 11  # 2**11 >= 1536: the full-resolution level
    tile = client.get(f"/api/slides/{slide['id']}/image_files/{deepest}/1_1.jpeg")
    assert tile.status_code == 200
    shown = np.asarray(Image.open(io.BytesIO(tile.content)).convert("RGB"), np.float64)
    with open_slide(served_index["slides"][0]) as source:
        # Tile (1, 1) starts one overlap pixel before 254, 254 and ends one after 508, 508.
        expected = source.read(253, 253, 0, 256, 256).astype(np.float64)
    assert shown.shape == expected.shape and np.abs(shown - expected).mean() < 4  # JPEG at quality 80
    coarse = Image.open(io.BytesIO(client.get(f"/api/slides/{slide['id']}/image_files/0/0_0.jpeg").content))
    assert coarse.size == (1, 1)

    for url in (f"/api/slides/{slide['id']}/image_files/{deepest + 1}/0_0.jpeg",  # no such level
                f"/api/slides/{slide['id']}/image_files/{deepest}/99_0.jpeg"):  # no such tile
        response = client.get(url)
        assert response.status_code == 404 and "no" in response.json()["detail"]
    folder = client.get("/api/slides", params={"kind": "folder"}).json()[0]
    response = client.get(f"/api/slides/{folder['id']}/image.dzi")
    assert response.status_code == 404 and "not a slide" in response.json()["detail"]


def test_tiles_are_the_same_whichever_library_reads_the_slide(service, served_index, monkeypatch):
    expected = [service.tile(1, level, col, row) for level, col, row in ((11, 1, 1), (10, 2, 1), (4, 0, 0))]
    monkeypatch.setattr(slide_module, "_openslide", lambda: None)  # as where OpenSlide cannot be loaded
    other = SearchService.open(str(served_index["index"]), "cpu")
    try:
        assert [other.tile(1, level, col, row) for level, col, row in ((11, 1, 1), (10, 2, 1), (4, 0, 0))] == expected
        assert other._slide(1).slide.backend == "tiffslide"
    finally:
        other.close()


def test_an_upload_cut_from_a_slide_finds_that_place_first(client, service, served_index):
    patch_id = db_rows(served_index["index"], "SELECT p.id FROM patches p JOIN sources s ON s.id = p.source_id "
                                              "WHERE s.kind = 'slide' ORDER BY p.id LIMIT 1 OFFSET 20")[0][0]
    patch = service.patch(patch_id)
    pixels = patch_pixels(service.index, patch)
    response = client.post("/api/search/upload", files={"file": ("cut.png", png(pixels), "image/png")},
                           data={"top_k": "5"})
    assert response.status_code == 200, response.text
    search = response.json()
    first = search["matches"][0]
    assert (first["patch_id"], first["source_id"], first["x"], first["y"]) == (patch_id, patch.source_id, patch.x,
                                                                               patch.y)
    assert first["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert len(search["matches"]) == 5 and search["kind"] == "upload" and search["name"] == "cut.png"
    assert search["slides"][0]["source_id"] == patch.source_id and search["slides"][0]["rank"] == 1
    query = client.get(search["query_image_url"])
    assert Image.open(io.BytesIO(query.content)).size == (32, 32)
    again = client.get(f"/api/searches/{search['id']}").json()
    assert again["matches"] == search["matches"]
    image = client.get(first["image_url"])
    assert image.headers["content-type"] == "image/jpeg"
    assert np.abs(np.asarray(Image.open(io.BytesIO(image.content)), np.float64) - pixels).mean() < 6


def test_the_page_gives_the_matches_the_command_line_gives(client, service, served_index, tmp_path):
    patch = service.patch(int(db_rows(served_index["index"], "SELECT id FROM patches WHERE source_id = 2 "
                                                            "ORDER BY id LIMIT 1 OFFSET 5")[0][0]))
    query = tmp_path / "query.png"
    query.write_bytes(png(patch_pixels(service.index, patch)))
    argv = ["query", "--index", str(served_index["index"]), str(query), "--top-k", "5", "--out-dir",
            str(tmp_path / "out"), "--device", "cpu", "--workers", "0"]
    assert retrieve.main(retrieve.get_args_parser().parse_args(argv)) == 0
    with open(tmp_path / "out" / "matches.csv", newline="") as f:
        expected = [(Path(r["source"]).name, int(r["x"]), int(r["y"]), round(float(r["similarity"]), 5))
                    for r in csv.DictReader(f)]
    search = client.post("/api/search/upload", files={"file": ("query.png", query.read_bytes(), "image/png")},
                         data={"top_k": "5"}).json()
    assert [(m["source_name"], m["x"], m["y"], round(m["similarity"], 5)) for m in search["matches"]] == expected


def test_an_uploads_vectors_are_those_of_the_same_file_queried(service, tmp_path):
    """An upload is searched in memory: its vectors are exactly those `retrieve.py query` gets from the
    same file (at the crop size, larger and cropped, smaller and padded)."""
    rng = np.random.default_rng(7)
    for height, width in ((32, 32), (45, 60), (20, 28)):
        path = tmp_path / f"query_{height}.png"
        path.write_bytes(png(rng.integers(0, 256, (height, width, 3), np.uint8)))
        upload = service.search_upload(path.read_bytes(), path.name)
        [queried], failed = run_queries(service.index, query_jobs([str(path)]), service.embedder, out_dir=None,
                                        progress=False)
        assert not failed and queried.kind == upload.result.kind == "patch"
        assert np.array_equal(upload.result.vectors, queried.vectors)


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg"), ("TIFF", "tif")])
def test_uploads_in_each_format_are_searched(client, served_index, fmt, suffix):
    buffer = io.BytesIO()
    Image.open(served_index["root"] / "patches" / "s0" / "s0_1.png").save(buffer, fmt)
    response = client.post("/api/search/upload", files={"file": (f"s0_query.{suffix}", buffer.getvalue(), "image/" + suffix)})
    assert response.status_code == 200, response.text
    first = response.json()["matches"][0]
    assert first["file_name"] == "s0_1.png" and first["similarity"] > 0.99  # JPEG changes the pixels a little


def test_an_upload_named_by_class_is_judged_by_its_class(client, served_index):
    source = served_index["root"] / "patches" / "s1" / "s1_0.png"
    response = client.post("/api/search/upload", files={"file": ("s1_query.png", source.read_bytes(), "image/png")})
    search = response.json()
    assert search["query_class"] == "s1"
    first = search["matches"][0]
    assert (first["file_name"], first["class_name"], first["source_kind"]) == ("s1_0.png", "s1", "folder")


@pytest.mark.parametrize("name, data, status, words", [
    ("notes.txt", b"these are not pixels", 415, "not a PNG, JPEG or TIFF image"),
    ("empty.png", b"", 400, "empty"),
    ("broken.png", png(np.zeros((40, 40, 3), np.uint8))[:60], 400, "not an image Pillow can read"),
])
def test_bad_uploads_get_a_clear_message(client, name, data, status, words):
    response = client.post("/api/search/upload", files={"file": (name, data, "application/octet-stream")})
    assert response.status_code == status
    assert name in response.json()["detail"] and words in response.json()["detail"]


def test_oversized_uploads_are_refused(client, monkeypatch):
    big = b"\0" * (search_service.MAX_UPLOAD_BYTES + 1024 * 1024)
    response = client.post("/api/search/upload", files={"file": ("huge.png", big, "image/png")})
    assert response.status_code == 413 and "limited to 20 MB" in response.json()["detail"]
    # Small in bytes, large in pixels: refused from the header, before it is decoded.
    monkeypatch.setattr(search_service, "MAX_UPLOAD_SIDE", 32)
    response = client.post("/api/search/upload",
                           files={"file": ("wide.png", png(np.zeros((40, 40, 3), np.uint8)), "image/png")})
    assert response.status_code == 413 and "40 x 40 pixels" in response.json()["detail"]
    response = client.post("/api/search/upload", data={"top_k": "3"})
    assert response.status_code == 422  # no file field


def test_a_region_search_tiles_the_region_and_marks_it(client, served_index):
    slide = first_slide(client)
    response = client.post("/api/search/region", json={"slide_id": slide["id"], "x": 128, "y": 128, "width": 128,
                                                       "height": 128})
    assert response.status_code == 200, response.text
    search = response.json()
    assert search["kind"] == "region" and search["source_id"] == slide["id"]
    assert search["query_boxes"] == [[128, 128, 64, 64], [192, 128, 64, 64], [128, 192, 64, 64], [192, 192, 64, 64]]
    assert search["matches"] and search["slides"]
    similarities = [m["similarity"] for m in search["matches"]]
    assert similarities == sorted(similarities, reverse=True)
    assert len({m["patch_id"] for m in search["matches"]}) == len(search["matches"])


@pytest.mark.parametrize("region, status, words", [
    ({"x": 1500, "y": 0, "width": 100, "height": 100}, 400, "inside the slide"),
    ({"x": 0, "y": 0, "width": 1536, "height": 1024}, 413, "draw a smaller region"),
    ({"x": -5, "y": 0, "width": 100, "height": 100}, 422, "greater than or equal"),
])
def test_bad_regions_get_a_clear_message(client, region, status, words):
    response = client.post("/api/search/region", json={"slide_id": first_slide(client)["id"], **region})
    assert response.status_code == status and words in str(response.json()["detail"])


def test_the_heat_map_colours_each_patch_by_its_similarity(client, service, served_index):
    slide = first_slide(client)
    patch = service.patch(int(db_rows(served_index["index"], f"SELECT id FROM patches WHERE source_id = "
                                                            f"{slide['id']} ORDER BY id LIMIT 1")[0][0]))
    search = client.post("/api/search/region", json={"slide_id": slide["id"], "x": patch.x, "y": patch.y,
                                                     "width": patch.width, "height": patch.height}).json()
    response = client.get(f"/api/searches/{search['id']}/heatmap/{slide['id']}.png")
    assert response.status_code == 200
    heat = np.asarray(Image.open(io.BytesIO(response.content)))
    downsample = service.index.thumbnail(slide["id"]).downsample
    thumbnail = Image.open(io.BytesIO(client.get(slide["thumbnail_url"]).content))
    assert heat.shape == (thumbnail.size[1], thumbnail.size[0], 4)
    low, high = float(response.headers["X-Similarity-Low"]), float(response.headers["X-Similarity-High"])
    assert low <= high == pytest.approx(1.0, abs=1e-5)  # the query is this very patch
    centre = heat[int((patch.y + patch.height / 2) / downsample), int((patch.x + patch.width / 2) / downsample)]
    _, _, colours = heat_colours(np.array([low, high]))
    assert centre[3] == 255 and np.array_equal(centre[:3], np.round(colours[1][:3] * 255).astype(np.uint8))
    assert heat[0, 0, 3] == 0  # glass in the corner: not indexed, transparent


@pytest.mark.parametrize("url, status", [
    ("/api/slides/999", 404),
    ("/api/slides/999/thumbnail.jpeg", 404),
    ("/api/slides/999/image_files/11/0_0.jpeg", 404),
    ("/api/patches/99999/image.jpeg", 404),
    ("/api/searches/0123456789abcdef0123456789abcdef", 404),
    ("/api/searches/0123456789abcdef0123456789abcdef/heatmap/1.png", 404),
    ("/api/searches/not-a-search-id/query.jpeg", 422),
    ("/api/no/such/route", 404),
])
def test_unknown_ids_are_404_with_a_message(client, url, status):
    response = client.get(url)
    assert response.status_code == status and response.json()["detail"]


def test_a_path_in_place_of_an_id_reads_no_file(client, served_index, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret lies here")
    slide_file = served_index["slides"][0]
    for place in (str(secret), slide_file, "../../../../etc/passwd"):
        for template in ("/api/slides/{}", "/api/slides/{}/thumbnail.jpeg", "/api/slides/{}/image.dzi",
                         "/api/patches/{}/image.jpeg"):
            for quoted in (place, place.replace("/", "%2F")):
                response = client.get(template.format(quoted))
                assert response.status_code in (404, 422), (template, quoted)
                assert "secret lies" not in response.text and "root:" not in response.text
    response = client.post("/api/search/region", json={"slide_id": slide_file, "x": 0, "y": 0, "width": 64,
                                                       "height": 64})
    assert response.status_code == 422


def test_nothing_in_the_index_changes(served_index, service):
    before = folder_hashes(served_index["index"])
    with TestClient(server.create_app(service, allowed_hosts=["testserver"])) as fresh:
        slide = first_slide(fresh)
        fresh.post("/api/search/region", json={"slide_id": slide["id"], "x": 64, "y": 64, "width": 64, "height": 64})
        for method in (fresh.put, fresh.delete, fresh.patch):
            assert method(f"/api/slides/{slide['id']}").status_code == 405
    assert folder_hashes(served_index["index"]) == before


def test_the_page_and_its_api_docs_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "Tissue search" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/index", "/api/slides", "/api/search/upload", "/api/search/region",
            "/api/slides/{slide_id}/image_files/{level}/{col}_{row}.jpeg"} <= set(paths)
    assert all(path.startswith("/api/") for path in paths)
    upload = paths["/api/search/upload"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload


def test_serve_says_how_to_install_the_viewer(served_index, monkeypatch, capsys):
    monkeypatch.setattr(server, "viewer_installed", lambda viewer=None: False)
    args = retrieve.get_args_parser().parse_args(["serve", "--index", str(served_index["index"]), "--device", "cpu"])
    assert args.host == "127.0.0.1" and args.port == 8000
    with pytest.raises(retrieve.UserError, match="npm ci --prefix web"):
        retrieve.main(args)
