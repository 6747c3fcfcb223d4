"""Vectors in Milvus (histo_retrieval.search.milvus_vectors), through Milvus Lite in tmp_path: the
same query suite against a local (faiss flat) index and a Milvus Lite one gives the same matches;
crash safety across the two stores by SIGKILL of a real process; the --vector-store flag."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrieve
from histo_retrieval.errors import UserError
from histo_retrieval.search.index import IndexSettings, SlideIndex
from histo_retrieval.search.milvus_vectors import MilvusLocation, parse_vector_store
from histo_retrieval.search.vector_store import CRASH_ENV
from index_records import SETTINGS, record, unit_rows

REPO = Path(__file__).resolve().parents[1]
SOURCES = {f"/s{i}": unit_rows(3 + i % 4, seed=i) for i in range(8)}
PATIENTS = {"/s0": "p1", "/s3": "p1", "/s6": "p1", "/s1": "p2", "/s4": "p2"}  # the others: their own patient


def milvus_settings(lite: Path, collection: str = "patches") -> IndexSettings:
    return dataclasses.replace(SETTINGS, vector_store=f"milvus-lite:{lite}" + (
        "" if collection == "patches" else f"#{collection}"))


def build(folder: Path, settings: IndexSettings, paths=tuple(SOURCES)) -> None:
    """The sources, labelled with their patients; /s2 removed; /s5 replaced by other vectors (as --replace does)."""
    with SlideIndex.create(folder, settings) as index:
        add_sources(index, paths)


def add_sources(index: SlideIndex, paths) -> None:
    for path in paths:
        index.add(record(path, SOURCES[path]))
    index.remove(index.source_by_path("/s2").id)
    index.remove(index.source_by_path("/s5").id)
    index.add(record("/s5", unit_rows(5, seed=55)))
    index.set_labels({row.id: ("tumour", PATIENTS.get(row.path)) for row in index.sources()})


def query_suite(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every indexed patch's top 6 excluding itself, its own slide, its patient's slides; and
    outside queries with no exclusion. Results name patches by (source path, box x): ids are
    the index's own."""
    with SlideIndex.open(folder) as index:
        rows = index.sources()
        by_patient: dict[str, list[int]] = {}
        for row in rows:
            by_patient.setdefault(row.patient or row.path, []).append(row.id)
        queries, own_patch, own_slide, own_patient = [], [], [], []
        for row in rows:
            ids, vectors = index.source_vectors(row.id)
            slide = index.patch_ids(row.id)
            patient = np.concatenate([index.patch_ids(s) for s in by_patient[row.patient or row.path]])
            for i, vector in zip(ids, vectors):
                queries.append(vector)
                own_patch.append(np.array([i]))
                own_slide.append(slide)
                own_patient.append(patient)
        queries = np.array(queries)
        outside = unit_rows(7, seed=1000)
        suite = []
        for name, q, exclude in (("own patch", queries, own_patch), ("own slide", queries, own_slide),
                                 ("same patient", queries, own_patient), ("none", outside, None)):
            scores, ids = index.search(q, 6, exclude)
            patches = index.patches(ids[ids >= 0])
            named = np.array([[f"{patches[i].source}@{patches[i].x}" if i >= 0 else "-" for i in row] for row in ids])
            suite.append((name, scores, named))
        return suite


def assert_same_suite(a, b) -> None:
    for (name, scores_a, named_a), (_, scores_b, named_b) in zip(a, b):
        assert np.array_equal(named_a, named_b), name
        held = np.isfinite(scores_a)
        assert np.array_equal(held, np.isfinite(scores_b)) and np.allclose(scores_a[held], scores_b[held], atol=1e-5)


