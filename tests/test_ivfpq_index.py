"""--index-type ivfpq through retrieve.py: a folder of 10,000 small patch images embedded with the
colour histogram, queried with copies of its images (re-ranking makes each find its original
first, and gives the exact similarities); an index too small to train answers exactly and says
"untrained", and the run that brings enough vectors trains it; a slide region found first through
IVF-PQ; reindex flat -> ivfpq -> flat gives the exact results again and keeps the index's --rerank.

The 10,000-image index is built once for the module (in two runs: the first one too small to train)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrieve
from histo_retrieval.search import vector_index
from histo_retrieval.search.index import SlideIndex
from KIMIA_data import synthetic

SIDE = 16  # pixels of each patch image, and the histogram's crop
FOLDERS, PER_FOLDER = 10, 1000  # 10,000 patches: IVFPQ_MIN_TRAIN (9,984) and a little more
PQ_BYTES = 16  # 512 / 16 = 32 values a sub-quantizer: trains in seconds (64 bytes takes ten times longer)
RERANK = 64
SAMPLE = 20  # indexed images queried by a copy


def run(*argv: str) -> int:
    return retrieve.main(retrieve.get_args_parser().parse_args([*argv]))


def cpu(*argv: str) -> list[str]:
    return [*argv, "--device", "cpu", "--workers", "0", "--batch-size", "256"]


def printed(*argv: str) -> str:
    """What `retrieve.py argv` prints (it must exit 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run(*argv) == 0
    return out.getvalue()


HISTOGRAM = ["--encoder", "histogram", "--encoder-options", json.dumps({"crop_size": SIDE})]


def naive_histogram(pixels: np.ndarray) -> np.ndarray:
    """The joint 8-bin RGB histogram of an H x W x 3 uint8 image, L2-normalised (what the index stores)."""
    cells = (pixels[..., 0].astype(int) // 32 * 8 + pixels[..., 1] // 32) * 8 + pixels[..., 2] // 32
    counts = np.bincount(cells.ravel(), minlength=512).astype(np.float64)
    return (counts / np.linalg.norm(counts)).astype(np.float32)


def write_patches(root: Path, seed: int = 0) -> list[Path]:
    """FOLDERS x PER_FOLDER images root/fNN/pNNNNN.png, each a random mix of 3 to 5 random colours,
    so that (almost) no two share a histogram; returns their paths in writing order."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(FOLDERS * PER_FOLDER):
        colours = rng.integers(0, 256, (int(rng.integers(3, 6)), 3), dtype=np.uint8)
        pixels = colours[rng.integers(0, len(colours), (SIDE, SIDE))]
        path = root / f"f{i // PER_FOLDER:02d}" / f"p{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def stored(index_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(patch ids, their stored vectors, their files), in id order."""
    with SlideIndex.open(index_dir) as index:
        parts = list(index.iter_vectors())
        ids = np.concatenate([p[0] for p in parts])
        patches = index.patches(ids)
        return ids, np.concatenate([p[1] for p in parts]), [patches[int(i)].file for i in ids]


def matches(index_dir: Path, queries: list[Path], out: Path, top_k: int = 5) -> dict[str, list[dict]]:
    """`retrieve.py query`'s matches.csv rows, by query file, in rank order."""
    assert run(*cpu("query", "--index", str(index_dir), *map(str, queries), "--top-k", str(top_k),
                    "--out-dir", str(out))) == 0
    by_query: dict[str, list[dict]] = {}
    with open(out / "matches.csv", newline="") as f:
        for row in csv.DictReader(f):
            by_query.setdefault(row["query"], []).append(row)
    assert all([r["rank"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)] for rows in by_query.values())
    return by_query


def exact_top(vectors: np.ndarray, files: list[str], query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    """The naive exact top-k: every stored vector's inner product with the query, best first."""
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [files[i] for i in order], scores[order]


def kind_of(index_dir: Path) -> str:
    with SlideIndex.open(index_dir) as index:
        return vector_index.index_kind(index.vectors)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """An ivfpq index (--pq-bytes 16, --rerank 64) of 10,000 patch images in 10 folders: the first
    run indexes one folder (too few vectors to train; `untrained` keeps a copy of that state), the
    second the other nine (enough: the run trains it). `queries`: copies of SAMPLE indexed images
    under new names elsewhere, with their originals."""
    root = tmp_path_factory.mktemp("ivfpq")
    paths = write_patches(root / "patches")
    folders = sorted((root / "patches").iterdir())
    index = root / "index"
    create = cpu("index", *HISTOGRAM, "--index", str(index), "--index-type", "ivfpq", "--pq-bytes", str(PQ_BYTES),
                 "--rerank", str(RERANK))
    assert run(*create, str(folders[0])) == 0
    untrained = root / "untrained"
    shutil.copytree(index, untrained, ignore=shutil.ignore_patterns(".lock"))
    assert run(*cpu("index", *HISTOGRAM, "--index", str(index), *map(str, folders[1:]))) == 0
    originals = [paths[i] for i in np.random.default_rng(1).choice(len(paths), SAMPLE, replace=False)]
    (root / "queries").mkdir()
    queries = []
    for number, original in enumerate(originals):
        copy = root / "queries" / f"copy_{number:02d}.png"
        shutil.copyfile(original, copy)
        queries.append(copy)
    return {"root": root, "index": index, "untrained": untrained, "folders": folders, "queries": queries,
            "originals": [str(p.resolve()) for p in originals]}


@pytest.mark.slow
def test_reranked_ivfpq_finds_each_copy_s_original_first_with_exact_similarities(archive, tmp_path):
    index = archive["index"]
    ids, vectors, files = stored(index)
    assert len(ids) == FOLDERS * PER_FOLDER and kind_of(index) == "ivfpq"
    listing = printed("list", "--index", str(index))
    assert (f"ivfpq ({PQ_BYTES} bytes a vector, re-ranking the best {RERANK} exactly), "
            f"trained on {FOLDERS * PER_FOLDER} vectors" in listing)
    for query, original in zip(archive["queries"], archive["originals"]):  # the store holds the naive histograms
        with Image.open(query) as image:
            np.testing.assert_allclose(vectors[files.index(original)], naive_histogram(np.asarray(image)), atol=1e-6)

    found = matches(index, archive["queries"], tmp_path / "reranked")
    for query, original in zip(archive["queries"], archive["originals"]):
        rows = found[str(query.resolve())]
        assert rows[0]["file"] == original
        query_vector = vectors[files.index(original)]
        exact_files, exact_scores = exact_top(vectors, files, query_vector, 5)
        assert float(rows[0]["similarity"]) == pytest.approx(1.0, abs=1e-5)
        # Re-ranked similarities are the exact inner products of the stored vectors, in order.
        shown = [float(r["similarity"]) for r in rows]
        assert shown == pytest.approx([float(vectors[files.index(r["file"])] @ query_vector) for r in rows], abs=1e-5)
        assert shown == sorted(shown, reverse=True) and shown[0] == pytest.approx(exact_scores[0], abs=1e-5)

    # The same index without re-ranking: its similarities are the codes' approximations.
    plain = tmp_path / "plain"
    shutil.copytree(index, plain, ignore=shutil.ignore_patterns(".lock"))
    assert run("reindex", "--index", str(plain), "--rerank", "0") == 0
    assert "re-ranking" not in printed("list", "--index", str(plain))
    approximate = matches(plain, archive["queries"], tmp_path / "approximate")
    errors, missed = [], 0
    for query, original in zip(archive["queries"], archive["originals"]):
        rows = approximate[str(query.resolve())]
        query_vector = vectors[files.index(original)]
        errors += [abs(float(r["similarity"]) - float(vectors[files.index(r["file"])] @ query_vector)) for r in rows]
        missed += rows[0]["file"] != original
    assert max(errors) > 1e-3, "without --rerank the similarities should be approximate"
    print(f"without --rerank: {missed} of {SAMPLE} copies missed their original; largest similarity error "
          f"{max(errors):.3f}")


@pytest.mark.slow
def test_an_untrained_ivfpq_index_answers_exactly_until_a_run_brings_enough_vectors(archive, tmp_path):
    untrained = archive["untrained"]
    listing = printed("list", "--index", str(untrained))
    assert (f"ivfpq ({PQ_BYTES} bytes a vector, re-ranking the best {RERANK} exactly), untrained: searched exactly "
            f"until it holds {vector_index.IVFPQ_MIN_TRAIN} vectors to train on (it holds {PER_FOLDER})" in listing)
    assert kind_of(untrained) == "flat"
    flat = tmp_path / "flat"
    shutil.copytree(untrained, flat, ignore=shutil.ignore_patterns(".lock"))
    assert run("reindex", "--index", str(flat), "--index-type", "flat") == 0
    assert "untrained:" not in printed("list", "--index", str(flat))

    # Queries: copies of the first folder's images (those the untrained index holds) and of others.
    queries = sorted(archive["folders"][0].iterdir())[:5] + archive["queries"][:5]
    ids, vectors, files = stored(untrained)
    answers = matches(untrained, queries, tmp_path / "untrained_out", top_k=8)
    reference = matches(flat, queries, tmp_path / "flat_out", top_k=8)
    assert answers.keys() == reference.keys() and len(answers) == len(queries)
    for query in queries:
        rows, expected = answers[str(query.resolve())], reference[str(query.resolve())]
        assert [r["file"] for r in rows] == [r["file"] for r in expected]
        assert [float(r["similarity"]) for r in rows] == pytest.approx([float(r["similarity"]) for r in expected],
                                                                      abs=1e-6)
        with Image.open(query) as image:
            exact_files, exact_scores = exact_top(vectors, files, naive_histogram(np.asarray(image)), 9)
        if str(query.resolve()) in files:  # an indexed file never finds itself
            exact_files, exact_scores = zip(*[(f, s) for f, s in zip(exact_files, exact_scores)
                                              if f != str(query.resolve())])
        assert [float(r["similarity"]) for r in rows] == pytest.approx(list(exact_scores[:8]), abs=1e-5)

    # The second run of the fixture brought the other 9,000 vectors: it trained the index.
    assert kind_of(archive["index"]) == "ivfpq"
    assert "untrained:" not in printed("list", "--index", str(archive["index"]))


@pytest.mark.slow
def test_reindex_flat_ivfpq_flat_gives_the_exact_results_and_keeps_the_index_s_rerank(archive, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(archive["index"], index, ignore=shutil.ignore_patterns(".lock"))
    ids, vectors, files = stored(index)
    queries = archive["queries"][:8]

    assert run("reindex", "--index", str(index), "--index-type", "flat") == 0
    assert kind_of(index) == "flat"
    before = matches(index, queries, tmp_path / "flat_before", top_k=6)
    for query in queries:
        with Image.open(query) as image:
            exact_files, exact_scores = exact_top(vectors, files, naive_histogram(np.asarray(image)), 6)
        rows = before[str(query.resolve())]
        assert [float(r["similarity"]) for r in rows] == pytest.approx(list(exact_scores), abs=1e-5)
        assert rows[0]["file"] == exact_files[0]

    # ivfpq again without --pq-bytes or --rerank: the index's own stay (OPQ is left out: its training takes
    # minutes on 10,000 vectors here).
    assert run("reindex", "--index", str(index), "--index-type", "ivfpq") == 0
    assert kind_of(index) == "ivfpq"
    manifest = json.loads((index / "manifest.json").read_text())["vector_index"]
    assert manifest["rerank"] == RERANK and manifest["pq_bytes"] == PQ_BYTES and manifest["opq"] is False
    listing = printed("list", "--index", str(index))
    assert f"ivfpq ({PQ_BYTES} bytes a vector, re-ranking the best {RERANK} exactly), trained on" in listing
    reranked = matches(index, queries, tmp_path / "ivfpq", top_k=6)
    for query in queries:
        assert reranked[str(query.resolve())][0]["file"] == before[str(query.resolve())][0]["file"]

    assert run("reindex", "--index", str(index), "--index-type", "flat") == 0
    after = matches(index, queries, tmp_path / "flat_after", top_k=6)
    assert {q: [(r["file"], r["similarity"]) for r in rows] for q, rows in after.items()} == \
        {q: [(r["file"], r["similarity"]) for r in rows] for q, rows in before.items()}
    after_ids, after_vectors, _ = stored(index)
    assert np.array_equal(after_ids, ids) and np.array_equal(after_vectors, vectors)  # nothing embedded again


@pytest.mark.slow
def test_a_slide_region_is_found_first_through_reranked_ivfpq(archive, tmp_path):
    """Two synthetic slides added to (a copy of) the trained index: their patches get codes of the
    lists trained on the images, and a region of one slide finds its own location first."""
    index = tmp_path / "index"
    shutil.copytree(archive["index"], index, ignore=shutil.ignore_patterns(".lock"))
    records = synthetic.write_slide_set(tmp_path / "slides", count=2, classes=2, size=(1024, 768), seed=4)
    slides = [str(tmp_path / "slides" / r["file"]) for r in records]
    assert run(*cpu("index", *HISTOGRAM, "--index", str(index), *slides)) == 0
    assert kind_of(index) == "ivfpq"
    ids, vectors, files = stored(index)
    with SlideIndex.open(index) as opened:
        patches = opened.patches(ids)
    on_slides = [i for i, pid in enumerate(ids) if patches[int(pid)].source == slides[1]]
    assert len(on_slides) > 100 and len(ids) == FOLDERS * PER_FOLDER + sum(
        patches[int(pid)].source in slides for pid in ids)
    # A patch of the second slide whose histogram no other patch shares (so that its location is the one answer).
    unique = [i for i in on_slides if np.sum(np.all(vectors == vectors[i], axis=1)) == 1]
    chosen = patches[int(ids[unique[len(unique) // 2]])]
    out = tmp_path / "out"
    assert run(*cpu("query", "--index", str(index), slides[1], "--region",
                    f"{chosen.x},{chosen.y},{chosen.width},{chosen.height}", "--out-dir", str(out),
                    "--top-k", "5")) == 0
    with open(out / "matches.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert (first["source"], int(first["x"]), int(first["y"])) == (slides[1], chosen.x, chosen.y)
    assert float(first["similarity"]) == pytest.approx(1.0, abs=1e-5)
    with open(out / "slides.csv", newline="") as f:
        assert next(csv.DictReader(f))["source"] == slides[1]
