"""The vector store of an index folder (histo_retrieval.search.vector_store): reads against a naive
concatenation, float16, removal without live orphans, crash safety of a run and of `compact` (by
SIGKILL of a real process), `reindex`, and the refusal and `upgrade` of a format-1 folder."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrieve
from histo_retrieval.errors import UserError
from histo_retrieval.search import vector_index
from histo_retrieval.search.index import IndexSettings, SlideIndex
from histo_retrieval.search.vector_store import CRASH_ENV
from index_records import DIM, SETTINGS, record, unit_rows

REPO = Path(__file__).resolve().parents[1]
SOURCES = {f"/s{i}": unit_rows(3 + i % 4, seed=i) for i in range(8)}


def build(folder: Path, settings: IndexSettings = SETTINGS, chunk_rows: int | None = None,
          remove: tuple[str, ...] = ()) -> None:
    with SlideIndex.create(folder, settings) as index:
        if chunk_rows:
            index.store.chunk_rows = chunk_rows
        for path, vectors in SOURCES.items():
            index.add(record(path, vectors))
        for path in remove:
            index.remove(index.source_by_path(path).id)


def contents(folder: Path) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Every source's stored vectors by path, and the top 5 of every source vector's search."""
    with SlideIndex.open(folder) as index:
        vectors = {row.path: index.source_vectors(row.id)[1] for row in index.sources()}
        queries = np.concatenate(list(SOURCES.values()))
        return vectors, index.search(queries, 5)


def same_contents(a, b) -> None:
    assert a[0].keys() == b[0].keys()
    for path in a[0]:
        assert np.array_equal(a[0][path], b[0][path]), path
    assert np.array_equal(a[1][1], b[1][1]) and np.allclose(a[1][0], b[1][0])


def chunk_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in (folder / "vectors").glob("*.vec"))


