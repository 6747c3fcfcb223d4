"""The metrics of whole-slide retrieval: rankings in, numbers out (no index, no model).

Each labelled slide queries the archive; its ranking (best first, exclusions already applied) holds the
other labelled slides. Definitions (docs/slide_search.md, "Evaluating slide search: the metrics"):
- top-1: the label of the best-ranked slide. MV@k: the majority label among the top k, ties to the tied
  label ranked first; a query with fewer than k ranked slides votes with those it has; one with none
  predicts nothing (None), which is wrong. (Kimia Lab's papers: top-1, MV@3, MV@5.)
- `*_acc`: the share of queries whose prediction is their label; `*_f1`: scikit-learn's macro F1 of that
  prediction over the queries' labels (None is a prediction that is no label).
- mmv5: the mean over labels of the MV@5 accuracy of that label's queries (SISH's mMV@5).
- AP@5, with rel_i = 1 when the slide at rank i has the query's label and P@i the precision of the
  first i: `map5_sish` = (1/5) sum_{i<=5} P@i rel_i (SISH), `map5_hits` = sum_{i<=5} P@i rel_i /
  sum_{i<=5} rel_i, 0 without a hit (HSHR); each averaged within each label, then over labels.

slide_rankings.csv holds one row per query and rank (RANKING_COLUMNS); a query whose ranking is empty
gets one row with only its query, query_label and query_patient (rank, slide, label, patient and score
empty), so that read_rankings gives it back and every metric can be recomputed from the file.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from histo_retrieval.errors import UserError
from histo_retrieval.files import atomic_write, natural_key, natural_sorted


@dataclass(frozen=True)
class RankedSlide:
    """One candidate slide in a query's ranking."""
    slide: str
    label: str
    patient: str
    score: float


@dataclass(frozen=True)
class SlideQuery:
    """One labelled slide used as a query, with its ranking best first (exclusions already applied)."""
    query: str
    label: str
    patient: str
    ranking: tuple[RankedSlide, ...]


RANKING_COLUMNS = ("query", "query_label", "query_patient", "rank", "slide", "label", "patient", "score")
METRIC_COLUMNS = ("queries", "top1_acc", "mv3_acc", "mv5_acc", "top1_f1", "mv3_f1", "mv5_f1", "mmv5",
                  "map5_sish", "map5_hits")
PER_CLASS_COLUMNS = ("label", "queries", "top1_acc", "mv3_acc", "mv5_acc", "map5_sish", "map5_hits")
# The depth every metric reads: MV@5 and AP@5.
METRIC_DEPTH = 5
# The confusion matrix's column for queries with no ranking (NONE_COLUMN_ALT when a label is "none").
NONE_COLUMN = "none"
NONE_COLUMN_ALT = "(no prediction)"
# F1 and the confusion matrix need a prediction for every query: a ranking-less query predicts this,
# which no label can be (labels are read from CSV text, which holds no NUL).
_NO_LABEL = "\x00no label"


def write_rankings(path: str | os.PathLike, queries: Sequence[SlideQuery], depth: int | None = 5) -> None:
    """slide_rankings.csv (RANKING_COLUMNS), atomically: the first `depth` slides of each query's ranking
    (None: all of them), rank from 1; a query with an empty ranking gets one row with rank, slide,
    label, patient and score empty."""
    if depth is not None and depth < METRIC_DEPTH:
        raise UserError(f"the rankings file keeps at least the top {METRIC_DEPTH} slides of each query "
                        f"(MV@5 and mAP@5 are recomputed from it), not {depth}")
    names = Counter(q.query for q in queries)
    repeated = [name for name, count in names.items() if count > 1]
    if repeated:
        raise UserError(f"{os.fspath(path)}: query {repeated[0]!r} is given twice; each slide queries once")

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(RANKING_COLUMNS)
            for q in queries:
                head = (q.query, q.label, q.patient)
                if not q.ranking:
                    writer.writerow((*head, "", "", "", "", ""))
                for rank, r in enumerate(q.ranking[:depth], start=1):
                    # repr of a float reads back as the same float: the file round-trips exactly.
                    writer.writerow((*head, rank, r.slide, r.label, r.patient, repr(float(r.score))))

    atomic_write(path, write)