def python(code: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    # tests/ on the path too: the code imports this module's helpers
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


PRELUDE = """
from test_milvus import *
"""


def run(*argv: str) -> int:
    return retrieve.main(retrieve.get_args_parser().parse_args([*argv]))


@pytest.fixture(scope="module")
def local_suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local") / "index"
    build(folder, SETTINGS)
    return query_suite(folder)


# ----------------------------------------------------------------------------- parity
def test_milvus_lite_answers_the_query_suite_as_faiss_flat_does(tmp_path, local_suite):
    folder, lite = tmp_path / "index", tmp_path / "lite.db"
    build(folder, milvus_settings(lite))
    assert not (folder / "vectors").exists() and not (folder / "vectors.faiss").exists()  # Milvus holds them
    suite = query_suite(folder)
    assert_same_suite(local_suite, suite)
    assert all((row != "-").all() for _, _, row in suite)  # every query got 6 matches: the suite tests something
    with SlideIndex.open(folder) as index:
        assert index.milvus.count() == index.patch_count() == sum(len(v) for p, v in SOURCES.items() if p != "/s5") \
            - len(SOURCES["/s2"]) + 5  # removed and replaced sources left nothing behind
        ids = np.concatenate([index.patch_ids(row.id) for row in index.sources()])
        assert np.array_equal(np.concatenate([i for i, _ in index.iter_vectors(batch_rows=4)]), ids)
        assert np.array_equal(np.concatenate([v for _, v in index.iter_vectors()]), index.vectors_of(ids))
        assert "Milvus Lite FLAT" in index.describe_vector_index()


def test_a_new_index_never_adopts_an_existing_collection(tmp_path):
    lite = tmp_path / "lite.db"
    with SlideIndex.create(tmp_path / "a", milvus_settings(lite)) as index:
        index.add(record("/s0", SOURCES["/s0"]))
    with pytest.raises(UserError, match=r"the collection 'patches' exists already"):
        SlideIndex.create(tmp_path / "b", milvus_settings(lite))
    assert not (tmp_path / "b").exists()
    with SlideIndex.create(tmp_path / "b", milvus_settings(lite, "other")) as index:  # its own collection
        index.add(record("/s1", SOURCES["/s1"]))
    with SlideIndex.open(tmp_path / "a") as a:
        assert a.milvus.count() == a.patch_count() == len(SOURCES["/s0"])
    from milvus_lite.server_manager import server_manager_instance
    from pymilvus import MilvusClient

    client = MilvusClient(str(lite))
    client.drop_collection("patches")
    client.close()
    server_manager_instance.release_server(str(lite))
    for writable in (False, True):  # a collection lost is never made again empty
        with pytest.raises(UserError, match=r"the collection 'patches' is gone; the index's vectors are lost"):
            with SlideIndex.open(tmp_path / "a", writable=writable) as index:
                index.search(SOURCES["/s0"], 2)


# ----------------------------------------------------------------------------- crash safety
@pytest.mark.slow  # two Python processes
def test_a_run_killed_between_the_milvus_insert_and_the_commit_reruns_to_the_uninterrupted_index(tmp_path,
                                                                                                local_suite):
    folder, lite = tmp_path / "index", tmp_path / "lite.db"
    paths = list(SOURCES)
    code = PRELUDE + f"""
from pathlib import Path
index = SlideIndex.create(Path({str(folder)!r}), milvus_settings(Path({str(lite)!r})))
for path in {paths!r}:
    index.add(record(path, SOURCES[path]))
"""
    killed = python(code, crash_at="milvus-inserted:4")
    assert killed.returncode == -9, killed.stderr
    with SlideIndex.open(folder) as index:  # three sources committed; the fourth's rows are in Milvus only
        assert [row.path for row in index.sources()] == paths[:3]
        assert index.milvus.count() == index.patch_count() + len(SOURCES[paths[3]])
        queries = np.concatenate([SOURCES[p] for p in paths])
        scores, ids = index.search(queries, 4)
        assert set(ids[ids >= 0].tolist()) <= set(index.patches(ids[ids >= 0]))  # the uncommitted never answer
    rerun = PRELUDE + f"""
from pathlib import Path
with SlideIndex.open(Path({str(folder)!r}), writable=True) as index:
    assert index.milvus.count() == index.patch_count()  # the writer deleted the uncommitted rows
    done = {{row.path for row in index.sources()}}
    add_sources(index, [path for path in {paths!r} if path not in done])
"""
    finished = python(rerun)
    assert finished.returncode == 0, finished.stderr
    assert_same_suite(local_suite, query_suite(folder))


def test_a_remove_killed_before_milvus_deleted_is_never_answered_and_finished_by_the_next_writer(tmp_path):
    folder, lite, local = tmp_path / "index", tmp_path / "lite.db", tmp_path / "local"
    for where, settings in ((folder, milvus_settings(lite)), (local, SETTINGS)):
        with SlideIndex.create(where, settings) as index:
            for path in list(SOURCES)[:4]:
                index.add(record(path, SOURCES[path]))
    with SlideIndex.open(local, writable=True) as index:
        index.remove(index.source_by_path("/s1").id)
    code = PRELUDE + f"""
from pathlib import Path
with SlideIndex.open(Path({str(folder)!r}), writable=True) as index:
    index.remove(index.source_by_path("/s1").id)
"""
    killed = python(code, crash_at="remove-recorded")
    assert killed.returncode == -9, killed.stderr
    queries = SOURCES["/s1"]  # its own vectors: Milvus still holds them, as best matches
    with SlideIndex.open(folder) as index, SlideIndex.open(local) as reference:
        assert index.source_by_path("/s1") is None and len(index.db.pending_deletions()) == 1
        assert index.milvus.count() == index.patch_count() + len(SOURCES["/s1"])
        scores, ids = index.search(queries, 5)
        expected_scores, expected_ids = reference.search(queries, 5)
        assert np.array_equal(ids, expected_ids) and np.allclose(scores, expected_scores, atol=1e-5)
    with SlideIndex.open(folder, writable=True) as index:  # the next writer carries the removal out
        assert index.db.pending_deletions() == [] and index.milvus.count() == index.patch_count()


# ----------------------------------------------------------------------------- the flag
@pytest.mark.parametrize("value", ["milvus://", "milvus://host", "milvus://host:99999", "milvus-lite:",
                                   "milvus://host:19530/9bad", "faiss", "milvus-lite:archive"])
def test_a_bad_vector_store_is_one_line_naming_the_flag(value):
    with pytest.raises(UserError, match=r"^--vector-store") as error:
        parse_vector_store(value)
    assert "\n" not in str(error.value)


def test_vector_store_values_name_their_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_vector_store("local") is None
    assert parse_vector_store("milvus-lite:x.db") == MilvusLocation(str(tmp_path / "x.db"), "patches", lite=True)
    assert parse_vector_store("milvus://db.example:19530") == MilvusLocation("http://db.example:19530", "patches",
                                                                              lite=False)
    server = parse_vector_store("milvus://db.example:19530/archive_2026")
    assert server.collection == "archive_2026" and parse_vector_store(server.spec) == server


def test_retrieve_index_with_milvus_lite_queries_as_a_local_index_and_refuses_what_milvus_cannot(
        tmp_path, make_images, capsys):
    images = tmp_path / "images"
    make_images(images, {name: 1 for name in "abcde"}, size=24, seed=3)  # colours apart: no tied scores
    base = ["index", "--encoder", "histogram", str(images), "--device", "cpu", "--workers", "0"]
    lite = tmp_path / "lite.db"
    assert run(*base, "--index", str(tmp_path / "local")) == 0
    assert run(*base, "--index", str(tmp_path / "milvus"), "--vector-store", f"milvus-lite:{lite}") == 0
    outputs = []
    for name in ("local", "milvus"):
        capsys.readouterr()
        assert run("query", str(images / "a" / "a_0.png"), "--index", str(tmp_path / name), "--device", "cpu",
                   "--top-k", "4", "--out-dir", str(tmp_path / f"{name}-out")) == 0
        outputs.append(capsys.readouterr().out.replace(str(tmp_path / f"{name}-out"), "OUT"))
    assert outputs[0] == outputs[1] and sum(outputs[0].count(f"/{name}/") for name in "bcde") == 4
    assert run("list", "--index", str(tmp_path / "milvus")) == 0
    assert f"vectors: in Milvus Lite FLAT (inner product), collection 'patches' at {lite}" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"--vector-store .*\(the index has local\)"):
        run(*base, "--index", str(tmp_path / "local"), "--vector-store", f"milvus-lite:{lite}")
    with pytest.raises(UserError, match=r"^--index-type ivfpq: Milvus Lite has no IVF_PQ index"):
        run(*base, "--index", str(tmp_path / "pq"), "--vector-store", f"milvus-lite:{lite}", "--index-type", "ivfpq")
    with pytest.raises(UserError, match=r"compact: this index keeps its vectors in Milvus"):
        run("compact", "--index", str(tmp_path / "milvus"))
    with pytest.raises(UserError, match=r"^--index-type ivfpq: Milvus Lite has no IVF_PQ index"):
        run("reindex", "--index", str(tmp_path / "milvus"), "--index-type", "ivfpq")
    assert not (tmp_path / "pq").exists()


