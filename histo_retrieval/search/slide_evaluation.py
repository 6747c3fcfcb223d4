"""Whole-slide retrieval measured as the field measures it: every labelled slide queries the index, the
other labelled slides are ranked, and the rankings are scored (histo_retrieval.search.slide_metrics).

    queries, costs = rank_labelled_slides(index, exclude="patient", slide_score="votes")
    write_evaluation(out_dir, index, {"patient": (queries, costs)}, settings)      # retrieve.py evaluate

A query is the slide's own indexed patches: their vectors are read from the index, which holds
exactly what embedding the slide again would give, so nothing is embedded. With a mosaic, the query
is the slide's Yottixel mosaic (histo_retrieval.search.mosaic), chosen among its stored patches from
its stored thumbnail, so no pixel is read either (an index built with --mosaic holds only mosaics
already). Its own slide, and with
`exclude="patient"` every slide of its patient, never appear in its ranking; nor do unlabelled
sources, which have nothing to score.

Slide scores (docs/slide_search.md, "Evaluating slide search"):
- `votes` (the default, what `retrieve.py query` ranks by): each query patch's first match votes for
  its slide; slides by votes, then by the mean similarity of their patches among the matches.
- `median-of-best` (Yottixel's slide distance): for each query patch its best similarity to any
  patch of the candidate slide, then the median over the query's patches; computed exactly, from
  every stored vector of the candidate (no nearest-neighbour approximation).
"""
from __future__ import annotations

import io
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from histo_retrieval.errors import UserError
from histo_retrieval.evaluation.protocols import plot_confusion, write_confusion_csv
from histo_retrieval.files import atomic_write_text, command_line, write_csv
from histo_retrieval.search.index import DATABASE, VECTORS, SlideIndex, SourceRow
from histo_retrieval.search.mosaic import MosaicSettings, select_mosaic
from histo_retrieval.search.queries import SlideRank, rank_slides, search_matches
from histo_retrieval.search.slides import ReadPlan, TissueGrid
from histo_retrieval.search.slide_metrics import (METRIC_COLUMNS, RankedSlide, SlideQuery, confusion,
                                                  per_class_rows, slide_retrieval_metrics, write_rankings)

__all__ = ["EXCLUSIONS", "SLIDE_SCORES", "QueryCosts", "rank_labelled_slides", "similar_slides", "write_evaluation"]

Exclusion = Literal["patient", "slide"]
EXCLUSIONS: tuple[str, ...] = ("patient", "slide")
SLIDE_SCORES: tuple[str, ...] = ("votes", "median-of-best")
RANKING_DEPTH = 5  # rankings written per query at least: enough to recompute every metric


@dataclass
class QueryCosts:
    """What the queries of one evaluation cost: per query, its seconds and its patches."""
    seconds: list[float]
    patches: list[int]


def patient_of(row: SourceRow) -> str:
    """The slide's patient; a slide without one is its own patient."""
    return row.patient if row.patient else f"slide:{row.name}"


def labelled_slides(index: SlideIndex) -> list[SourceRow]:
    """The indexed whole slides with a label, refused when there are fewer than two (nothing to rank)."""
    rows = [row for row in index.sources() if row.kind == "slide" and row.label]
    if len(rows) < 2:
        raise UserError(f"{index.directory}: {len(rows)} labelled slide(s); label at least two with "
                        f"`python3 retrieve.py label --index {index.directory} LABELS.csv`")
    return rows


def stored_mosaic(index: SlideIndex, source_id: int, settings: MosaicSettings) -> np.ndarray:
    """Positions, among the slide's stored patches (in patch order), of its mosaic: the mosaic's rule
    applied to the stored boxes and the stored thumbnail."""
    ids = index.patch_ids(source_id)
    thumbnail = index.thumbnail(source_id)
    if not len(ids) or thumbnail is None:
        return np.arange(len(ids))
    patches = index.patches(ids)
    boxes = np.array([(patches[int(i)].x, patches[int(i)].y) for i in ids], np.int64)
    size0 = patches[int(ids[0])].width
    grid = TissueGrid(boxes, np.array([patches[int(i)].tissue or 1.0 for i in ids]),
                      ReadPlan(0, size0, size0, index.settings.patch_size), np.asarray(Image.open(io.BytesIO(thumbnail.jpeg)).convert("RGB")),
                      thumbnail.downsample)
    return select_mosaic(grid, settings)