def read_rankings(path: str | os.PathLike) -> list[SlideQuery]:
    """The queries of a slide_rankings.csv, in the file's order (write_rankings' inverse); a malformed
    file is refused with one line naming it and the line."""
    path = os.fspath(path)
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err}); pass a slide_rankings.csv") from None
    queries: list[SlideQuery] = []
    seen: set[str] = set()
    current: tuple[str, str, str] | None = None
    ranking: list[RankedSlide] = []
    empty = False  # the current query had its no-ranking row

    def finish() -> None:
        if current is not None:
            queries.append(SlideQuery(*current, tuple(ranking)))

    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None or tuple(header) != RANKING_COLUMNS:
                raise UserError(f"{path}: line 1: the columns must be {','.join(RANKING_COLUMNS)}; "
                                f"this is not a slide_rankings.csv")
            for row in reader:
                line = reader.line_num

                def bad(what: str) -> UserError:
                    return UserError(f"{path}: line {line}: {what}; write the file again with retrieve.py evaluate")

                if not row:
                    continue
                if len(row) != len(RANKING_COLUMNS):
                    raise bad(f"{len(row)} fields, not {len(RANKING_COLUMNS)}")
                query, query_label, query_patient, rank, slide, label, patient, score = row
                if not query or not query_label:
                    raise bad("empty query or query_label")
                if current is None or query != current[0]:
                    if query in seen:
                        raise bad(f"query {query!r} again after other queries; each query's rows must follow each other")
                    finish()
                    seen.add(query)
                    current, ranking, empty = (query, query_label, query_patient), [], False
                elif (query_label, query_patient) != current[1:]:
                    raise bad(f"query {query!r} has another query_label or query_patient than on its first line")
                elif empty:
                    raise bad(f"query {query!r} has a row without a rank (no ranking) and ranked rows")
                if rank == "":
                    if slide or label or patient or score or ranking:
                        raise bad("a row without a rank (a query with no ranking) must have empty slide, label, "
                                  "patient and score, and be its query's only row")
                    empty = True
                    continue
                try:
                    rank_number = int(rank)
                except ValueError:
                    raise bad(f"rank {rank!r} is not a whole number") from None
                if rank_number != len(ranking) + 1:
                    raise bad(f"rank {rank_number} where {len(ranking) + 1} was due (ranks run 1, 2, ... in order)")
                if not slide or not label:
                    raise bad("empty slide or label")
                try:
                    value = float(score)
                except ValueError:
                    raise bad(f"score {score!r} is not a number") from None
                ranking.append(RankedSlide(slide, label, patient, value))
        except csv.Error as err:
            raise UserError(f"{path}: line {reader.line_num}: not a readable CSV ({err})") from None
        finish()
    return queries


def majority_vote(ranking: Sequence[RankedSlide], k: int) -> str | None:
    """MV@k: the label most frequent among the first k slides, a tie going to the tied label ranked
    first; with fewer than k slides, those there are vote; with none, None (a wrong answer)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    labels = [r.label for r in ranking[:k]]
    if not labels:
        return None
    counts = Counter(labels)
    best = max(counts.values())
    # labels is in rank order: the first label reaching the top count is the tied label ranked first.
    return next(label for label in labels if counts[label] == best)


def top1(ranking: Sequence[RankedSlide]) -> str | None:
    """The label of the best-ranked slide (None without one)."""
    return ranking[0].label if ranking else None


def average_precision_at_5(query: SlideQuery) -> tuple[float, float]:
    """(SISH's AP@5, HSHR's AP@5) of one query: sum_{i<=5} P@i rel_i divided by 5, and by the hits (0
    without a hit)."""
    hits, total = 0, 0.0
    for i, r in enumerate(query.ranking[:METRIC_DEPTH], start=1):
        if r.label == query.label:
            hits += 1
            total += hits / i  # P@i at a relevant rank i: the hits so far over i
    return total / METRIC_DEPTH, (total / hits if hits else 0.0)


def _predictions(queries: Sequence[SlideQuery]) -> dict[str, list[str | None]]:
    return {"top1": [top1(q.ranking) for q in queries],
            "mv3": [majority_vote(q.ranking, 3) for q in queries],
            "mv5": [majority_vote(q.ranking, 5) for q in queries]}


def _by_label(queries: Sequence[SlideQuery]) -> dict[str, list[int]]:
    """label -> the indices of its queries, labels in natural order."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(q.label, []).append(i)
    return {label: groups[label] for label in natural_sorted(groups)}


