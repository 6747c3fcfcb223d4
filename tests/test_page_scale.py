"""The search page's API and `retrieve.py list` at archive size: /api/slides a page at a time with a
server-side name filter, /api/index and `list --summary` counting without listing, over an index of
slide records written by bench.page_scale.write_records (and the bench itself, run small)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import retrieve
from bench import page_scale
from histo_retrieval.search.app import create_app
from histo_retrieval.search.index import PatchDatabase, SlideIndex, SourceRecord
from histo_retrieval.search.service import SearchService

RECORDS = 250
ODD_NAMES = ("100%_a.svs", "100x_a.svs", "back\\slash_b.svs", "UPPER_Case.svs")  # LIKE's own characters, and case


def add_slide(index: SlideIndex, path: str) -> int:
    dim = index.settings.dim
    vectors = np.eye(2, dim, dtype=np.float32)
    return index.add(SourceRecord(path=path, kind="slide", vectors=vectors, boxes=np.array([[0, 0, 8, 8]] * 2),
                                  width=100, height=100, slide_mpp=0.5, file_size=1, mtime=0.0))


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """RECORDS slide records, the ODD_NAMES slides, a folder, a failed source and 7 labels."""
    directory = page_scale.write_records(tmp_path_factory.mktemp("records") / "index", RECORDS, patches=2)
    with SlideIndex.open(directory, writable=True) as index:
        for name in ODD_NAMES:
            add_slide(index, f"/archive/odd/{name}")
        dim = index.settings.dim
        index.add(SourceRecord(path="/archive/patches", kind="folder", vectors=np.eye(3, dim, dtype=np.float32),
                               boxes=np.array([[0, 0, 8, 8]] * 3), files=["/archive/patches/a.png"] * 3))
        index.add_failure("/archive/broken.svs", "not a slide")
        index.set_labels({source_id: ("tumour", None) for source_id in range(3, 10)})
    return directory


@pytest.fixture(scope="module")
def client(records):
    service = SearchService.open(str(records), "cpu")
    with TestClient(create_app(service, allowed_hosts=["testserver"])) as test_client:
        yield test_client
    service.close()


def naive_rows(directory: Path) -> list[tuple[int, str, str, str, int]]:
    """(id, file name, kind, state, patch_count) of every source, by id, read plainly."""
    with sqlite3.connect(directory / "patches.sqlite") as db:
        rows = db.execute("SELECT id, path, kind, state, patch_count FROM sources ORDER BY id").fetchall()
    return [(i, Path(path).name, kind, state, count) for i, path, kind, state, count in rows]


def naive_page(directory: Path, offset: int, limit: int, q: str = "", kind: str | None = None) -> tuple[list[int], int]:
    matching = [row[0] for row in naive_rows(directory) if row[3] == "indexed" and (kind is None or row[2] == kind)
                and q.lower() in row[1].lower()]
    return matching[offset:offset + limit], len(matching)


@pytest.mark.parametrize("params", [
    {}, {"offset": 100}, {"offset": 240, "limit": 30}, {"limit": 1000}, {"offset": 5000},
    {"kind": "slide", "offset": 250, "limit": 3}, {"kind": "folder"}, {"q": "slide_0001", "limit": 4, "offset": 2},
    {"q": "SLIDE_00024"}, {"q": "000249"}, {"q": "nothing like it"},
])
def test_a_page_of_slides_is_the_naive_slice_with_the_total(client, records, params):
    response = client.get("/api/slides", params=params)
    assert response.status_code == 200
    expected, total = naive_page(records, params.get("offset", 0), params.get("limit", 100), params.get("q", ""),
                                 params.get("kind"))
    assert [row["id"] for row in response.json()] == expected
    assert response.headers["X-Total-Count"] == str(total)


@pytest.mark.parametrize("q, names", [
    ("100%", ["100%_a.svs"]),  # % is a character, not LIKE's wildcard (which would match 100x_a too)
    ("0%_", ["100%_a.svs"]),
    ("x_a", ["100x_a.svs"]),  # _ is a character: "0%_a" would match it otherwise
    ("\\", ["back\\slash_b.svs"]),
    ("upper_case", ["UPPER_Case.svs"]),
    ("odd", []),  # the name only, not the folder the path passes through
])
def test_the_name_filter_takes_every_character_literally(client, q, names):
    response = client.get("/api/slides", params={"q": q})
    assert [row["name"] for row in response.json()] == names
    assert response.headers["X-Total-Count"] == str(len(names))


@pytest.mark.parametrize("params, field, words", [
    ({"limit": 0}, "limit", "greater than or equal to 1"),
    ({"limit": 1001}, "limit", "less than or equal to 1000"),
    ({"offset": -1}, "offset", "greater than or equal to 0"),
    ({"limit": "ten"}, "limit", "valid integer"),
    ({"q": "x" * 201}, "q", "at most 200 characters"),
])
def test_a_bad_page_gets_422_naming_the_parameter(client, params, field, words):
    response = client.get("/api/slides", params=params)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", field] and words in error["msg"]


def naive_counts(directory: Path) -> dict[str, int]:
    rows = naive_rows(directory)
    with sqlite3.connect(directory / "patches.sqlite") as db:
        labelled = db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        patches = db.execute("SELECT COUNT(*) FROM patches").fetchone()[0]
    indexed = [row for row in rows if row[3] == "indexed"]
    return {"sources": len(indexed), "slides": sum(row[2] == "slide" for row in indexed),
            "folders": sum(row[2] == "folder" for row in indexed), "patches": patches,
            "failed": sum(row[3] == "failed" for row in rows), "labelled": labelled}


def test_the_summary_and_list_summary_count_what_the_index_holds(client, records, capsys):
    expected = naive_counts(records)
    assert expected == {"sources": RECORDS + len(ODD_NAMES) + 1, "slides": RECORDS + len(ODD_NAMES), "folders": 1,
                        "patches": 2 * RECORDS + 2 * len(ODD_NAMES) + 3, "failed": 1, "labelled": 7}
    summary = client.get("/api/index").json()
    assert {key: summary[key] for key in ("slides", "folders", "patches")} == \
        {key: expected[key] for key in ("slides", "folders", "patches")}

    capsys.readouterr()
    assert retrieve.main(retrieve.get_args_parser().parse_args(["list", "--index", str(records), "--summary"])) == 0
    assert capsys.readouterr().out == "".join(f"{name}: {count}\n" for name, count in expected.items())


def test_requests_and_list_summary_never_read_every_source(records, monkeypatch, capsys):
    service = SearchService.open(str(records), "cpu")
    try:
        def refused(*args, **kwargs):
            raise AssertionError("every source was read")

        monkeypatch.setattr(PatchDatabase, "sources", refused)
        with TestClient(create_app(service, allowed_hosts=["testserver"])) as client:
            assert client.get("/api/index").json()["slides"] == RECORDS + len(ODD_NAMES)
            page = client.get("/api/slides", params={"offset": 100, "limit": 2}).json()
            assert [row["name"] for row in page] == ["slide_000100.svs", "slide_000101.svs"]
            assert client.get(f"/api/slides/{page[0]['id']}").json() == page[0]
            assert client.get(page[0]["thumbnail_url"]).headers["content-type"] == "image/jpeg"
            # The record's file does not exist: the 404 names it by its file name, never its folder.
            missing = client.get(page[0]["dzi_url"])
            assert missing.status_code == 404
            assert "slide_000100.svs" in missing.json()["detail"] and "/archive" not in missing.json()["detail"]
            assert client.get("/api/slides/999999").status_code == 404
        assert retrieve.main(retrieve.get_args_parser().parse_args(["list", "--index", str(records),
                                                                    "--summary"])) == 0
        assert f"slides: {RECORDS + len(ODD_NAMES)}\n" in capsys.readouterr().out
    finally:
        service.close()


def test_write_records_writes_what_add_source_would(records):
    with SlideIndex.open(records) as index:
        rows = index.source_page(0, 3)[0]
        assert [row.name for row in rows] == ["slide_000000.svs", "slide_000001.svs", "slide_000002.svs"]
        ids, vectors = index.source_vectors(rows[1].id)
        assert list(ids) == [rows[1].first_patch, rows[1].first_patch + 1] and vectors.shape == (2, 64)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert index.patch_count() == sum(row.patch_count for row in index.sources())
        _, found = index.search(vectors[:1], 1)
        assert found[0, 0] == ids[0]  # the faiss index built from the records finds the record's own patch
    with pytest.raises(Exception, match="already an index"):
        page_scale.write_records(records, 1)


def test_the_bench_runs_small_and_records_its_table(tmp_path):
    out = tmp_path / "results.md"
    out.write_text("# Results\n\n## Other\n\nkept\n")
    rows = page_scale.main(["--sizes", "3", "20", "--repeats", "1", "--no-browser", "--record", str(out)])
    assert [row["size"] for row in rows] == [3, 20]
    text = out.read_text()
    assert "## Other\n\nkept" in text and "## Search page at archive size (bench/page_scale.py)" in text
    assert "| 3 |" in text and "| 20 |" in text and "not measured" in text