def python(code: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def run(*argv: str) -> int:
    return retrieve.main(retrieve.get_args_parser().parse_args([*argv]))


# ----------------------------------------------------------------------------- reads
def test_vectors_of_any_ids_and_the_chunked_iteration_match_a_naive_concatenation(tmp_path):
    folder = tmp_path / "index"
    build(folder, chunk_rows=10, remove=("/s2", "/s5"))  # several chunks, dead rows among them
    live = {path: v for path, v in SOURCES.items() if path not in ("/s2", "/s5")}
    with SlideIndex.open(folder) as index:
        ids = np.concatenate([index.patch_ids(index.source_by_path(path).id) for path in live])
        naive = np.concatenate(list(live.values()))
        assert index.store_stats().chunks > 1 and index.store_stats().live_rows == len(ids) == index.patch_count()
        order = np.random.default_rng(0).permutation(len(ids))
        assert np.array_equal(index.vectors_of(ids[order]), naive[order])
        assert np.array_equal(index.vectors_of(np.array([ids[3]] * 4)), np.repeat(naive[3:4], 4, axis=0))
        spread = index.store.spread_ids(5)
        assert np.array_equal(spread, ids[np.linspace(0, len(ids) - 1, 5).astype(np.int64)])
        assert np.array_equal(index.store.spread_ids(10 ** 6), ids)
        batches = list(index.iter_vectors(batch_rows=7))
        assert len(batches) > 1
        assert np.array_equal(np.concatenate([b[0] for b in batches]), ids)
        assert np.array_equal(np.concatenate([b[1] for b in batches]), naive)
        with pytest.raises(KeyError, match="patch id 8 is not in the index"):  # /s0: ids 1-3, /s1: 4-7, /s2: 8-12
            index.vectors_of(np.array([1, 8]))


def map_flags(path: Path) -> list[set[str]]:
    """The VmFlags of each of this process's maps of `path`, from Linux's /proc/self/smaps ("rr": the
    map is advised MADV_RANDOM, the kernel reads no more than the page a fault asks for)."""
    flags, mine = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            mine = len(fields) >= 6 and fields[5] == str(path)
        elif mine and line.startswith("VmFlags:"):
            flags.append(set(fields[1:]))
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads the maps' flags from Linux's /proc/self/smaps")
def test_rows_read_far_apart_go_through_a_map_without_read_ahead(tmp_path):
    folder = tmp_path / "index"
    build(folder)
    with SlideIndex.open(folder) as index:
        ids = np.concatenate([index.patch_ids(row.id) for row in index.sources()])
        naive = np.concatenate(list(SOURCES.values()))
        chunk = folder / "vectors" / "000001.vec"
        index.store.scattered_gap_bytes = 4 * DIM * 4  # 4 rows of float32: this small store's "far apart"
        assert map_flags(chunk) == []
        far = np.array([0, len(ids) // 2, len(ids) - 1])  # 3 of 36 rows: 12 rows apart on average
        assert np.array_equal(index.vectors_of(ids[far]), naive[far])
        assert [("rr" in flags) for flags in map_flags(chunk)] == [True]
        assert np.array_equal(index.vectors_of(ids), naive)  # every row: 1 row apart, read-ahead serves it
        assert sorted("rr" in flags for flags in map_flags(chunk)) == [False, True]
        assert np.array_equal(index.vectors_of(ids[far]), naive[far])  # each map is made once
        assert len(map_flags(chunk)) == 2


def test_float16_halves_the_store_and_searches_its_rounded_vectors(tmp_path):
    import dataclasses

    half, full = tmp_path / "half", tmp_path / "full"
    build(half, dataclasses.replace(SETTINGS, vector_dtype="float16"))
    build(full)
    assert chunk_bytes(half) * 2 == chunk_bytes(full) == sum(len(v) for v in SOURCES.values()) * DIM * 4
    assert json.loads((half / "manifest.json").read_text())["vector_store"] == {"dtype": "float16"}
    rounded = {path: v.astype(np.float16).astype(np.float32) for path, v in SOURCES.items()}
    stored, (scores, ids) = contents(half)
    for path in SOURCES:
        assert np.array_equal(stored[path], rounded[path]) and not np.array_equal(stored[path], SOURCES[path])
    everything = np.concatenate(list(rounded.values()))
    queries = np.concatenate(list(SOURCES.values()))
    naive = np.sort(queries @ everything.T, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(scores, naive, rtol=1e-5)
    (half / "vectors.faiss").unlink()  # rebuilt from the store: the same index
    same_contents(contents(half), (stored, (scores, ids)))


# ----------------------------------------------------------------------------- remove, --replace, compact
def test_remove_and_replace_leave_no_live_orphan_and_compact_gives_the_space_back(tmp_path, capsys):
    folder = tmp_path / "index"
    build(folder, chunk_rows=10, remove=("/s1", "/s6"))
    with SlideIndex.open(folder, writable=True) as index:  # --replace: the old one goes, the new one comes
        index.remove(index.source_by_path("/s3").id)
        index.add(record("/s3", SOURCES["/s3"]))
    before = contents(folder)
    with SlideIndex.open(folder) as index:
        stats = index.store_stats()
        assert stats.live_rows == index.patch_count() == sum(len(v) for p, v in SOURCES.items() if p not in ("/s1", "/s6"))
        dead = sum(len(SOURCES[p]) for p in ("/s1", "/s6", "/s3"))
        assert (stats.dead_rows, stats.dead_bytes) == (dead, dead * DIM * 4)
        assert chunk_bytes(folder) == stats.file_bytes
    assert run("list", "--index", str(folder)) == 0
    assert (f"vectors: float32, {stats.live_rows} live rows in {stats.chunks} chunk file(s); {dead} dead rows "
            f"({dead * DIM * 4} bytes) reclaimable by `retrieve.py compact --index {folder}`") in capsys.readouterr().out
    reader = SlideIndex.open(folder)  # a query or the search page, open across the compact
    ids = np.concatenate([b[0] for b in reader.iter_vectors()])
    expected = reader.vectors_of(ids)
    iterating = reader.iter_vectors(batch_rows=1)
    first = next(iterating)
    assert run("compact", "--index", str(folder)) == 0
    assert not (folder / "vectors" / "000001.vec").exists()  # the old chunks are gone
    assert np.array_equal(reader.vectors_of(ids), expected)  # read from the new chunks
    rest = list(iterating)  # began before: reads the old chunks through its maps
    assert np.array_equal(np.concatenate([first[1], *[b[1] for b in rest]]), expected)
    reader.close()
    assert f"compacted the vector store from {stats.file_bytes} to {stats.live_rows * DIM * 4} bytes" in \
        capsys.readouterr().out
    with SlideIndex.open(folder) as index:
        after = index.store_stats()
        assert (after.live_rows, after.dead_rows) == (stats.live_rows, 0)
    assert chunk_bytes(folder) == stats.live_rows * DIM * 4
    same_contents(contents(folder), before)


# What SlideIndex.compact (`retrieve.py compact`) runs, without importing the index's torch-based
# modules: the killed process starts in a fraction of a second.
COMPACT = """
import sqlite3
from histo_retrieval.search.vector_store import VectorStore
connection = sqlite3.connect({folder!r} + "/patches.sqlite")
connection.execute("PRAGMA foreign_keys=ON")
VectorStore({folder!r} + "/vectors", connection, {dim}, "float32", writable=True, chunk_rows=6).compact()
"""


@pytest.mark.parametrize("point", ["compact-copy:3", "compact-written", "compact-switched"])
def test_compact_killed_at_any_point_leaves_an_index_that_reads_the_same(tmp_path, point):
    folder = tmp_path / "index"
    build(folder, chunk_rows=10, remove=("/s0", "/s4"))
    before = contents(folder)
    live = sum(len(v) for p, v in SOURCES.items() if p not in ("/s0", "/s4"))
    killed = python(COMPACT.format(folder=str(folder), dim=DIM), crash_at=point)
    assert killed.returncode == -9, killed.stderr
    same_contents(contents(folder), before)  # a reader, with the kill's files still there
    with SlideIndex.open(folder, writable=True) as index:  # a writer cleans up what the kill left
        assert index.store_stats().live_rows == live
        on_disk = chunk_bytes(folder)
        assert on_disk == index.store_stats().file_bytes
        if point == "compact-switched":
            assert on_disk == live * DIM * 4  # switched: the old files were what was left, now gone
    same_contents(contents(folder), before)
    assert python(COMPACT.format(folder=str(folder), dim=DIM)).returncode == 0
    assert chunk_bytes(folder) == live * DIM * 4
    same_contents(contents(folder), before)


# ----------------------------------------------------------------------------- a killed run
ADD = """
import numpy as np
from histo_retrieval.search.index import IndexSettings, SlideIndex, SourceRecord
settings = IndexSettings("model.pth", "0" * 64, "m", {{}}, 32, {dim}, 1.0, 32, 0.5)
sources = {{f"/s{{i}}": np.random.default_rng(i).normal(size=(3 + i % 4, {dim})).astype(np.float32) for i in range(8)}}
index = SlideIndex.create({folder!r}, settings) if {create} else SlideIndex.open({folder!r}, writable=True)
index.store.chunk_rows = 10
with index:
    for path, vectors in sources.items():
        if index.source_by_path(path) is None:
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            boxes = np.array([[64 * i, 0, 64, 64] for i in range(len(vectors))], np.int64)
            index.add(SourceRecord(path, "slide", vectors, boxes, file_size=1, mtime=1.0))
"""


def test_a_run_killed_between_appending_and_recording_reruns_to_the_uninterrupted_index(tmp_path):
    whole, folder = tmp_path / "whole", tmp_path / "killed"
    exec(ADD.format(dim=DIM, folder=str(whole), create=True), {})
    killed = python(ADD.format(dim=DIM, folder=str(folder), create=True), crash_at="add-source:5")
    assert killed.returncode == -9, killed.stderr
    with SlideIndex.open(folder) as index:  # opens and answers with the 4 finished sources only
        assert [row.path for row in index.sources()] == ["/s0", "/s1", "/s2", "/s3"]
        assert index.store_stats().live_rows == index.patch_count() == 3 + 4 + 5 + 6
        assert index.search(SOURCES["/s0"][:1], 1)[1][0, 0] == 1
        assert chunk_bytes(folder) > index.store_stats().file_bytes  # the fifth source's rows, appended, unrecorded
    exec(ADD.format(dim=DIM, folder=str(folder), create=False), {})  # the rerun
    same_contents(contents(folder), contents(whole))
    assert chunk_bytes(folder) == chunk_bytes(whole)  # the unrecorded tail was cut, not kept as dead rows
    with SlideIndex.open(folder) as a, SlideIndex.open(whole) as b:
        assert [r.first_patch for r in a.sources()] == [r.first_patch for r in b.sources()]


@pytest.mark.slow
def test_retrieve_index_killed_among_many_sources_reruns_to_one_uninterrupted_run(tmp_path, make_images):
    sources = []
    for i in range(6):
        make_images(tmp_path / "folders" / f"f{i}", {"c": 2}, size=24, seed=i)
        sources.append(str(tmp_path / "folders" / f"f{i}"))
    whole, folder = tmp_path / "whole", tmp_path / "killed"
    argv = ["index", "--encoder", "histogram", *sources, "--device", "cpu", "--workers", "0"]
    assert run(*argv, "--index", str(whole)) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", CRASH_ENV: "add-source:4"}
    command = [sys.executable, str(REPO / "retrieve.py"), *argv, "--index", str(folder)]
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == -9
    with SlideIndex.open(folder) as index:
        assert len(index.sources()) == 3 and index.store_stats().live_rows == index.patch_count() == 6
    env.pop(CRASH_ENV)
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0
    with SlideIndex.open(folder) as a, SlideIndex.open(whole) as b:
        assert [r.path for r in a.sources()] == [r.path for r in b.sources()]
        for ra, rb in zip(a.sources(), b.sources()):
            assert np.array_equal(a.source_vectors(ra.id)[1], b.source_vectors(rb.id)[1])
        queries = np.concatenate([b.source_vectors(r.id)[1] for r in b.sources()])
        sa, ia = a.search(queries, 4)
        sb, ib = b.search(queries, 4)
        assert np.array_equal(ia, ib) and np.allclose(sa, sb)


# ----------------------------------------------------------------------------- reindex
def test_reindex_gives_the_same_vectors_and_the_same_exact_results(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "index"
    build(folder, remove=("/s2",))
    before = contents(folder)
    assert run("reindex", "--index", str(folder), "--index-type", "hnsw") == 0
    assert json.loads((folder / "manifest.json").read_text())["vector_index"]["type"] == "hnsw"
    with SlideIndex.open(folder) as index:
        assert vector_index.index_kind(index.vectors) == "hnsw" and index.settings.index_type == "hnsw"
        assert index.vectors.ntotal == index.patch_count()
    # IVF trained on a sample read from the store by id: 3 per list here, not every vector.
    trained = []
    monkeypatch.setattr(vector_index, "PQ_TRAIN_POINTS", 4)
    monkeypatch.setattr(vector_index, "TRAIN_POINTS_PER_LIST", 3)
    new = vector_index.new_vector_index
    monkeypatch.setattr(vector_index, "new_vector_index", lambda kind, dim, train=None, *a: trained.append(
        None if train is None else train.copy()) or new(kind, dim, train, *a))
    assert run("reindex", "--index", str(folder), "--index-type", "ivf", "--ivf-lists", "2") == 0
    with SlideIndex.open(folder) as index:
        assert vector_index.index_kind(index.vectors) == "ivf" and index.vectors.nlist == 2
        everything = np.concatenate([v for _, v in index.iter_vectors()])
        assert np.array_equal(trained[0], everything[np.linspace(0, len(everything) - 1, 6).astype(np.int64)])
        assert index.settings.ivf_lists == 2
    assert run("reindex", "--index", str(folder), "--index-type", "flat") == 0
    same_contents(contents(folder), before)


def test_a_reindex_killed_between_its_two_writes_is_rebuilt_as_the_manifest_says(tmp_path, capsys):
    folder = tmp_path / "index"
    build(folder)
    before = contents(folder)
    code = f"""
from histo_retrieval.search.index import SlideIndex
with SlideIndex.open({str(folder)!r}, writable=True) as index:
    index.reindex("hnsw")
"""
    assert python(code, crash_at="reindex-saved").returncode == -9
    assert json.loads((folder / "manifest.json").read_text())["vector_index"]["type"] == "flat"
    capsys.readouterr()
    with SlideIndex.open(folder) as index:
        assert vector_index.index_kind(index.vectors) == "flat"
    assert "is a hnsw index, the manifest says flat" in capsys.readouterr().out
    same_contents(contents(folder), before)


# ----------------------------------------------------------------------------- format 1
def make_format_1(folder: Path) -> None:
    """Turn a format-2 folder into what the code before the store wrote: each source's float32
    vectors as one blob in the `vectors` table, no vector store, a format-1 manifest."""
    with SlideIndex.open(folder) as index:
        blobs = [(row.id, index.source_vectors(row.id)[1].tobytes()) for row in index.sources()]
    with sqlite3.connect(folder / "patches.sqlite") as db:
        db.execute("CREATE TABLE vectors (source_id INTEGER PRIMARY KEY REFERENCES sources(id) ON DELETE CASCADE, "
                   "data BLOB NOT NULL)")
        db.executemany("INSERT INTO vectors (source_id, data) VALUES (?, ?)", blobs)
        db.execute("DROP TABLE vector_blocks")
        db.execute("DROP TABLE vector_chunks")
    shutil.rmtree(folder / "vectors")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format"] = 1
    del manifest["vector_store"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_format_1_folder_is_refused_in_one_line_for_reading_and_writing(tmp_path):
    folder = tmp_path / "index"
    build(folder)
    make_format_1(folder)
    message = (f"{folder}: index format 1 keeps its vectors inside patches.sqlite; convert it (nothing is embedded "
               f"again) with: python3 retrieve.py upgrade --index {folder}")
    for writable in (False, True):
        with pytest.raises(UserError) as refused:
            SlideIndex.open(folder, writable=writable)
        assert str(refused.value) == message
    with pytest.raises(UserError, match="index format 1 keeps its vectors inside patches.sqlite"):
        run("list", "--index", str(folder))
    assert not (folder / "vectors").exists()  # refused before anything was written


@pytest.mark.parametrize("crash_at", [None, "upgrade-append:3", "upgrade-switched"])
def test_upgrade_converts_a_format_1_folder_to_the_same_results_even_when_killed(tmp_path, crash_at, capsys):
    folder = tmp_path / "index"
    build(folder, remove=("/s3",))
    before = contents(folder)
    make_format_1(folder)
    if crash_at:
        killed = python(f"from histo_retrieval.search.index import upgrade_index; upgrade_index({str(folder)!r})",
                        crash_at=crash_at)
        assert killed.returncode == -9, killed.stderr
        with pytest.raises(UserError, match="index format 1"):  # not converted yet: still refused
            SlideIndex.open(folder)
    capsys.readouterr()
    assert run("upgrade", "--index", str(folder)) == 0
    live = sum(len(v) for p, v in SOURCES.items() if p != "/s3")
    assert f"converted to index format 2, its vector store holds {live} vectors" in capsys.readouterr().out
    assert json.loads((folder / "manifest.json").read_text())["format"] == 2
    with sqlite3.connect(folder / "patches.sqlite") as db:
        assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'vectors'").fetchone()
    same_contents(contents(folder), before)
    assert chunk_bytes(folder) == live * DIM * 4
    assert run("upgrade", "--index", str(folder)) == 0
    assert "of index format 2, nothing to convert" in capsys.readouterr().out


def test_index_vector_dtype_float16_is_recorded_and_stores_half_the_bytes(tmp_path, make_images):
    make_images(tmp_path / "images", {"c": 3}, size=24)
    folder = tmp_path / "index"
    assert run("index", "--encoder", "histogram", str(tmp_path / "images"), "--index", str(folder),
               "--vector-dtype", "float16", "--device", "cpu", "--workers", "0") == 0
    assert json.loads((folder / "manifest.json").read_text())["vector_store"] == {"dtype": "float16"}
    with SlideIndex.open(folder) as index:
        (source,) = index.sources()
        ids, stored = index.source_vectors(source.id)
        assert chunk_bytes(folder) == len(ids) * index.settings.dim * 2 and len(ids) == 3
        assert np.array_equal(stored, stored.astype(np.float16).astype(np.float32))
        assert np.array_equal(index.search(stored, 1)[1][:, 0], ids)  # each finds itself first
