"""histo_retrieval.search.labels and `retrieve.py label`: labels and patients attached to indexed slides
from a CSV file, shown by `list` and the API, refused whole when any row is bad."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

import retrieve
from histo_retrieval.errors import UserError
from histo_retrieval.search.index import DATABASE, SlideIndex


@pytest.fixture()
def index_copy(served_index, tmp_path: Path) -> Path:
    """A copy of the served index (3 slides and a folder), so that labelling it leaves the shared one alone."""
    copy = tmp_path / "index"
    shutil.copytree(served_index["index"], copy)
    return copy


def run(*argv: str) -> int:
    return retrieve.main(retrieve.get_args_parser().parse_args(list(argv)))


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def labels_of(index: Path) -> dict[str, tuple[str | None, str | None]]:
    with SlideIndex.open(index) as opened:
        return {row.name: (row.label, row.patient) for row in opened.sources()}


def test_a_label_run_attaches_labels_and_patients_that_list_and_the_api_show(index_copy, served_index, tmp_path,
                                                                            capsys) -> None:
    names = [Path(path).name for path in served_index["slides"]]
    labels = write_csv(tmp_path / "labels.csv", "slide,label,patient\n"
                       f"{names[0]},d0,p1\n{served_index['slides'][1]},d1,\n{names[2]},d0,p1\n")
    assert run("label", "--index", str(index_copy), str(labels)) == 0
    assert "labelled 3 slide(s)" in capsys.readouterr().out
    found = labels_of(index_copy)
    assert [found[name] for name in names] == [("d0", "p1"), ("d1", None), ("d0", "p1")]
    assert found["patches"] == (None, None)  # the folder was not named: no label is guessed

    assert run("list", "--index", str(index_copy)) == 0
    listing = capsys.readouterr().out
    assert f"{served_index['slides'][0]}  label d0, patient p1" in listing
    assert f"{served_index['slides'][1]}  label d1\n" in listing

    from fastapi.testclient import TestClient

    from histo_retrieval.search.app import create_app
    from histo_retrieval.search.service import SearchService

    service = SearchService.open(str(index_copy), "cpu", top_k=5)
    try:
        slides = {s["name"]: s for s in TestClient(create_app(service, allowed_hosts=["testserver"])).get("/api/slides").json()}
    finally:
        service.close()
    assert (slides[names[0]]["label"], slides[names[0]]["patient"]) == ("d0", "p1")
    assert (slides[names[1]]["label"], slides[names[1]]["patient"]) == ("d1", None)


def test_another_label_run_replaces_the_labels_of_the_slides_it_names(index_copy, served_index, tmp_path) -> None:
    names = [Path(path).name for path in served_index["slides"]]
    run("label", "--index", str(index_copy), str(write_csv(tmp_path / "a.csv", f"slide,label\n{names[0]},d0\n"
                                                                               f"{names[1]},d1\n")))
    run("label", "--index", str(index_copy), str(write_csv(tmp_path / "b.csv", f"slide,label,patient\n"
                                                                               f"{names[0]},d2,p9\n")))
    found = labels_of(index_copy)
    assert (found[names[0]], found[names[1]], found[names[2]]) == (("d2", "p9"), ("d1", None), (None, None))


@pytest.mark.parametrize("rows, problems", [
    ("{0},d0,p1\nnot_a_slide.tiff,d1,p2\n", ["line 3: not_a_slide.tiff is not an indexed slide"]),
    ("{0},d0,p1\n{1},,p2\n", ["line 3: {1} has an empty label"]),
    ("{0},d0,p1\n{0},d1,p1\n", ["line 3: {0} is listed twice (also on line 2)"]),
    ("{0},d0,\n,d1,\n{1},,\n", ["line 3: no slide", "line 4: {1} has an empty label"]),
])
def test_a_bad_file_is_refused_by_line_number_and_changes_nothing(index_copy, served_index, tmp_path, rows,
                                                                  problems) -> None:
    names = [Path(path).name for path in served_index["slides"]]
    run("label", "--index", str(index_copy), str(write_csv(tmp_path / "good.csv", f"slide,label\n{names[2]},d9\n")))
    before = labels_of(index_copy)
    bad = write_csv(tmp_path / "bad.csv", "slide,label,patient\n" + rows.format(*names))
    with pytest.raises(UserError) as raised:
        run("label", "--index", str(index_copy), str(bad))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{bad}: {len(problems)} bad row(s), nothing changed")
    for problem in problems:
        assert problem.format(*names) in message
    assert labels_of(index_copy) == before


def test_a_file_without_the_columns_or_rows_is_refused(index_copy, tmp_path) -> None:
    with pytest.raises(UserError, match="no label column; the header must be slide,label,patient"):
        run("label", "--index", str(index_copy), str(write_csv(tmp_path / "x.csv", "slide,diagnosis\na,b\n")))
    with pytest.raises(UserError, match="no rows"):
        run("label", "--index", str(index_copy), str(write_csv(tmp_path / "y.csv", "slide,label,patient\n")))


def test_an_index_from_before_labels_opens_read_only_with_none(index_copy) -> None:
    with sqlite3.connect(index_copy / DATABASE) as connection:
        connection.execute("DROP TABLE labels")
    with SlideIndex.open(index_copy) as opened:  # read-only: the table is not created
        rows = opened.sources()
    assert rows and all(row.label is None and row.patient is None for row in rows)


def test_a_slide_indexed_again_with_replace_keeps_its_label(index_copy, served_index, tmp_path) -> None:
    name = Path(served_index["slides"][0]).name
    run("label", "--index", str(index_copy), str(write_csv(tmp_path / "a.csv", f"slide,label,patient\n{name},d4,p7\n")))
    with SlideIndex.open(index_copy) as opened:
        old_id = opened.source_by_path(served_index["slides"][0]).id
    assert run("index", str(served_index["checkpoint"]), served_index["slides"][0], "--index", str(index_copy),
               "--mpp", "1.0", "--replace", "--device", "cpu", "--workers", "0", "--batch-size", "16") == 0
    with SlideIndex.open(index_copy) as opened:
        row = opened.source_by_path(served_index["slides"][0])
    assert row.id != old_id and (row.label, row.patient) == ("d4", "p7")
