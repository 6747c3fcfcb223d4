"""histo_retrieval.search.slide_metrics: every metric column against a plain re-computation from
slide_rankings.csv's rows (loops written here, independent of the module) and against numbers worked
by hand; the rankings file's round trip and its refusals."""
from __future__ import annotations

import csv
import random

import numpy as np
import pytest

from histo_retrieval.errors import UserError
from histo_retrieval.search.slide_metrics import (
    METRIC_COLUMNS, PER_CLASS_COLUMNS, RANKING_COLUMNS, RankedSlide, SlideQuery, confusion, majority_vote,
    per_class_rows, read_rankings, slide_retrieval_metrics, write_rankings)


def query(name: str, label: str, patient: str, labels: str) -> SlideQuery:
    """A query whose ranking has the labels of `labels` (one letter each), best first."""
    ranking = tuple(RankedSlide(f"{name}_r{i}", lab, f"p_{name}_{i}", round(1.0 - 0.1 * i, 6))
                    for i, lab in enumerate(labels))
    return SlideQuery(name, label, patient, ranking)


# Labels A (3 queries), B (2) and C (a label with one query).
HAND = [
    query("q1", "A", "p1", "ABABC"),    # MV@5: A 2, B 2: a tie, to A (ranked first)
    query("q2", "A", "p1", "BABAA"),
    query("q3", "A", "p2", "CB"),       # fewer than 5 results; MV@3: C 1, B 1: a tie, to C
    query("q4", "B", "p3", ""),         # no ranking: every prediction wrong
    query("q5", "B", "p4", "BCCBBAA"),  # ranks 6 and 7 count for no metric
    query("q6", "C", "p5", "ACACB"),    # MV@5: A 2, C 2: a tie, to A
]
# Worked by hand (rel at ranks; AP@5 sums of P@i at the relevant ranks):
#   q1 top1 A, MV3 A, MV5 A; rel 1,3: 1 + 2/3 = 5/3 -> sish 1/3, hits 5/6
#   q2 top1 B, MV3 B, MV5 A; rel 2,4,5: 1/2 + 2/4 + 3/5 = 1.6 -> sish 0.32, hits 1.6/3
#   q3 top1 C, MV3 C, MV5 C; no hit -> 0, 0
#   q4 None everywhere; 0, 0
#   q5 top1 B, MV3 C, MV5 B; rel 1,4,5: 1 + 2/4 + 3/5 = 2.1 -> sish 0.42, hits 0.7
#   q6 top1 A, MV3 A, MV5 A; rel 2,4: 1/2 + 2/4 = 1 -> sish 0.2, hits 0.5
# top1_acc = 2/6 (q1, q5); mv3_acc = 1/6 (q1); mv5_acc = 3/6 (q1, q2, q5)
# mmv5 = mean(A 2/3, B 1/2, C 0) = 7/18
# map5_sish = mean(A (1/3 + 0.32 + 0)/3, B 0.42/2, C 0.2)
# map5_hits = mean(A (5/6 + 1.6/3 + 0)/3, B 0.7/2, C 0.5)
# mv5_f1: truth AAABBC, predicted AACxBA: A tp 2 fp 1 fn 1 -> 2/3; B tp 1 fp 0 fn 1 -> 2/3; C 0 -> 4/9
HAND_ANSWERS = {
    "queries": 6, "top1_acc": 2 / 6, "mv3_acc": 1 / 6, "mv5_acc": 0.5, "mmv5": 7 / 18,
    "map5_sish": ((1 / 3 + 0.32) / 3 + 0.21 + 0.2) / 3,
    "map5_hits": ((5 / 6 + 1.6 / 3) / 3 + 0.35 + 0.5) / 3,
    "mv5_f1": 4 / 9,
}


