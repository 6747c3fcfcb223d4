""""Find similar slides" on the search page's API (GET /api/slides/{id}/similar) and its engine,
slide_evaluation.similar_slides: the open slide's stored patch vectors query the index, and the
other slides come back ranked as `retrieve.py query` of the slide ranks them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import retrieve
from histo_retrieval.search.app import create_app
from histo_retrieval.search.queries import query_jobs, run_queries
from histo_retrieval.search.service import SearchService
from histo_retrieval.search.slide_evaluation import similar_slides


def slide_ids(client) -> dict[str, int]:
    return {row["name"]: row["id"] for row in client.get("/api/slides", params={"kind": "slide"}).json()}


def test_the_ranking_is_retrieve_query_of_the_slide_without_the_slide_itself(client, service, served_index):
    ids = slide_ids(client)
    for path in served_index["slides"]:
        name = Path(path).name
        answer = client.get(f"/api/slides/{ids[name]}/similar")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        # `retrieve.py query SLIDE` embeds the slide again and excludes its own indexed patches.
        [queried], failed = run_queries(service.index, query_jobs([path]), service.embedder, top_k=service.top_k,
                                        out_dir=None, progress=False)
        assert not failed
        expected = [(Path(s.source).name, s.votes) for s in queried.slides]
        assert name not in [n for n, _ in expected] and expected  # the query slide itself is never matched
        assert [(s["name"], s["votes"]) for s in body["slides"]] == expected
        assert [s["rank"] for s in body["slides"]] == list(range(1, len(expected) + 1))
        assert [s["score"] for s in body["slides"]] == pytest.approx([s.score for s in queried.slides], abs=1e-4)
        assert [s["id"] for s in body["slides"]] == [ids[n] for n, _ in expected]
        assert body["query_patches"] == len(service.index.patch_ids(ids[name])) == len(queried.boxes)
        assert sum(s["votes"] for s in body["slides"]) <= body["query_patches"]
        assert all(s["label"] is None and s["patient"] is None for s in body["slides"])  # the index has no labels
        thumbnail = client.get(body["slides"][0]["thumbnail_url"])
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
        # the library function the page answers from
        assert [(r.source_id, r.votes) for r in similar_slides(service.index, ids[name], service.top_k)] == \
            [(s["id"], s["votes"]) for s in body["slides"]]


def test_top_cuts_the_ranking(client):
    slide = slide_ids(client)["slide_000.tif"]
    full = client.get(f"/api/slides/{slide}/similar").json()["slides"]
    assert len(full) == 2  # the two other slides
    assert client.get(f"/api/slides/{slide}/similar", params={"top": 1}).json()["slides"] == full[:1]
    refused = client.get(f"/api/slides/{slide}/similar", params={"top": 0})
    assert refused.status_code == 422 and "top" in refused.text


def test_an_unknown_slide_is_404_and_a_folder_is_refused_with_the_reason(client):
    unknown = client.get("/api/slides/999999/similar")
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "slide 999999: no such slide in the index; /api/slides lists them"
    folder = next(row for row in client.get("/api/slides").json() if row["kind"] == "folder")
    refused = client.get(f"/api/slides/{folder['id']}/similar")
    assert refused.status_code == 400
    assert refused.json()["detail"] == (f"source {folder['id']} (patches): a folder of patch images, not a slide; "
                                        "only an indexed slide can be searched for similar slides")


def test_labels_and_patients_come_with_the_slides_when_the_index_has_them(served_index, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(served_index["index"], copy)
    names = [Path(path).name for path in served_index["slides"]]
    labels = {names[0]: ("tumour", "p1"), names[1]: ("normal", "p2")}  # the third slide stays unlabelled
    (tmp_path / "labels.csv").write_text("slide,label,patient\n" + "".join(f"{n},{label},{patient}\n"
                                                                           for n, (label, patient) in labels.items()))
    argv = ["label", "--index", str(copy), str(tmp_path / "labels.csv")]
    assert retrieve.main(retrieve.get_args_parser().parse_args(argv)) == 0
    opened = SearchService.open(str(copy), "cpu", batch_size=16)
    try:
        with TestClient(create_app(opened, allowed_hosts=["testserver"])) as client:
            for name, slide in slide_ids(client).items():
                body = client.get(f"/api/slides/{slide}/similar").json()
                assert body["label"] == labels.get(name, (None, None))[0]
                ranked = body["slides"]
                assert len(ranked) == 2 and name not in [s["name"] for s in ranked]
                for s in ranked:
                    assert (s["label"], s["patient"]) == labels.get(s["name"], (None, None))
    finally:
        opened.close()