def test_an_unreachable_server_is_one_line_and_exit_status_2(tmp_path, make_images):
    images = tmp_path / "images"
    make_images(images, {"a": 1}, size=24)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "retrieve.py"), "index", "--encoder", "histogram", str(images),
                           "--index", str(tmp_path / "index"), "--device", "cpu", "--vector-store",
                           "milvus://127.0.0.1:1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--vector-store milvus://127.0.0.1:1/patches: cannot reach the " \
        "Milvus server" in done.stderr


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_milvus_lite_approximate_indexes_find_each_stored_vector_first(tmp_path, index_type):
    settings = dataclasses.replace(milvus_settings(tmp_path / "lite.db"), index_type=index_type, ivf_lists=4)
    with SlideIndex.create(tmp_path / "index", settings) as index:
        for path, vectors in SOURCES.items():
            index.add(record(path, vectors))
        ids = np.concatenate([index.patch_ids(row.id) for row in index.sources()])
        scores, found = index.search(index.vectors_of(ids), 3, nprobe=4)
        assert np.array_equal(found[:, 0], ids) and np.allclose(scores[:, 0], 1, atol=1e-5)
        assert f"Milvus Lite {'HNSW' if index_type == 'hnsw' else 'IVF_FLAT'}" in index.describe_vector_index()


