"""histo_retrieval.search.slide_evaluation and `retrieve.py evaluate`: every labelled slide queries the
others; exclusions, the rankings against `retrieve.py query` and a naive Yottixel score, the files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import retrieve
from histo_retrieval.errors import UserError
from histo_retrieval.search.index import SlideIndex
from histo_retrieval.search.slide_metrics import read_rankings, slide_retrieval_metrics
from KIMIA_data import synthetic

SLIDES = 8
PATIENT_OF = {k: f"p{k // 2}" for k in range(SLIDES)}  # two slides a patient
UNLABELLED = SLIDES - 1  # the last slide stays unlabelled: never ranked, never a query


def run(*argv: str) -> int:
    return retrieve.main(retrieve.get_args_parser().parse_args(list(argv)))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """8 small synthetic slides indexed with the colour histogram, all but the last labelled: the label
    is the class of the slide's first tissue box (slide k's is s{k % 3}), two slides a patient."""
    root = tmp_path_factory.mktemp("archive")
    records = synthetic.write_slide_set(root / "slides", count=SLIDES, classes=3, size=(1024, 768), seed=5)
    slides = [str(root / "slides" / r["file"]) for r in records]
    index = root / "index"
    assert run("index", "--encoder", "histogram", "--encoder-options", '{"crop_size": 32}', *slides, "--index",
               str(index), "--mpp", "2.0", "--patch-size", "32", "--device", "cpu", "--workers", "0") == 0
    labels = root / "labels.csv"
    labels.write_text("slide,label,patient\n" + "".join(f"{Path(slides[k]).name},s{k % 3},{PATIENT_OF[k]}\n"
                                                        for k in range(SLIDES) if k != UNLABELLED))
    assert run("label", "--index", str(index), str(labels)) == 0
    return {"root": root, "index": index, "slides": slides}


def evaluate(archive: dict, out: Path, *flags: str) -> Path:
    assert run("evaluate", "--index", str(archive["index"]), "--out-dir", str(out), *flags) == 0
    return out


def test_leave_one_patient_out_never_ranks_a_slide_of_the_querys_patient(archive, tmp_path) -> None:
    out = evaluate(archive, tmp_path / "eval", "--exclude", "patient", "slide")
    patient_out, slide_out = read_rankings(out / "slide_rankings_patient.csv"), read_rankings(out / "slide_rankings_slide.csv")
    names = {Path(s).name for k, s in enumerate(archive["slides"]) if k != UNLABELLED}
    assert {q.query for q in patient_out} == names == {q.query for q in slide_out}
    for query in patient_out:
        assert query.ranking and all(r.patient != query.patient for r in query.ranking)
        assert all(r.slide in names for r in query.ranking)  # the unlabelled slide is never ranked
    for query in slide_out:
        ranked = [r.slide for r in query.ranking]
        assert query.query not in ranked
        # Only the query is left out: the slide of its own patient is there (the histogram ranks every slide
        # whose patches are among the neighbours; the archive's 7 labelled slides all fit in the top 5 or not).
        assert len(ranked) == len(set(ranked))
    assert any(r.patient == q.patient for q in slide_out for r in q.ranking)

    rows = list(csv.DictReader(open(out / "slide_retrieval.csv")))
    assert [row["exclude"] for row in rows] == ["patient", "slide"]
    for row, queries in zip(rows, (patient_out, slide_out)):
        metrics = slide_retrieval_metrics(queries)  # every column recomputable from the rankings file
        for column, value in metrics.items():
            assert float(row[column]) == pytest.approx(float(value)), column
        assert float(row["index_patches_per_slide"]) > 0 and float(row["query_ms_median"]) >= 0
        assert "histogram" in row["encoder"]
    record = json.loads((out / "evaluation.json").read_text())
    assert record["settings"]["exclude"] == ["patient", "slide"] and "none" in record["tuning"]
    assert (out / "slide_confusion_patient.png").stat().st_size > 0
    assert (out / "slide_retrieval_per_class.csv").is_file()


def test_leave_one_slide_out_ranks_as_retrieve_query_does(archive, tmp_path) -> None:
    out = evaluate(archive, tmp_path / "eval", "--exclude", "slide", "--top-k", "10")
    rankings = {q.query: q for q in read_rankings(out / "slide_rankings.csv")}
    # Every slide labelled but one: `query` of a labelled slide ranks the same slides, minus the unlabelled one.
    query = archive["slides"][0]
    assert run("query", "--index", str(archive["index"]), query, "--out-dir", str(tmp_path / "q"), "--top-k", "10",
               "--device", "cpu", "--workers", "0") == 0
    expected = [Path(row["source"]).name for row in csv.DictReader(open(tmp_path / "q" / "slides.csv"))
                if Path(row["source"]).name != Path(archive["slides"][UNLABELLED]).name]
    assert [r.slide for r in rankings[Path(query).name].ranking] == expected[:len(rankings[Path(query).name].ranking)]


def test_median_of_best_is_yottixels_score_computed_exactly(archive, tmp_path) -> None:
    out = evaluate(archive, tmp_path / "eval", "--slide-score", "median-of-best", "--exclude", "slide",
                   "--top-k", "10")
    with SlideIndex.open(archive["index"]) as index:
        rows = {row.name: row for row in index.sources() if row.label}
        vectors = {name: index.source_vectors(row.id)[1] for name, row in rows.items()}
    for query in read_rankings(out / "slide_rankings.csv"):
        naive = {}
        for name, theirs in vectors.items():
            if name != query.query:
                best = [max(float(np.dot(mine, other)) for other in theirs) for mine in vectors[query.query]]
                naive[name] = float(np.median(best))
        order = sorted(naive, key=lambda name: (-naive[name], rows[name].id))
        assert [r.slide for r in query.ranking] == order[:len(query.ranking)]
        assert [r.score for r in query.ranking] == pytest.approx([naive[n] for n in order[:len(query.ranking)]],
                                                                 abs=1e-5)


def test_an_index_without_two_labelled_slides_is_refused(served_index, tmp_path) -> None:
    with pytest.raises(UserError, match="0 labelled slide"):
        run("evaluate", "--index", str(served_index["index"]), "--out-dir", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_a_mosaic_query_uses_the_stored_mosaic_and_records_it(archive, tmp_path) -> None:
    out = evaluate(archive, tmp_path / "eval", "--mosaic", "--mosaic-clusters", "2", "--exclude", "slide")
    row = next(csv.DictReader(open(out / "slide_retrieval.csv")))
    # 2 colour clusters, 5% of each, at least one: 1 or 2 patches a query, against every tissue patch indexed.
    assert 1 <= float(row["query_patches_per_slide"]) <= 2 < float(row["index_patches_per_slide"])
    record = json.loads((out / "evaluation.json").read_text())
    assert record["settings"]["mosaic"] == {"clusters": 2, "percent": 5.0, "seed": 0}
    assert all(query.ranking for query in read_rankings(out / "slide_rankings.csv"))


@pytest.mark.slow
def test_on_the_synthetic_archive_leaving_out_one_slide_leaks_the_patient(tmp_path) -> None:
    """A patient's slides share their stain and scanner (KIMIA_data/synthetic.py --archive): leave-one-
    slide-out lets a query find its patient's other slide, so it scores at least as high as leave-one-
    patient-out, which is the figure to report."""
    synthetic.write_archive(tmp_path / "archive", diagnoses=3, patients=9, slides_per_patient=2, size=(1024, 768))
    slides = sorted(str(p) for p in (tmp_path / "archive").glob("*.tiff"))
    index = tmp_path / "index"
    assert run("index", "--encoder", "histogram", "--encoder-options", '{"crop_size": 32}', *slides, "--index",
               str(index), "--mpp", "4.0", "--patch-size", "32", "--device", "cpu", "--workers", "0") == 0
    assert run("label", "--index", str(index), str(tmp_path / "archive" / "labels.csv")) == 0
    out = evaluate({"index": index}, tmp_path / "eval", "--exclude", "patient", "slide")
    rows = {row["exclude"]: row for row in csv.DictReader(open(out / "slide_retrieval.csv"))}
    assert rows["patient"]["queries"] == rows["slide"]["queries"] == "18"
    for column in ("top1_acc", "mv5_acc", "map5_hits"):
        assert float(rows["slide"][column]) >= float(rows["patient"][column]), column
    assert float(rows["slide"]["top1_acc"]) > float(rows["patient"]["top1_acc"])