def _check(queries: Sequence[SlideQuery]) -> None:
    if not queries:
        raise UserError("no labelled slides to evaluate: attach labels with retrieve.py label first")


def per_class_rows(queries: Sequence[SlideQuery]) -> list[dict[str, str | int | float]]:
    """One row per query label (natural order), PER_CLASS_COLUMNS: its queries, the top-1, MV@3 and MV@5
    accuracy of those queries, and their mean AP@5 (SISH's and HSHR's)."""
    _check(queries)
    predicted = _predictions(queries)
    ap = [average_precision_at_5(q) for q in queries]
    rows = []
    for label, members in _by_label(queries).items():
        row: dict[str, str | int | float] = {"label": label, "queries": len(members)}
        for name, guesses in predicted.items():
            row[f"{name}_acc"] = float(np.mean([guesses[i] == label for i in members]))
        row["map5_sish"] = float(np.mean([ap[i][0] for i in members]))
        row["map5_hits"] = float(np.mean([ap[i][1] for i in members]))
        rows.append(row)
    return rows


def slide_retrieval_metrics(queries: Sequence[SlideQuery]) -> dict[str, float | int]:
    """Every METRIC_COLUMNS value of a set of queries."""
    from sklearn.metrics import f1_score  # imported here: a second of start-up the other commands never need

    _check(queries)
    truth = [q.label for q in queries]
    labels = natural_sorted(set(truth))
    metrics: dict[str, float | int] = {"queries": len(queries)}
    predicted = _predictions(queries)
    for name, guesses in predicted.items():
        metrics[f"{name}_acc"] = float(np.mean([g == t for g, t in zip(guesses, truth)]))
    for name, guesses in predicted.items():
        # Macro over the queries' labels; a label never predicted has precision 0 (zero_division=0).
        metrics[f"{name}_f1"] = float(f1_score(truth, [_NO_LABEL if g is None else g for g in guesses],
                                               labels=labels, average="macro", zero_division=0))
    classes = per_class_rows(queries)
    metrics["mmv5"] = float(np.mean([row["mv5_acc"] for row in classes]))
    metrics["map5_sish"] = float(np.mean([row["map5_sish"] for row in classes]))
    metrics["map5_hits"] = float(np.mean([row["map5_hits"] for row in classes]))
    return {name: metrics[name] for name in METRIC_COLUMNS}


def confusion(queries: Sequence[SlideQuery], k: int = 5) -> tuple[list[str], np.ndarray]:
    """The confusion matrix of the MV@k prediction: (columns, matrix). Rows are the labels in natural
    order (the true labels and any label predicted), columns the same labels plus, when some query has
    no ranking, a last column NONE_COLUMN ("none"; NONE_COLUMN_ALT when a label is called "none")
    counting those queries; so matrix is len(rows) x len(columns) int64, rows = columns[:matrix.shape[0]]."""
    from sklearn.metrics import confusion_matrix

    _check(queries)
    truth = [q.label for q in queries]
    guesses = [majority_vote(q.ranking, k) for q in queries]
    labels = sorted(set(truth) | {g for g in guesses if g is not None}, key=natural_key)
    predicted = [_NO_LABEL if g is None else g for g in guesses]
    matrix = confusion_matrix(truth, predicted, labels=[*labels, _NO_LABEL]).astype(np.int64)
    matrix = matrix[:len(labels)]  # no query's true label is _NO_LABEL: its row is all zeros
    if not matrix[:, -1].any():
        return labels, matrix[:, :-1]
    return [*labels, NONE_COLUMN if NONE_COLUMN not in labels else NONE_COLUMN_ALT], matrix