def rank_labelled_slides(index: SlideIndex, exclude: Exclusion = "patient", slide_score: str = "votes",
                         neighbours: int = 10, depth: int = RANKING_DEPTH, nprobe: int | None = None,
                         ef_search: int | None = None, mosaic: MosaicSettings | None = None,
                         ) -> tuple[list[SlideQuery], QueryCosts]:
    """Every labelled slide as a query, in id order, with its ranking of the other labelled slides."""
    if exclude not in EXCLUSIONS:
        raise UserError(f"--exclude {exclude}: choose one of {', '.join(EXCLUSIONS)}")
    if slide_score not in SLIDE_SCORES:
        raise UserError(f"--slide-score {slide_score}: choose one of {', '.join(SLIDE_SCORES)}")
    slides = labelled_slides(index)
    labelled = {row.id: row for row in slides}
    others = [row for row in index.sources() if row.id not in labelled]  # never ranked: nothing to score
    other_ids = [index.patch_ids(row.id) for row in others]
    stored = {row.id: index.source_vectors(row.id) for row in slides} if slide_score == "median-of-best" else {}
    queries, costs = [], QueryCosts([], [])
    for query in slides:
        ids, vectors = stored.get(query.id) or index.source_vectors(query.id)
        if mosaic is not None:  # chosen before the clock starts: an index built with --mosaic stores it
            keep = stored_mosaic(index, query.id, mosaic)
            ids, vectors = ids[keep], vectors[keep]
        left_out = [row for row in slides if row.id == query.id or
                    (exclude == "patient" and patient_of(row) == patient_of(query))]
        started = time.perf_counter()
        if slide_score == "votes":
            excluded = np.concatenate([index.patch_ids(row.id) for row in left_out] + other_ids)
            scores = _votes(index, vectors, excluded, neighbours, nprobe, ef_search)
        else:
            candidates = [row for row in slides if row not in left_out]
            scores = _median_of_best(vectors, {row.id: stored[row.id][1] for row in candidates})
        costs.seconds.append(time.perf_counter() - started)
        costs.patches.append(len(ids))
        ranking = tuple(RankedSlide(labelled[source_id].name, labelled[source_id].label, patient_of(labelled[source_id]),
                                    score) for source_id, score in scores if source_id in labelled)
        queries.append(SlideQuery(query.name, query.label, patient_of(query), ranking[:max(depth, RANKING_DEPTH)]))
    return queries, costs


def similar_slides(index: SlideIndex, source_id: int, neighbours: int = 10, nprobe: int | None = None,
                   ef_search: int | None = None) -> list[SlideRank]:
    """The other indexed slides ranked for the slide `source_id`, best first, as `retrieve.py query` of
    the slide ranks them (votes): its stored patch vectors are the query (with an index built with
    --mosaic, its mosaic), its own patches are never matched, and nothing is embedded or read from
    the slide's file. Folders of patch images may be matched but are never ranked (rank_slides)."""
    own, vectors = index.source_vectors(source_id)
    return _ranked(index, vectors, own, neighbours, nprobe, ef_search)


def _ranked(index: SlideIndex, vectors: np.ndarray, excluded: np.ndarray, neighbours: int, nprobe: int | None,
            ef_search: int | None) -> list[SlideRank]:
    """The slides ranked for the query `vectors` by queries.rank_slides, the patches `excluded` never matched."""
    if not len(vectors):
        return []
    return rank_slides(search_matches(index, vectors, neighbours, [excluded] * len(vectors), nprobe, ef_search))