def naive_metrics(path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Every metric column and the per-label rows, recomputed from slide_rankings.csv's plain rows."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    truth: dict[str, str] = {}
    labels_of: dict[str, list[str]] = {}
    for row in rows:
        truth[row["query"]] = row["query_label"]
        labels_of.setdefault(row["query"], [])
        if row["rank"]:
            assert int(row["rank"]) == len(labels_of[row["query"]]) + 1
            labels_of[row["query"]].append(row["label"])

    def vote(ranked: list[str], k: int):
        top = ranked[:k]
        if not top:
            return None
        best_label, best_count = None, 0
        for label in top:  # in rank order: a later label must beat, not equal, the count to win
            count = sum(1 for other in top if other == label)
            if count > best_count:
                best_label, best_count = label, count
        return best_label

    names = list(truth)
    predicted = {"top1": {q: (labels_of[q][0] if labels_of[q] else None) for q in names},
                 "mv3": {q: vote(labels_of[q], 3) for q in names},
                 "mv5": {q: vote(labels_of[q], 5) for q in names}}
    sish, hits = {}, {}
    for q in names:
        rel = [1 if lab == truth[q] else 0 for lab in labels_of[q][:5]]
        terms = [sum(rel[:i + 1]) / (i + 1) * rel[i] for i in range(len(rel))]
        sish[q] = sum(terms) / 5
        hits[q] = sum(terms) / sum(rel) if sum(rel) else 0.0
    classes = sorted(set(truth.values()))
    per_label = {}
    for c in classes:
        members = [q for q in names if truth[q] == c]
        per_label[c] = {"queries": len(members),
                        **{f"{m}_acc": sum(predicted[m][q] == c for q in members) / len(members) for m in predicted},
                        "map5_sish": sum(sish[q] for q in members) / len(members),
                        "map5_hits": sum(hits[q] for q in members) / len(members)}
    out: dict[str, float] = {"queries": len(names)}
    for m, guess in predicted.items():
        out[f"{m}_acc"] = sum(guess[q] == truth[q] for q in names) / len(names)
        f1s = []
        for c in classes:
            tp = sum(guess[q] == c and truth[q] == c for q in names)
            fp = sum(guess[q] == c and truth[q] != c for q in names)
            fn = sum(guess[q] != c and truth[q] == c for q in names)
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        out[f"{m}_f1"] = sum(f1s) / len(f1s)
    out["mmv5"] = sum(per_label[c]["mv5_acc"] for c in classes) / len(classes)
    out["map5_sish"] = sum(per_label[c]["map5_sish"] for c in classes) / len(classes)
    out["map5_hits"] = sum(per_label[c]["map5_hits"] for c in classes) / len(classes)
    return out, per_label


def random_queries(seed: int) -> list[SlideQuery]:
    rng = random.Random(seed)
    labels = ["s2", "s10", "x", "y"]
    queries = []
    for i in range(30):
        ranked = "".join(rng.choice("0123") for _ in range(rng.choice([0, 1, 2, 3, 4, 5, 6, 9])))
        ranking = tuple(RankedSlide(f"r{i}_{j}", labels[int(d)], f"p{j}", rng.random()) for j, d in enumerate(ranked))
        queries.append(SlideQuery(f"q{i}", labels[rng.randrange(4)], f"p{i % 7}", ranking))
    return queries


def test_every_metric_column_matches_the_hand_worked_numbers():
    metrics = slide_retrieval_metrics(HAND)
    assert tuple(metrics) == METRIC_COLUMNS
    assert metrics["queries"] == 6
    for name, value in HAND_ANSWERS.items():
        assert metrics[name] == pytest.approx(value), name


@pytest.mark.parametrize("queries", [HAND, random_queries(0), random_queries(1)], ids=["hand", "random0", "random1"])
def test_every_column_matches_a_plain_recomputation_from_the_rankings_file(tmp_path, queries):
    path = tmp_path / "slide_rankings.csv"
    write_rankings(path, queries)
    naive, naive_classes = naive_metrics(path)
    metrics = slide_retrieval_metrics(queries)
    for name in METRIC_COLUMNS:
        assert metrics[name] == pytest.approx(naive[name]), name
    rows = per_class_rows(queries)
    natural_order = ["A", "B", "C", "s2", "s10", "x", "y"]  # s2 before s10
    assert [row["label"] for row in rows] == [label for label in natural_order if label in naive_classes]
    for row in rows:
        assert tuple(row) == PER_CLASS_COLUMNS
        for name, value in naive_classes[row["label"]].items():
            assert row[name] == pytest.approx(value), (row["label"], name)


def test_per_class_rows_by_hand():
    rows = {row["label"]: row for row in per_class_rows(HAND)}
    assert rows["A"]["queries"] == 3 and rows["C"]["queries"] == 1
    assert rows["A"]["mv5_acc"] == pytest.approx(2 / 3) and rows["B"]["mv5_acc"] == 0.5
    assert rows["C"]["top1_acc"] == 0 and rows["C"]["map5_hits"] == pytest.approx(0.5)
    assert rows["B"]["map5_sish"] == pytest.approx(0.21)


def test_majority_vote_ties_short_and_empty_rankings():
    ranking = HAND[0].ranking  # A B A B C
    assert majority_vote(ranking, 5) == "A"  # A 2, B 2: the tie goes to A, ranked first
    assert majority_vote(ranking, 2) == "A"  # A 1, B 1
    assert majority_vote(query("t", "B", "p", "BAAB").ranking, 4) == "B"  # B ranked first among the tied
    assert majority_vote(query("t", "B", "p", "CBB").ranking, 5) == "B"  # 3 slides vote for k = 5
    assert majority_vote((), 3) is None
    with pytest.raises(ValueError):
        majority_vote(ranking, 0)


def test_confusion_of_mv5_with_a_none_column():
    columns, matrix = confusion(HAND)
    # rows A, B, C (true), columns A, B, C, none (MV@5): q1 q2 -> A, q3 -> C; q4 -> none, q5 -> B; q6 -> A
    assert columns == ["A", "B", "C", "none"]
    np.testing.assert_array_equal(matrix, [[2, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 0]])
    columns, matrix = confusion(HAND[:3] + HAND[4:], k=3)  # every query has a ranking: no "none" column
    assert columns == ["A", "B", "C"]
    # MV@3: q1 A, q2 B, q3 C; q5 C; q6 A
    np.testing.assert_array_equal(matrix, [[1, 1, 1], [0, 0, 1], [1, 0, 0]])


def test_rankings_round_trip_exactly_including_a_query_with_none(tmp_path):
    path = tmp_path / "slide_rankings.csv"
    write_rankings(path, HAND, depth=None)
    assert read_rankings(path) == HAND
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == RANKING_COLUMNS
    assert ["q4", "B", "p3", "", "", "", "", ""] in rows  # the query with no ranking keeps one row
    write_rankings(path, HAND)  # the default depth, 5: q5 loses ranks 6 and 7, no metric changes
    back = read_rankings(path)
    assert back == [SlideQuery(q.query, q.label, q.patient, q.ranking[:5]) for q in HAND]
    assert slide_retrieval_metrics(back) == slide_retrieval_metrics(HAND)
    odd = [SlideQuery("a,b \"c\".svs", "l,1", "", (RankedSlide("x\ny.svs", "l,1", "", 1 / 3),))]
    write_rankings(path, odd)
    assert read_rankings(path) == odd


def test_write_rankings_refuses_a_shallow_depth_and_a_repeated_query(tmp_path):
    with pytest.raises(UserError, match="at least the top 5"):
        write_rankings(tmp_path / "r.csv", HAND, depth=3)
    with pytest.raises(UserError, match="q1.*twice"):
        write_rankings(tmp_path / "r.csv", [HAND[0], HAND[0]])
    assert not (tmp_path / "r.csv").exists()


HEADER = ",".join(RANKING_COLUMNS)


@pytest.mark.parametrize("text, line, words", [
    ("query,label,rank\nq,A,1\n", 1, "columns must be"),
    (f"{HEADER}\nq1,A,p,1,s,A,p,0.5\nq1,A,p,3,s,A,p,0.4\n", 3, "rank 3 where 2"),
    (f"{HEADER}\nq1,A,p,1,s,A,p,high\n", 2, "not a number"),
    (f"{HEADER}\nq1,A,p,one,s,A,p,0.5\n", 2, "not a whole number"),
    (f"{HEADER}\nq1,A,p,1,s,A,p,0.5\nq1,A,p,2,s,A\n", 3, "6 fields"),
    (f"{HEADER}\nq1,A,p,1,s,A,p,0.5\nq2,B,p,,,,,\nq1,A,p,2,s,A,p,0.5\n", 4, "again after other queries"),
    (f"{HEADER}\nq1,A,p,1,s,A,p,0.5\nq1,B,p,2,s,A,p,0.5\n", 3, "another query_label"),
    (f"{HEADER}\nq1,A,p,,s,,,\n", 2, "without a rank"),
    (f"{HEADER}\nq1,A,p,,,,,\nq1,A,p,1,s,A,p,0.5\n", 3, "no ranking"),
    (f"{HEADER}\nq1,A,p,1,,A,p,0.5\n", 2, "empty slide or label"),
])
def test_a_malformed_rankings_file_is_refused_in_one_line_naming_the_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "slide_rankings.csv"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        read_rankings(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and f"line {line}:" in message and words in message


def test_a_missing_rankings_file_and_no_queries_are_refused(tmp_path):
    with pytest.raises(UserError, match="nothing.csv: cannot read it"):
        read_rankings(tmp_path / "nothing.csv")
    for metric in (slide_retrieval_metrics, per_class_rows, confusion):
        with pytest.raises(UserError, match="no labelled slides"):
            metric([])
