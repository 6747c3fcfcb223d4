"""bench.archive_scale: the simulated archive it writes through add_sources, its exact search by
streaming the store against naive numpy, its arguments, and the bench itself run small."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest

from bench import archive_scale
from histo_retrieval.errors import UserError
from histo_retrieval.search.index import SlideIndex


def small_args(**changes) -> argparse.Namespace:
    args = archive_scale.get_args_parser().parse_args([])
    args.slides, args.centres = 7, 5
    for name, value in changes.items():
        setattr(args, name, value)
    archive_scale.check_args(args)
    return args


def test_the_archive_holds_its_slides_and_patches_and_exact_search_matches_numpy(tmp_path: Path) -> None:
    args = small_args()
    source = archive_scale.mixture(args)
    directory = tmp_path / "archive"
    archive_scale.write_archive(directory, 3003, args, source)
    with SlideIndex.open(directory) as index:
        sources = index.sources()
        assert len(sources) == 7 and index.patch_count() == 3003
        assert sorted(row.patch_count for row in sources) == [429] * 7
        assert index.store_stats().live_rows == 3003 and index.settings.vector_dtype == "float16"
        assert index.settings.dim == archive_scale.DIM
        assert (directory / "vectors").is_dir()
        parts = [index.source_vectors(row.id) for row in sources]
    ids = np.concatenate([part[0] for part in parts])
    vectors = np.concatenate([part[1] for part in parts])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)  # unit rows, float16-rounded
    # clustered, as embeddings are: a row's nearest other row is much closer than a random one
    sims = vectors[:200] @ vectors.T
    sims[np.arange(200), np.arange(200)] = -np.inf
    assert np.median(sims.max(axis=1)) > np.median(sims) + 0.3
    queries = source.sample(13, np.random.default_rng(5))[0]
    expected = ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]]
    assert np.array_equal(archive_scale.exact_top_k(directory, queries, 10), expected)


def test_uneven_sizes_spread_over_the_slides(tmp_path: Path) -> None:
    args = small_args(slides=4, vector_dtype="float32")
    archive_scale.write_archive(tmp_path / "archive", 10, args, archive_scale.mixture(args))
    with SlideIndex.open(tmp_path / "archive") as index:
        assert [row.patch_count for row in index.sources()] == [3, 3, 2, 2]
        assert index.settings.vector_dtype == "float32"


@pytest.mark.parametrize("argv, message", [
    (["--vector-store", "milvus-lite", "--types", "hnsw", "ivfpq"],
     "--types ivfpq: --vector-store milvus-lite has no such index; choose among flat ivf hnsw"),
    (["--vector-store", "milvus-lite", "--vector-dtype", "float16"],
     "--vector-dtype float16: --vector-store milvus-lite keeps float32; drop --vector-dtype"),
    (["--sizes", "5", "--slides", "10"], "each size must be at least the slides"),
    (["--pq-bytes", "60"], "--pq-bytes 60: must divide the vectors' 512 dimensions"),
    (["--repeats", "0"], "--repeats 0: must be at least 1"),
    (["--max-seconds", "0"], "--max-seconds 0.0: must be positive"),
])
def test_bad_arguments_are_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        archive_scale.main(argv + ["--no-record"])


def test_a_busy_work_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    with pytest.raises(UserError, match=f"--work {tmp_path}: not empty"):
        archive_scale.main(["--quick", "--work", str(tmp_path), "--no-record"])


@pytest.mark.slow
def test_the_bench_runs_small_and_records_its_table(tmp_path: Path) -> None:
    """flat, ivf and hnsw at 3,000 vectors, and at 4,000 above --full-max (extrapolated), ivfpq at both."""
    out = tmp_path / "results.md"
    out.write_text("# Results\n\n## Other\n\nkept\n")
    rows = archive_scale.main(["--sizes", "3000", "4000", "--slides", "20", "--centres", "10", "--types", "flat",
                               "ivf", "hnsw", "ivfpq", "--full-max", "3000", "--repeats", "5", "--max-seconds", "1e-6", "--queries", "20",
                               "--mosaic", "20", "--record", str(out), "--work", str(tmp_path / "work")])
    by = {(row["size"], row["type"]): row for row in rows}
    assert sorted(by) == [(3000, "flat"), (3000, "hnsw"), (3000, "ivf"), (3000, "ivfpq"), (4000, "flat"),
                          (4000, "hnsw"), (4000, "ivf"), (4000, "ivfpq")]
    assert [kind for kind in ("flat", "ivf", "hnsw", "ivfpq") if by[4000, kind].get("skipped")] == ["flat", "ivf", "hnsw"]
    flat = by[3000, "flat"]
    assert flat["recall"] == 1.0  # the faiss flat index agrees with the exact search streamed from the store
    assert flat["disk"]["store"] == 3000 * 512 * 2  # float16 rows, nothing dead
    assert flat["disk"]["faiss"] > 3000 * 512 * 4  # the flat index keeps float32 vectors
    # the query process holds the flat index's float32 vectors: at least most of 2 KB a patch
    assert flat["ram"] > 0.8 * 3000 * 512 * 4
    # --max-seconds cut every timing short, after the 3 batches always timed
    assert all(row["query_batches"] == row["mosaic_batches"] == 3 for row in rows if not row.get("skipped"))
    assert 0 <= by[3000, "ivf"]["recall"] <= 1 and by[3000, "hnsw"]["recall"] > 0.5
    text = out.read_text()
    assert "## Other\n\nkept" in text and archive_scale.SECTIONS["local"] in text
    assert "| 4,000 | flat | extrapolated from 3,000 (not built) |" in text
    assert "| 3,000 | flat | flat |" in text and " (3 batches) |" in text and "| 4,000 | ivf | extrapolated from 3,000" in text
    assert "| 4,000 | ivfpq | ivfpq (64 bytes a vector" in text
    assert (tmp_path / "work" / "archive_3000" / "manifest.json").is_file()  # --work is kept


def test_a_milvus_lite_archive_holds_the_same_and_exact_search_matches_numpy(tmp_path: Path) -> None:
    args = small_args(vector_store="milvus-lite")
    source = archive_scale.mixture(args)
    directory = tmp_path / "archive"
    archive_scale.write_archive(directory, 700, args, source)
    assert (directory / archive_scale.MILVUS_LITE_FILE).exists() and not (directory / "vectors").exists()
    with SlideIndex.open(directory) as index:
        assert index.settings.vector_dtype == "float32" and index.settings.vector_store.startswith("milvus-lite:")
        assert index.patch_count() == 700 and len(index.sources()) == 7
        ids, vectors = map(np.concatenate, zip(*(index.source_vectors(row.id) for row in index.sources())))
    queries = source.sample(5, np.random.default_rng(5))[0]
    expected = ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]]
    assert np.array_equal(archive_scale.exact_top_k(directory, queries, 10), expected)
    assert archive_scale.disk_bytes(directory)["store"] > 700 * 512 * 4  # Milvus Lite's files: float32 rows


@pytest.mark.slow
def test_the_milvus_lite_bench_records_its_own_section(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    out.write_text(f"# Results\n\n{archive_scale.SECTIONS['local']}\n\nthe local table\n")
    rows = archive_scale.main(["--sizes", "3000", "--slides", "20", "--centres", "10", "--vector-store", "milvus-lite",
                               "--repeats", "3", "--queries", "20", "--mosaic", "20", "--record", str(out)])
    assert [row["type"] for row in rows] == ["flat", "ivf", "hnsw"]  # Milvus Lite's index types
    assert rows[0]["recall"] == 1.0  # Milvus's FLAT agrees with the exact search streamed from it
    assert all(row["disk"]["faiss"] == 0 and row["disk"]["store"] > 3000 * 512 * 4 for row in rows)
    text = out.read_text()
    assert "the local table" in text and archive_scale.SECTIONS["milvus-lite"] in text
    assert "| 3,000 | hnsw | hnsw in Milvus Lite HNSW" in text


@pytest.mark.slow
def test_quick_measures_ivfpq_with_reranking(tmp_path: Path) -> None:
    rows = archive_scale.main(["--quick", "--types", "ivfpq", "--repeats", "2", "--no-record"])
    (row,) = rows
    assert row["size"] == 20_000 and "trained on 20000 vectors" in row["describe"]
    assert "re-ranking the best 100 exactly" in row["describe"]
    assert row["recall"] > 0.8
    assert row["disk"]["faiss"] < 20_000 * 200  # 64-byte codes, not float32 vectors