def _votes(index: SlideIndex, vectors: np.ndarray, excluded: np.ndarray, neighbours: int, nprobe: int | None,
           ef_search: int | None) -> list[tuple[int, float]]:
    """(source id, score) best first, as `retrieve.py query` ranks slides (queries.rank_slides)."""
    return [(slide.source_id, slide.score) for slide in _ranked(index, vectors, excluded, neighbours, nprobe,
                                                                ef_search)]


def _median_of_best(vectors: np.ndarray, candidates: dict[int, np.ndarray]) -> list[tuple[int, float]]:
    """(source id, score) best first: the median over the query's patches of each one's best similarity
    to any patch of the candidate (Yottixel)."""
    if not len(vectors):
        return []
    scored = [(source_id, float(np.median((vectors @ theirs.T).max(axis=1))))
              for source_id, theirs in candidates.items() if len(theirs)]
    return sorted(scored, key=lambda item: (-item[1], item[0]))


def index_bytes(index: SlideIndex) -> int:
    """What the index folder holds on disk for its vectors and records (SQLite and the faiss file)."""
    return sum(os.path.getsize(index.directory / name) for name in (DATABASE, VECTORS)
               if (index.directory / name).is_file())


def evaluation_row(exclude: str, queries: Sequence[SlideQuery], costs: QueryCosts, index: SlideIndex,
                   settings: dict) -> dict:
    """One line of slide_retrieval.csv: the metrics, the costs, the encoder and the settings."""
    slides = labelled_slides(index)
    milliseconds = sorted(1000 * s for s in costs.seconds)
    p95 = milliseconds[min(len(milliseconds) - 1, int(np.ceil(0.95 * len(milliseconds))) - 1)]
    metrics = slide_retrieval_metrics(queries)
    indexed = index.sources()
    return {"exclude": exclude, **{column: metrics[column] for column in METRIC_COLUMNS},
            "query_ms_median": round(statistics.median(milliseconds), 3), "query_ms_p95": round(p95, 3),
            "query_patches_per_slide": round(float(np.mean(costs.patches)), 2),
            "index_patches_per_slide": round(float(np.mean([row.patch_count for row in slides])), 2),
            "index_bytes_per_slide": round(index_bytes(index) / max(1, len(indexed))),
            "encoder": index.settings.describe_encoder(), "weights_sha256": index.settings.weights_sha256,
            **{key: value for key, value in settings.items() if key != "exclude"}}


def write_evaluation(out_dir: str | os.PathLike, index: SlideIndex,
                     evaluations: dict[str, tuple[list[SlideQuery], QueryCosts]], settings: dict) -> list[dict]:
    """slide_rankings.csv, slide_retrieval.csv, slide_retrieval_per_class.csv, the MV@5 confusion (CSV
    and PNG) and evaluation.json into out_dir; a file per exclusion where there are several."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, per_class = [], []
    for exclude, (queries, costs) in evaluations.items():
        suffix = "" if len(evaluations) == 1 else f"_{exclude}"
        write_rankings(out / f"slide_rankings{suffix}.csv", queries, max(settings["top_k"], RANKING_DEPTH))
        rows.append(evaluation_row(exclude, queries, costs, index, settings))
        per_class += [{"exclude": exclude, **row} for row in per_class_rows(queries)]
        labels, matrix = confusion(queries, 5)
        note = f"MV@5 prediction of each labelled slide, leave-one-{exclude}-out; rows true label, columns predicted"
        write_confusion_csv(out / f"slide_confusion{suffix}.csv", matrix, labels, note)
        plot_confusion(out / f"slide_confusion{suffix}.png", matrix, labels,
                       f"Slide search, MV@5, leave-one-{exclude}-out ({len(queries)} queries)")
    write_csv(rows, out / "slide_retrieval.csv")
    write_csv(per_class, out / "slide_retrieval_per_class.csv")
    record = {"command": command_line(), "manifest": json.loads((index.directory / "manifest.json").read_text()),
              "settings": settings, "seed": settings.get("seed"),
              "tuning": "none: every setting (slide score, neighbours, mosaic) was fixed before the run, not "
                        "chosen on this archive", "results": rows}
    atomic_write_text(out / "evaluation.json", json.dumps(record, indent=2, default=str) + "\n")
    return rows