@pytest.mark.parametrize("crash_at", [None, "reindex-saved"])
def test_reindex_builds_the_collections_index_again_even_when_killed_before_the_manifest(tmp_path, crash_at,
                                                                                       capsys):
    folder = tmp_path / "index"
    build(folder, milvus_settings(tmp_path / "lite.db"))
    before = query_suite(folder)
    if crash_at is None:
        assert run("reindex", "--index", str(folder), "--index-type", "hnsw") == 0
        held = sum(len(v) for p, v in SOURCES.items() if p not in ("/s2", "/s5")) + 5
        assert f"rebuilt the index from {held} stored vectors: hnsw in Milvus Lite HNSW" in capsys.readouterr().out
    else:  # killed after Milvus built HNSW, before the manifest says so: the next writer builds FLAT again
        code = PRELUDE + f"""
from pathlib import Path
with SlideIndex.open(Path({str(folder)!r}), writable=True) as index:
    index.reindex("hnsw")
"""
        killed = python(code, crash_at=crash_at)
        assert killed.returncode == -9, killed.stderr
        with SlideIndex.open(folder, writable=True) as index:
            assert index.settings.index_type == "flat"
    with SlideIndex.open(folder) as index:
        expected = "HNSW" if crash_at is None else "FLAT"
        assert index.milvus._built_type() == expected and expected in index.describe_vector_index()
    assert_same_suite(before, query_suite(folder))  # HNSW on 26 vectors finds what FLAT does
