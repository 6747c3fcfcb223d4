"""A slide index: a folder that lasts, grows and shrinks, and answers nearest-neighbour queries.

    DIR/manifest.json   the encoder (spec, kind, weights file and the hash of its weights, name,
                        options, input steps, normalisation, pooling, scale, embedding size), the
                        tiling (scale, patch size, tissue threshold) and the vector index type
    DIR/patches.sqlite  per source: path, size, modification time, state, thumbnail; per patch: its
                        source, level-0 box, tissue fraction, file and class; per source where its
                        vectors are (vector_blocks)
    DIR/vectors/        the patch vectors, in append-only chunk files (histo_retrieval.search.vector_store)
    DIR/vectors.faiss   the faiss index of every patch vector, by patch id (histo_retrieval.search.vector_index)

An index made with `--vector-store milvus...` has neither DIR/vectors/ nor DIR/vectors.faiss: its
vectors live in a Milvus collection (histo_retrieval.search.milvus_vectors), which also searches them.

SQLite is the record: a source, all of its patches and the block of its vectors go in one
transaction (the vectors themselves are written and synced to the store just before), so a killed
run leaves each source either complete or absent. The faiss file is derived from the store: it is
saved with the generation of the database it reflects, and rebuilt from the stored vectors, in
chunks, when the two differ (after a run was killed before saving it) or when its kind is not the
manifest's (a `reindex` killed between its two writes). Under torchrun each process writes its
sources into a shard database (DIR/shards/), which keeps its vectors as blobs in a `vectors`
table, as format 1 indexes did; the first process merges the shards into the store.

Source and patch ids are never given twice (counters in the meta table), so an id in a URL or a
cache names one file for good. A slide's pixels are read again only through open_indexed_slide,
which refuses a file whose size or modification time is not the recorded one (SlideChanged).
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

import numpy as np

from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.search import vector_index
from histo_retrieval.errors import UserError
from histo_retrieval.files import atomic_write_text, command_line
from histo_retrieval.search.milvus_vectors import (LOCAL, MilvusLocation, MilvusVectors, check_index_type,
                                                   parse_vector_store)
from histo_retrieval.search.vector_store import DTYPES, Block, StoreStats, VectorStore, crash_point
from histo_retrieval.search.mosaic import MosaicSettings
from histo_retrieval.search.slides import Slide, SlideError, Tiling, open_slide

if TYPE_CHECKING:
    from histo_retrieval.encoders.base import Encoder

# 2: vectors in DIR/vectors/ (vector_store); 1: vectors as blobs inside patches.sqlite (`retrieve.py upgrade`).
FORMAT = 2
MANIFEST, DATABASE, VECTORS, SHARDS, STORE = "manifest.json", "patches.sqlite", "vectors.faiss", "shards", "vectors"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    file_size INTEGER, mtime REAL, width INTEGER, height INTEGER, slide_mpp REAL, backend TEXT,
    first_patch INTEGER, patch_count INTEGER NOT NULL DEFAULT 0, thumbnail BLOB, thumbnail_downsample REAL,
    reason TEXT, indexed_at TEXT, command TEXT);
CREATE INDEX IF NOT EXISTS sources_by_state ON sources (state, kind, patch_count);
CREATE TABLE IF NOT EXISTS patches (
    id INTEGER PRIMARY KEY, source_id INTEGER NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
    x INTEGER NOT NULL, y INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
    tissue REAL, file TEXT, class TEXT);
CREATE INDEX IF NOT EXISTS patches_by_source ON patches (source_id);
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, started TEXT NOT NULL, command TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    source_id INTEGER PRIMARY KEY REFERENCES sources(id) ON DELETE CASCADE, label TEXT NOT NULL, patient TEXT,
    labelled_at TEXT NOT NULL, command TEXT);
"""
# A database without a vector store (a torchrun shard; an index of format 1) keeps each source's
# float32 vectors as one blob.
BLOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    source_id INTEGER PRIMARY KEY REFERENCES sources(id) ON DELETE CASCADE, data BLOB NOT NULL);
"""
# An index whose vectors are in Milvus: the patch id ranges of removed sources whose rows Milvus may
# still hold (recorded with the removal, cleared once Milvus deleted them, replayed by the next writer).
PENDING_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_deletions (first_patch INTEGER NOT NULL, patch_count INTEGER NOT NULL);
"""

SOURCE_COLUMNS = ("path", "kind", "file_size", "mtime", "width", "height", "slide_mpp", "backend",
                  "thumbnail", "thumbnail_downsample")

# A source's file name (Path(path).name) in SQL: what follows the path's last "/".
FILE_NAME_SQL = "substr(s.path, length(rtrim(s.path, replace(s.path, '/', ''))) + 1)"


def like_pattern(text: str) -> str:
    """`text` for a LIKE ... ESCAPE '\\' pattern, its own %, _ and \\ matched as themselves."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


SourceKind = Literal["slide", "folder"]  # what an index holds: a whole slide, or a folder of patch images
SourceState = Literal["indexed", "failed"]  # a failed source is recorded for `list --failed` and retried


@dataclass
class SourceRecord:
    """One source ready to go into an index: its description, its patches and their vectors
    (n x dim float32, row i for patch i)."""
    path: str
    kind: SourceKind
    vectors: np.ndarray
    boxes: np.ndarray  # n x 4 int64: level-0 x, y, width, height
    tissue: np.ndarray | None = None  # n float32 tissue fractions (slides)
    files: list[str | None] | None = None  # per patch, its image file (folders)
    classes: list[str | None] | None = None
    file_size: int | None = None
    mtime: float | None = None
    width: int | None = None
    height: int | None = None
    slide_mpp: float | None = None
    backend: str | None = None
    thumbnail: bytes | None = None
    thumbnail_downsample: float | None = None


@dataclass(frozen=True)
class SourceRow:
    """A source as the index records it (the sources table but its thumbnail's bytes: thumbnail())."""
    id: int
    path: str
    kind: SourceKind
    state: SourceState
    file_size: int | None
    mtime: float | None
    width: int | None
    height: int | None
    slide_mpp: float | None
    backend: str | None
    first_patch: int | None
    patch_count: int
    thumbnail_downsample: float | None
    reason: str | None  # why it failed
    indexed_at: str | None
    label: str | None = None  # diagnosis or subtype, from `retrieve.py label`; never guessed from names
    patient: str | None = None  # None: the slide is its own patient

    @property
    def name(self) -> str:
        return Path(self.path).name

    def file_changed(self) -> bool:
        """Whether the file at its path is not the one indexed: another size or modification time
        (compared exactly: SQLite's REAL keeps os.stat's float as it was). OSError when it is gone."""
        return file_stat(self.path) != (self.file_size, self.mtime)


@dataclass(frozen=True)
class Thumbnail:
    """A slide's thumbnail as stored: JPEG bytes, and its downsample from level 0."""
    jpeg: bytes
    downsample: float


@dataclass(frozen=True)
class Patch:
    """An indexed patch: its level-0 box in its source (a slide), or its image file (a folder)."""
    id: int
    source_id: int
    source: str  # the source's path
    source_kind: SourceKind
    x: int
    y: int
    width: int
    height: int
    tissue: float | None
    file: str | None
    class_name: str | None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def file_stat(path: str | os.PathLike) -> tuple[int, float]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime


class SlideChanged(UserError):
    """An indexed slide whose file is not the one the index was built from any more (its size or
    modification time differs): its patches, boxes and tiles would describe another image (HTTP 409)."""


def check_unchanged(record: SourceRow) -> None:
    """Raise SlideChanged when the file at an indexed slide's path is not the one its record
    describes (SourceRow.file_changed), SlideError when it is gone."""
    path = record.path
    try:
        changed = record.file_changed()
    except OSError:
        raise SlideError(f"{path}: no such slide file") from None
    if changed:
        raise SlideChanged(f"{path}: the slide changed since it was indexed (its size or modification time "
                           "differs); index it again with `retrieve.py index CHECKPOINT "
                           f"{path} --index DIR --replace`")


def open_indexed_slide(record: SourceRow) -> Slide:
    """The file of an indexed slide, opened only when it is the file the index was built from;
    checked again once open, so that a file replaced while it was being opened is not taken for
    the indexed one."""
    check_unchanged(record)
    slide = open_slide(record.path, record.slide_mpp)
    try:
        check_unchanged(record)
    except BaseException:
        slide.close()
        raise
    return slide


class PatchDatabase:
    """The SQLite record of sources, patches and vectors (an index's, or a torchrun shard's).

    With `store` (a folder), the vectors go to a VectorStore there (`dim` values of `vector_dtype`
    a row), the database keeping where each source's are; with `milvus`, to that collection, inserted
    inside the transaction that records their source (before its commit); with neither, to blobs in
    its `vectors` table (a shard)."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False, store: str | os.PathLike | None = None,
                 dim: int | None = None, vector_dtype: str = "float32", milvus: MilvusVectors | None = None) -> None:
        self.milvus = milvus
        self.path = Path(path)
        if readonly:
            # A reader may be shared by a server's threads, which take turns under the server's lock.
            self.connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60,
                                              check_same_thread=False)
        else:
            self.connection = sqlite3.connect(self.path, timeout=60)
            self.connection.executescript(SCHEMA + (PENDING_SCHEMA if milvus is not None else
                                                    "" if store is not None else BLOB_SCHEMA))
            # WAL: a reader (a query, the search page) never waits for an index run's write.
            self.connection.execute("PRAGMA journal_mode=WAL")
            with self.connection:
                # An index from before the counter: start it above every id it holds now, before a
                # removal can free its highest one (SQLite alone would give that id again).
                self.connection.execute("INSERT OR IGNORE INTO meta (key, value) "
                                        "SELECT 'next_source_id', COALESCE(MAX(id), 0) + 1 FROM sources")
        self.connection.execute("PRAGMA foreign_keys=ON")
        self.store: VectorStore | None = None
        if store is not None:
            if dim is None:
                raise ValueError("a vector store needs the vectors' dimension")
            self.store = VectorStore(store, self.connection, dim, vector_dtype, writable=not readonly)

    def close(self) -> None:
        self.connection.close()

    # ------------------------------------------------------------------ meta
    def meta(self, key: str, default: int = 0) -> int:
        row = self.connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self.connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))

    @property
    def generation(self) -> int:
        """Incremented by every change of the patches, so a saved faiss index knows whether it is current."""
        return self.meta("generation")

    def _new_source_id(self) -> int:
        """An id no source of this database ever had (ids name slides in the search page's URLs
        and caches); call inside the transaction that inserts the source."""
        highest = self.connection.execute("SELECT COALESCE(MAX(id), 0) FROM sources").fetchone()[0]
        source_id = max(self.meta("next_source_id", 1), highest + 1)
        self._set_meta("next_source_id", source_id + 1)
        return source_id

    def log_run(self, command: str) -> None:
        with self.connection:
            self.connection.execute("INSERT INTO runs (started, command) VALUES (?, ?)", (_now(), command))

    # ------------------------------------------------------------------ writes
    def add_source(self, record: SourceRecord, command: str = "") -> tuple[int, np.ndarray]:
        """Insert a source with all its patches and vectors in one transaction, replacing a failed
        record of the same path; returns (source id, patch ids). With a store, the vectors are
        appended and synced to it first, and the transaction records their block."""
        return self.add_sources([record], command)[0]

    def add_sources(self, records: Sequence[SourceRecord], command: str = "") -> list[tuple[int, np.ndarray]]:
        """add_source for many sources at once: their vectors in one append to the store, the sources
        in one transaction (all or none), so that writing many small records costs one sync."""
        vectors = [np.ascontiguousarray(record.vectors, dtype=np.float32) for record in records]
        for record, rows in zip(records, vectors):
            if rows.shape[0] != len(record.boxes):
                raise ValueError(f"{record.path}: {rows.shape[0]} vectors for {len(record.boxes)} patches")
        blocks: list[Block | None] = [None] * len(records)
        if self.store is not None and records:
            whole = self.store.append(np.concatenate(vectors))
            offsets = np.cumsum([0, *(len(rows) for rows in vectors)])
            blocks = [Block(whole.chunk, whole.row + int(start), len(rows)) for start, rows in zip(offsets, vectors)]
        crash_point("add-source")  # the vectors are in the store, the sources are not recorded yet
        with self.connection:
            added = [self._insert_source(record, rows, block, command)
                     for record, rows, block in zip(records, vectors, blocks)]
            if self.milvus is not None and records:
                self.milvus.add(np.concatenate([ids for _, ids in added]),
                                np.concatenate([np.full(len(ids), source_id) for source_id, ids in added]),
                                np.concatenate(vectors))
                crash_point("milvus-inserted")  # the vectors are in Milvus, the sources not committed
            self._set_meta("generation", self.generation + 1)
        return added

    def _insert_source(self, record: SourceRecord, vectors: np.ndarray, block: Block | None,
                       command: str) -> tuple[int, np.ndarray]:
        """The rows of one source; inside add_sources's transaction."""
        count = len(record.boxes)
        files = record.files or [None] * count
        classes = record.classes or [None] * count
        tissue = record.tissue if record.tissue is not None else [None] * count
        self.connection.execute("DELETE FROM sources WHERE path = ? AND state = 'failed'", (record.path,))
        first = self.meta("next_patch_id", 1)
        source_id = self._new_source_id()
        self.connection.execute(
            f"INSERT INTO sources (id, {', '.join(SOURCE_COLUMNS)}, state, first_patch, patch_count, "
            f"indexed_at, command) VALUES ({', '.join('?' * (len(SOURCE_COLUMNS) + 6))})",
            (source_id, *(getattr(record, name) for name in SOURCE_COLUMNS), "indexed", first, count, _now(),
             command))
        ids = np.arange(first, first + count, dtype=np.int64)
        self.connection.executemany(
            "INSERT INTO patches (id, source_id, x, y, width, height, tissue, file, class) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((int(i), source_id, *map(int, box), None if t is None else float(t), f, c)
             for i, box, t, f, c in zip(ids, record.boxes, tissue, files, classes)))
        if block is not None:
            self.store.record(source_id, block)
        elif self.milvus is None:
            self.connection.execute("INSERT INTO vectors (source_id, data) VALUES (?, ?)",
                                    (source_id, vectors.tobytes()))
        self._set_meta("next_patch_id", first + count)
        return source_id, ids

    def add_failure(self, path: str, reason: str, command: str = "") -> None:
        """Record a source that could not be indexed (shown by `list`, retried by the next run)."""
        with self.connection:
            known = self.connection.execute("SELECT state FROM sources WHERE path = ?", (path,)).fetchone()
            if known is None:
                self.connection.execute(
                    "INSERT INTO sources (id, path, kind, state, reason, indexed_at, command) "
                    "VALUES (?, ?, 'slide', 'failed', ?, ?, ?)", (self._new_source_id(), path, reason, _now(), command))
            elif known[0] == "failed":
                self.connection.execute("UPDATE sources SET reason = ?, indexed_at = ? WHERE path = ?",
                                        (reason, _now(), path))

    def remove_source(self, source_id: int) -> np.ndarray:
        """Delete a source, its patches and vectors; returns the patch ids it had. With Milvus, its id
        range is recorded as pending in the same transaction: the caller deletes it from Milvus and
        then clear_pending()s it."""
        ids = self.patch_ids(source_id)
        with self.connection:
            if self.milvus is not None and len(ids):
                self.connection.execute("INSERT INTO pending_deletions (first_patch, patch_count) VALUES (?, ?)",
                                        (int(ids[0]), int(ids[-1] - ids[0] + 1)))
            self.connection.execute("DELETE FROM sources WHERE id = ?", (source_id,))
            self._set_meta("generation", self.generation + 1)
        return ids

    def pending_deletions(self) -> list[tuple[int, int, int]]:
        """(row id, first patch id, count) of removals Milvus may not have carried out yet."""
        return [tuple(row) for row in self.connection.execute(
            "SELECT rowid, first_patch, patch_count FROM pending_deletions ORDER BY rowid")]

    def clear_pending(self, rows: Sequence[int]) -> None:
        with self.connection:
            self.connection.executemany("DELETE FROM pending_deletions WHERE rowid = ?", ((int(r),) for r in rows))

    # ------------------------------------------------------------------ reads
    def _source_rows(self, where: str, values: tuple, page: str = "") -> list[SourceRow]:
        labelled = ("label", "patient")
        columns = ", ".join(f"s.{column.name}" for column in fields(SourceRow) if column.name not in labelled)
        # An index opened read-only from before labels has no labels table: its sources have none.
        join, extra = ("LEFT JOIN labels l ON l.source_id = s.id", "l.label, l.patient") if self._has_labels() \
            else ("", "NULL, NULL")
        rows = self.connection.execute(f"SELECT {columns}, {extra} FROM sources s {join} {where} ORDER BY s.id "
                                       f"{page}", values)
        return [SourceRow(*row) for row in rows]

    def _has_labels(self) -> bool:
        return self.connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'labels'").fetchone() is not None

    def set_labels(self, labels: dict[int, tuple[str, str | None]], command: str = "") -> None:
        """Give each source id its (label, patient), replacing what it had, in one transaction."""
        with self.connection:
            self.connection.executemany(
                "INSERT OR REPLACE INTO labels (source_id, label, patient, labelled_at, command) VALUES (?, ?, ?, ?, ?)",
                ((source_id, label, patient, _now(), command) for source_id, (label, patient) in labels.items()))

    def sources(self, state: SourceState | None = "indexed") -> list[SourceRow]:
        """The sources in `state` (every one with None), by id."""
        return self._source_rows("WHERE s.state = ?", (state,)) if state else self._source_rows("", ())

    def source_by_path(self, path: str) -> SourceRow | None:
        rows = self._source_rows("WHERE s.path = ?", (path,))
        return rows[0] if rows else None

    def sources_by_id(self, ids: Sequence[int], state: SourceState | None = "indexed") -> dict[int, SourceRow]:
        """The sources among `ids` in `state` (every one with None), by id; ids it does not hold are left out."""
        found: dict[int, SourceRow] = {}
        ids = sorted({int(i) for i in ids})
        for start in range(0, len(ids), 900):  # SQLite's limit on bound parameters
            chunk = ids[start:start + 900]
            where = f"WHERE s.id IN ({', '.join('?' * len(chunk))})" + (" AND s.state = ?" if state else "")
            found.update((row.id, row) for row in self._source_rows(where, (*chunk, *([state] if state else []))))
        return found

    def source_page(self, offset: int = 0, limit: int = 100, name: str = "", kind: SourceKind | None = None,
                    state: SourceState | None = "indexed") -> tuple[list[SourceRow], int]:
        """(at most `limit` sources from the `offset`-th, by id; how many there are in all) of those in
        `state` of `kind` whose file name contains `name` (ASCII letters of either case): one page of
        a list too long to read whole, read with SQL LIMIT and OFFSET."""
        clauses, values = [], []
        for column, value in (("state", state), ("kind", kind)):
            if value:
                clauses.append(f"s.{column} = ?")
                values.append(value)
        # sources_by_state counts them; the rows are read in id order, not through it (`+` keeps the
        # planner off it: a page deep in the list would otherwise sort every match first).
        if name:
            # The whole path first, a plain scan: the file name, dearer to cut out, only where that matches.
            clauses.append(f"s.path LIKE ? ESCAPE '\\' AND {FILE_NAME_SQL} LIKE ? ESCAPE '\\'")
            values += ["%" + like_pattern(name) + "%"] * 2
        where = "WHERE " + " AND ".join(clauses) if clauses else ""
        total = self.connection.execute(f"SELECT COUNT(*) FROM sources s {where}", values).fetchone()[0]
        by_id = where.replace("s.state =", "+s.state =").replace("s.kind =", "+s.kind =")
        return self._source_rows(by_id, (*values, limit, offset), "LIMIT ? OFFSET ?"), total

    def source_counts(self) -> dict[str, int]:
        """How many sources the record holds, counted by SQL without reading one row out: slides and
        folders indexed, their patches, sources that failed, indexed sources with a label."""
        # One pass over sources_by_state (not the rows, thumbnails and all), where the index has it.
        groups = {(state, kind): (count, patches) for state, kind, count, patches in self.connection.execute(
            "SELECT state, kind, COUNT(*), COALESCE(SUM(patch_count), 0) FROM sources GROUP BY state, kind")}
        slides, folders = (groups.get(("indexed", kind), (0, 0))[0] for kind in ("slide", "folder"))
        patches = sum(patches for (state, _), (_, patches) in groups.items() if state == "indexed")
        failed = sum(count for (state, _), (count, _) in groups.items() if state == "failed")
        # CROSS JOIN: the labels first (a few), each source looked up by id, not every source scanned.
        labelled = self.connection.execute(
            "SELECT COUNT(*) FROM labels l CROSS JOIN sources s ON s.id = l.source_id WHERE s.state = 'indexed'"
        ).fetchone()[0] if self._has_labels() else 0
        return {"sources": slides + folders, "slides": slides, "folders": folders, "patches": patches,
                "failed": failed, "labelled": labelled}

    def paths_in(self, text: str) -> list[str]:
        """The paths of the sources (in any state) that occur in `text`, such as an error message."""
        return [row[0] for row in self.connection.execute("SELECT path FROM sources WHERE instr(?, path) > 0",
                                                          (text,))]

    def thumbnail(self, source_id: int) -> Thumbnail | None:
        """A slide's thumbnail; None for a folder (or an id the database does not hold)."""
        row = self.connection.execute("SELECT thumbnail, thumbnail_downsample FROM sources WHERE id = ?",
                                      (source_id,)).fetchone()
        return Thumbnail(row[0], row[1]) if row and row[0] is not None else None

    def patch_ids(self, source_id: int) -> np.ndarray:
        rows = self.connection.execute("SELECT id FROM patches WHERE source_id = ? ORDER BY id", (source_id,))
        return np.array([row[0] for row in rows], dtype=np.int64)

    def source_vectors(self, source_id: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(patch ids, their vectors) of one source, in patch order (float32)."""
        if self.store is not None:
            return self.patch_ids(source_id), self.store.source_vectors(source_id)
        if self.milvus is not None:
            ids = self.patch_ids(source_id)
            return ids, self.milvus.vectors(ids) if len(ids) else np.zeros((0, dim), np.float32)
        row = self.connection.execute("SELECT data FROM vectors WHERE source_id = ?", (source_id,)).fetchone()
        vectors = np.frombuffer(row[0], dtype=np.float32).reshape(-1, dim) if row else np.zeros((0, dim), np.float32)
        return self.patch_ids(source_id), vectors

    def patch_count(self) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM patches").fetchone()[0]

    def patches(self, ids: Sequence[int]) -> dict[int, Patch]:
        """The patches with these ids (missing ids are left out), with their source's path."""
        found: dict[int, Patch] = {}
        ids = [int(i) for i in ids if i >= 0]
        for start in range(0, len(ids), 900):  # SQLite's limit on bound parameters
            chunk = ids[start:start + 900]
            rows = self.connection.execute(
                "SELECT p.id, p.source_id, s.path, s.kind, p.x, p.y, p.width, p.height, p.tissue, p.file, p.class "
                f"FROM patches p JOIN sources s ON s.id = p.source_id WHERE p.id IN ({', '.join('?' * len(chunk))})",
                chunk)
            for row in rows:
                found[row[0]] = Patch(*row)
        return found

    def classes(self) -> set[str]:
        return {row[0] for row in self.connection.execute("SELECT DISTINCT class FROM patches WHERE class IS NOT NULL")}

    def patches_of_files(self, paths: Sequence[str]) -> dict[str, int]:
        """Patch id of each indexed patch image among `paths` (absolute paths)."""
        found = {}
        for start in range(0, len(paths), 900):
            chunk = list(paths[start:start + 900])
            rows = self.connection.execute(
                f"SELECT file, id FROM patches WHERE file IN ({', '.join('?' * len(chunk))})", chunk)
            found.update(dict(rows))
        return found


# The manifest's "model" keys IndexSettings reads itself; any other key is kept as it is (`extra`).
MODEL_KEYS = ("spec", "kind", "weights", "checkpoint", "weights_sha256", "model_name", "model_options", "crop_size",
              "input_steps", "preprocessing", "pooling", "mpp", "embedding_dim")


@dataclass
class IndexSettings:
    """What every vector of an index shares: the encoder that made it and the tiling it was cut with.

    `checkpoint` is the file the encoder's weights came from: a checkpoint of this project, a timm or
    preset encoder's weights file ('random' for timm's seeded random weights, '' for the histogram).
    `spec` is the encoder as named (the checkpoint's path for a checkpoint), `kind` its family; an
    index written before encoders had names holds a checkpoint's vectors, cut by the plain centre
    crop of `crop_size`, and reads so.
    """
    checkpoint: str
    weights_sha256: str
    model_name: str
    model_options: dict
    crop_size: int
    dim: int
    mpp: float
    patch_size: int
    tissue_threshold: float
    index_type: str = "flat"
    ivf_lists: int | None = None
    hnsw_m: int = 32
    extra: dict = field(default_factory=dict)
    spec: str = ""  # default: the checkpoint's path
    kind: str = "checkpoint"
    input_steps: InputSteps | None = None  # default: the plain centre crop of crop_size
    preprocessing: dict | None = None  # Preprocessing.to_dict() (None: not recorded, as in older indexes)
    pooling: str = ""
    encoder_mpp: float | None = None  # the scale the encoder expects, when its source states one
    mosaic: MosaicSettings | None = None  # each slide's mosaic only (None: all its tissue patches)
    vector_dtype: str = "float32"  # of the stored vectors (vector_store.DTYPES); fixed when the index is created
    pq_bytes: int = vector_index.DEFAULT_PQ_BYTES  # ivfpq: bytes of each vector's code
    opq: bool = False  # ivfpq: rotate the vectors (OPQ) before their codes are learnt
    rerank: int = 0  # ivfpq: candidates per query vector re-scored exactly from the store (0: none)
    # Where the vectors live: a Milvus location's spec (milvus_vectors.MilvusLocation.spec), or None or
    # "local": DIR/vectors/ and a faiss index (a run's None: not stated, an existing index keeps its own).
    vector_store: str | None = None

    def __post_init__(self) -> None:
        self.spec = self.spec or self.checkpoint
        if self.input_steps is None:
            self.input_steps = InputSteps(self.crop_size)
        self.crop_size = self.input_steps.crop_size

    @classmethod
    def for_model(cls, encoder: Encoder, tiling: Tiling, index_type: str = "flat",
                  ivf_lists: int | None = None, mosaic: MosaicSettings | None = None,
                  vector_dtype: str = "float32", pq_bytes: int = vector_index.DEFAULT_PQ_BYTES, opq: bool = False,
                  rerank: int = 0, vector_store: str | None = None) -> IndexSettings:
        """The settings of an index of `encoder`'s vectors cut by `tiling`, holding each slide's
        `mosaic` only when one is given, its vectors stored as `vector_dtype`, in `vector_store`
        (a --vector-store value; None: local for a new index, the index's own for an existing one)."""
        tiling.check()
        if vector_dtype not in DTYPES:
            raise UserError(f"--vector-dtype {vector_dtype}: choose one of {', '.join(DTYPES)}")
        if vector_store is not None:
            vector_store = check_milvus_choice(vector_store, index_type, vector_dtype, opq)
        if mosaic is not None:
            mosaic.check()
        weights = encoder.path
        if weights and weights != "random":
            weights = os.path.abspath(weights)
        # A checkpoint is named by its path, which must open from wherever the index is read.
        spec = weights if encoder.kind == "checkpoint" else encoder.spec
        return cls(weights, encoder.weights_sha256(), encoder.model_name, dict(encoder.model_options),
                   encoder.crop_size, encoder.dim, tiling.mpp, tiling.patch_size, tiling.tissue_threshold, index_type,
                   ivf_lists, spec=spec, kind=encoder.kind, input_steps=encoder.input_steps,
                   preprocessing=encoder.preprocessing.to_dict(), pooling=encoder.pooling, encoder_mpp=encoder.mpp,
                   mosaic=mosaic, vector_dtype=vector_dtype, pq_bytes=pq_bytes, opq=opq, rerank=rerank,
                   vector_store=vector_store)

    def vector_index_record(self) -> dict:
        """The manifest's "vector_index": the faiss index's type and its settings."""
        return {"type": self.index_type, "ivf_lists": self.ivf_lists, "hnsw_m": self.hnsw_m,
                "pq_bytes": self.pq_bytes, "opq": self.opq, "rerank": self.rerank}

    @property
    def encoder_identity(self) -> str:
        """What names the encoder whatever file it was read from: a checkpoint's family (its weights'
        hash tells two apart), or the spec of any other encoder."""
        return self.kind if self.kind == "checkpoint" else f"{self.spec} ({self.kind})"

    def describe_encoder(self) -> str:
        """One line: the encoder, its vector and its input steps, as Encoder.describe() words it."""
        pooling = f", {self.pooling}" if self.pooling else ""
        scale = f", {self.encoder_mpp} um/px" if self.encoder_mpp else ""
        weights = f"; weights {self.checkpoint}" if self.checkpoint and self.kind != "checkpoint" else ""
        return (f"{self.spec} ({self.model_name} {self.model_options}, {self.dim}-d{pooling}; "
                f"{self.input_steps.describe()}{scale}{weights})")

    def manifest(self) -> dict:
        model = {"spec": self.spec, "kind": self.kind, "weights": self.checkpoint}
        if self.kind == "checkpoint":
            model["checkpoint"] = self.checkpoint  # where indexes before named encoders kept it
        model.update({"weights_sha256": self.weights_sha256, "model_name": self.model_name,
                      "model_options": self.model_options, "crop_size": self.crop_size,
                      "input_steps": self.input_steps.to_dict(), "preprocessing": self.preprocessing,
                      "pooling": self.pooling, "mpp": self.encoder_mpp, "embedding_dim": self.dim, **self.extra})
        return {"format": FORMAT, "model": model,
                "tiling": {"mpp": self.mpp, "patch_size": self.patch_size, "tissue_threshold": self.tissue_threshold},
                "vector_index": self.vector_index_record(),
                "vector_store": {"dtype": self.vector_dtype,
                                 **({"location": self.vector_store} if self.milvus_location else {})},
                **({} if self.mosaic is None else {"mosaic": self.mosaic.to_dict()}),  # absent: all tissue patches
                "created": _now(), "command": command_line()}

    @classmethod
    def from_manifest(cls, manifest: dict) -> IndexSettings:
        model, tiling, vectors = manifest["model"], manifest["tiling"], manifest["vector_index"]
        extra = {k: v for k, v in model.items() if k not in MODEL_KEYS}
        weights = model["weights"] if "weights" in model else model["checkpoint"]
        steps = model.get("input_steps")
        return cls(weights, model["weights_sha256"], model["model_name"], model["model_options"],
                   model["crop_size"], model["embedding_dim"], tiling["mpp"], tiling["patch_size"],
                   tiling["tissue_threshold"], vectors["type"], vectors.get("ivf_lists"), vectors.get("hnsw_m", 32),
                   extra, spec=model.get("spec") or weights, kind=model.get("kind", "checkpoint"),
                   input_steps=InputSteps.from_dict(steps) if steps else InputSteps(int(model["crop_size"])),
                   preprocessing=model.get("preprocessing"), pooling=model.get("pooling", ""),
                   encoder_mpp=model.get("mpp"),
                   mosaic=MosaicSettings.from_dict(manifest["mosaic"]) if manifest.get("mosaic") else None,
                   vector_dtype=(manifest.get("vector_store") or {}).get("dtype", "float32"),
                   pq_bytes=vectors.get("pq_bytes", vector_index.DEFAULT_PQ_BYTES), opq=vectors.get("opq", False),
                   rerank=vectors.get("rerank", 0),
                   vector_store=(manifest.get("vector_store") or {}).get("location"))

    @property
    def milvus_location(self) -> MilvusLocation | None:
        """Where Milvus keeps the vectors (milvus_vectors.MilvusLocation), None for the local store."""
        return parse_vector_store(self.vector_store or LOCAL)

    def differences(self, other: IndexSettings) -> list[str]:
        """What `other` (a new run's settings) changes of what the index's vectors share."""
        named = {"--encoder": (self.encoder_identity, other.encoder_identity),
                 "weights (model hash)": (self.weights_sha256, other.weights_sha256),
                 "model": (self.model_name, other.model_name), "model options": (self.model_options, other.model_options),
                 "input steps": (self.input_steps.describe(), other.input_steps.describe()),
                 "--mpp": (self.mpp, other.mpp), "--patch-size": (self.patch_size, other.patch_size),
                 "--tissue-threshold": (self.tissue_threshold, other.tissue_threshold),
                 "--mosaic": (_mosaic(self.mosaic), _mosaic(other.mosaic))}
        if other.vector_store is not None:  # stated by the run
            named["--vector-store"] = (self.vector_store or LOCAL, other.vector_store)
        if self.preprocessing is not None:  # an index from before it was recorded: its checkpoint's hash stands
            named["normalisation"] = (self.preprocessing, other.preprocessing)
        return [f"{name} {theirs} (the index has {ours})" for name, (ours, theirs) in named.items() if ours != theirs]


def check_milvus_choice(vector_store: str, index_type: str, vector_dtype: str, opq: bool) -> str:
    """The --vector-store value as the manifest records it (a Milvus location's spec, or local),
    or a one-line UserError for a choice Milvus cannot keep."""
    location = parse_vector_store(vector_store)
    if location is None:
        return LOCAL
    check_index_type(location, index_type)
    if vector_dtype != "float32":
        raise UserError(f"--vector-dtype {vector_dtype}: with --vector-store {vector_store} the vectors are Milvus's "
                        "float32; drop --vector-dtype")
    if opq:
        raise UserError(f"--opq: Milvus builds its IVF_PQ without an OPQ rotation; drop --opq with --vector-store "
                        f"{vector_store}")
    return location.spec


def _mosaic(settings: MosaicSettings | None) -> str:
    return "off" if settings is None else f"on ({settings.describe()})"


def _lock_folder(directory: Path):
    """The exclusive writer's lock of an index folder (an open file; closing it lets go)."""
    lock = open(directory / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"{directory}: another `retrieve.py index` or `remove` is writing this index; "
                        "wait for it to finish") from None
    return lock


def _read_manifest(directory: Path) -> tuple[dict, IndexSettings]:
    """The manifest of the index folder `directory` and its settings, or a one-line UserError."""
    if directory.is_file():
        raise UserError(f"{directory}: an index file of the old format (one .pt file); rebuild it as an index "
                        f"folder: python3 retrieve.py index CHECKPOINT IMAGE_DIR --index DIR")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{directory}: not an index folder (no {MANIFEST}); "
                        "build one with `python3 retrieve.py index CHECKPOINT SOURCE... --index DIR`")
    try:
        manifest = json.loads(manifest_path.read_text())
        settings = IndexSettings.from_manifest(manifest)
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{manifest_path}: unreadable manifest ({error}); rebuild the index") from None
    return manifest, settings


def format_1_message(directory: Path) -> str:
    return (f"{directory}: index format 1 keeps its vectors inside {DATABASE}; convert it (nothing is embedded "
            f"again) with: python3 retrieve.py upgrade --index {directory}")


REBUILD_BATCH_ROWS = 2 ** 16
# Kinds trained on a sample of the store: exact (flat) until the store holds vectors enough to
# train them (vector_index.can_train), see SlideIndex._kind_for.
TRAINED_KINDS = ("ivf", "ivfpq")


class SlideIndex:
    """An index folder: manifest, patch database, vector store and the faiss index over its vectors.

    Open it with `SlideIndex.create` (a new folder) or `SlideIndex.open`; writers (index, remove,
    compact, reindex) hold an exclusive lock on the folder for as long as it is open, readers take
    none. What the index holds is read through its methods (rows as SourceRow, Patch, Thumbnail;
    vectors as float32 arrays); `db`, the PatchDatabase, and its `store`, are its own. An index made
    with --vector-store milvus... has `milvus` (milvus_vectors.MilvusVectors) instead of a store and
    a faiss index: it keeps, searches and gives back the vectors.
    """

    def __init__(self, directory: Path, settings: IndexSettings, writable: bool) -> None:
        self.directory, self.settings, self.writable = directory, settings, writable
        self._lock = _lock_folder(directory) if writable else None
        if not writable and not (directory / DATABASE).is_file():
            raise UserError(f"{directory}: an index with no patches yet (no {DATABASE}); add sources with "
                            "`python3 retrieve.py index CHECKPOINT SOURCE... --index DIR`")
        location = settings.milvus_location
        self.milvus = None if location is None else MilvusVectors(
            location, settings.dim, settings.index_type, settings.ivf_lists, settings.hnsw_m, settings.pq_bytes)
        try:
            self.db = PatchDatabase(directory / DATABASE, readonly=not writable,
                                    store=None if self.milvus else directory / STORE, dim=settings.dim,
                                    vector_dtype=settings.vector_dtype, milvus=self.milvus)
            if writable and self.milvus is not None:
                self._recover_milvus()
        except BaseException:
            if self.milvus is not None:
                self.milvus.close()
            if self._lock is not None:
                self._lock.close()
            raise
        self._vectors = None
        self._vectors_generation = -1
        self._trained_on: int | None = None  # training vectors of the faiss index's lists and codes (None: unknown)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, directory: str | os.PathLike, settings: IndexSettings) -> SlideIndex:
        directory = Path(directory)
        if (directory / MANIFEST).exists():
            raise UserError(f"{directory}: already an index; open it instead")
        if directory.exists() and any(directory.iterdir()):
            raise UserError(f"{directory}: a folder that is not empty and not an index; choose a new --index folder")
        if settings.index_type not in vector_index.INDEX_TYPES:
            raise UserError(f"--index-type {settings.index_type}: choose one of {', '.join(vector_index.INDEX_TYPES)}")
        if settings.vector_dtype not in DTYPES:
            raise UserError(f"--vector-dtype {settings.vector_dtype}: choose one of {', '.join(DTYPES)}")
        location = settings.milvus_location
        if location is not None:  # refused (in one line) before the folder is made: a new index, a new collection
            probe = MilvusVectors(location, settings.dim, settings.index_type)
            try:
                probe.refuse_existing()
            finally:
                probe.close()
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / MANIFEST, json.dumps(settings.manifest(), indent=2) + "\n")
        return cls(directory, settings, writable=True)

    @classmethod
    def open(cls, directory: str | os.PathLike, writable: bool = False) -> SlideIndex:
        directory = Path(directory)
        manifest, settings = _read_manifest(directory)
        if manifest.get("format") == 1:
            raise UserError(format_1_message(directory))
        if manifest.get("format") != FORMAT:
            raise UserError(f"{directory / MANIFEST}: index format {manifest.get('format')}, this version reads "
                            f"{FORMAT}; rebuild the index")
        index = cls(directory, settings, writable)
        if writable:
            index.merge_shards()
        return index

    def close(self) -> None:
        if self.milvus is not None:
            self.milvus.close()
        elif self.writable and self._vectors is not None and self._vectors_generation == self.db.generation:
            if vector_index.index_kind(self._vectors) != self._kind_for(self._vectors.ntotal):
                self._vectors = self._rebuild()  # the first run's vectors are all here: train the lists on them
            self.save_vectors()
        self.db.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> SlideIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ what it holds
    @property
    def generation(self) -> int:
        """Changes with every source added or removed (by this process or another)."""
        return self.db.generation

    @property
    def store(self) -> VectorStore | None:
        """The store of the patch vectors (histo_retrieval.search.vector_store); None with Milvus."""
        return self.db.store

    def _recover_milvus(self) -> None:
        """A writer's first step with Milvus: delete a killed run's uncommitted rows (every id from
        the record's next patch id on) and carry out the removals a killed `remove` left pending."""
        # A collection is made only for an index that never held a patch (one whose creator was
        # killed before making it); an index that did and lost it is refused.
        self.milvus.open(create=self.db.meta("next_patch_id", 1) == 1, writer=True)
        self.milvus.delete_from(self.db.meta("next_patch_id", 1))
        pending = self.db.pending_deletions()
        if pending:
            self.milvus.delete_ranges([(first, count) for _, first, count in pending])
            self.db.clear_pending([row for row, _, _ in pending])

    def sources(self, state: SourceState | None = "indexed") -> list[SourceRow]:
        """The sources in `state` (every one with None), by id."""
        return self.db.sources(state)

    def source_by_path(self, path: str) -> SourceRow | None:
        return self.db.source_by_path(path)

    def sources_by_id(self, ids: Sequence[int], state: SourceState | None = "indexed") -> dict[int, SourceRow]:
        """The sources among `ids` in `state` (every one with None), by id."""
        return self.db.sources_by_id(ids, state)

    def source(self, source_id: int, state: SourceState | None = "indexed") -> SourceRow | None:
        """One source by id (None when the index holds none in `state`)."""
        return self.db.sources_by_id([source_id], state).get(source_id)

    def source_page(self, offset: int = 0, limit: int = 100, name: str = "", kind: SourceKind | None = None,
                    state: SourceState | None = "indexed") -> tuple[list[SourceRow], int]:
        """(one page of the sources, by id; how many match in all): PatchDatabase.source_page."""
        return self.db.source_page(offset, limit, name, kind, state)

    def source_counts(self) -> dict[str, int]:
        """Sources, slides, folders, patches, failed and labelled, counted without listing."""
        return self.db.source_counts()

    def paths_in(self, text: str) -> list[str]:
        """The paths of the sources that occur in `text`."""
        return self.db.paths_in(text)

    def thumbnail(self, source_id: int) -> Thumbnail | None:
        return self.db.thumbnail(source_id)

    def patch_count(self) -> int:
        return self.db.patch_count()

    def patch_ids(self, source_id: int) -> np.ndarray:
        """A source's patch ids, ascending (empty for an id the index does not hold)."""
        return self.db.patch_ids(source_id)

    def patches(self, ids: Sequence[int]) -> dict[int, Patch]:
        """The patches with these ids (missing ids are left out)."""
        return self.db.patches(ids)

    def patches_of_files(self, paths: Sequence[str]) -> dict[str, int]:
        """Patch id of each indexed patch image among `paths` (absolute paths)."""
        return self.db.patches_of_files(paths)

    def source_vectors(self, source_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(patch ids, their vectors) of one source, in patch order."""
        return self.db.source_vectors(source_id, self.settings.dim)

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors (float32, len(ids) x dim) of arbitrary patch ids, in the order given; no
        SQL per id (e.g. to re-rank approximate candidates exactly). KeyError for an id not held."""
        if self.milvus is not None:
            return self.milvus.vectors(ids)
        return self.store.vectors(ids)

    def iter_vectors(self, batch_rows: int = REBUILD_BATCH_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored (patch ids, float32 vectors), in id order, about `batch_rows` rows at a time."""
        if self.milvus is None:
            return self.store.iter_vectors(batch_rows)
        return self._iter_milvus(batch_rows)

    def _iter_milvus(self, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """iter_vectors with Milvus: the record's patch ids in batches, their vectors read from Milvus."""
        ranges = self.db.connection.execute("SELECT first_patch, patch_count FROM sources WHERE state = 'indexed' "
                                            "AND patch_count > 0 ORDER BY first_patch").fetchall()
        parts, held = [], 0
        for position, (first, count) in enumerate(ranges):
            parts.append(np.arange(first, first + count, dtype=np.int64))
            held += count
            if held >= batch_rows or position == len(ranges) - 1:
                ids = np.concatenate(parts)
                yield ids, self.milvus.vectors(ids)
                parts, held = [], 0

    def store_stats(self) -> StoreStats:
        """The store's dtype, live rows, and dead rows and bytes `compact` would give back."""
        self._require_local("the vector store's figures")
        return self.store.stats()

    def _require_local(self, what: str) -> None:
        if self.milvus is not None:
            raise UserError(f"{self.directory}: {what}: this index keeps its vectors in Milvus "
                            f"({self.settings.vector_store}), which manages its own storage and index")

    def classes(self) -> set[str]:
        """The classes of the indexed patch images (their first-level folders)."""
        return self.db.classes()

    def log_run(self, command: str) -> None:
        self.db.log_run(command)

    def add_failure(self, path: str, reason: str) -> None:
        """Record a source that could not be indexed (shown by `list --failed`, retried by the next run)."""
        self.db.add_failure(path, reason)

    def set_labels(self, labels: dict[int, tuple[str, str | None]]) -> None:
        """Give each source id its (label, patient) (`retrieve.py label`); the vectors are untouched."""
        self.db.set_labels(labels, command_line())

    # ------------------------------------------------------------------ the faiss index
    @property
    def vectors(self):
        """The faiss index, current with the database: loaded from its file when that reflects the
        database's generation and is of the manifest's kind, else rebuilt from the stored vectors.
        With Milvus: the MilvusVectors, its collection loaded."""
        if self.milvus is not None:
            self.milvus.open()
            return self.milvus
        generation = self.db.generation
        if self._vectors is not None and self._vectors_generation == generation:
            return self._vectors
        sidecar = self._sidecar()
        saved = sidecar.get("generation")
        loaded = vector_index.load_vector_index(self.directory / VECTORS) if saved == generation else None
        if loaded is not None and vector_index.index_kind(loaded) == self._kind_for(loaded.ntotal):
            self._vectors, self._trained_on = loaded, sidecar.get("trained_on")
        else:
            if loaded is not None:
                print(f"note: {self.directory / VECTORS} is a {vector_index.index_kind(loaded)} index, the manifest "
                      f"says {self.settings.index_type} (a reindex was stopped); rebuilding it from "
                      f"{self.db.patch_count()} stored vectors")
            elif saved is not None:
                print(f"note: {self.directory / VECTORS} is older than the patch database (a run was stopped "
                      f"before saving it); rebuilding it from {self.db.patch_count()} stored vectors")
            self._vectors = self._rebuild()
            if self.writable:
                self._vectors_generation = generation
                self.save_vectors()
        self._vectors_generation = generation
        return self._vectors

    def _sidecar(self) -> dict:
        """The saved faiss file's record: the database generation it reflects and the number of
        vectors it was trained on ({} without a readable one)."""
        sidecar = self.directory / (VECTORS + ".json")
        if not (self.directory / VECTORS).is_file() or not sidecar.is_file():
            return {}
        try:
            record = json.loads(sidecar.read_text())
            return {"generation": int(record["generation"]), "trained_on": record.get("trained_on")}
        except (ValueError, KeyError, TypeError):
            return {}

    def _kind_for(self, count: int, index_type: str | None = None) -> str:
        """The faiss kind an index of `index_type` (the manifest's) holding `count` vectors has: ivf
        is exact (flat) until there are vectors to train its lists on."""
        kind = index_type or self.settings.index_type
        if kind in TRAINED_KINDS and not vector_index.can_train(kind, count):
            return "flat"
        return kind

    def _training_sample(self, count: int, lists: int | None) -> np.ndarray:
        """Training vectors for the lists (and the PQ codes), read from the store: an evenly spread
        sample of vector_index.train_sample_size of them (all of a small store)."""
        size = vector_index.train_sample_size(count, lists)
        if size == count:
            return np.concatenate([part for _, part in self.iter_vectors()])
        return self.vectors_of(self.store.spread_ids(size))

    def _rebuild(self, index_type: str | None = None, ivf_lists: int | None = None):
        """A faiss index of `index_type` (the manifest's by default) over every stored vector, trained
        on a sample and filled in batches of REBUILD_BATCH_ROWS: never all the vectors in memory at once."""
        count = self.store.live_rows()
        kind = self._kind_for(count, index_type)
        lists = ivf_lists if index_type is not None else self.settings.ivf_lists
        if lists is None and kind in TRAINED_KINDS:
            lists = vector_index.default_ivf_lists(count)
        train = self._training_sample(count, lists) if kind in TRAINED_KINDS else None
        settings = self.settings
        index = vector_index.new_vector_index(kind, settings.dim, train, lists, settings.hnsw_m, settings.pq_bytes,
                                              settings.opq)
        self._trained_on = 0 if train is None else len(train)
        for ids, vectors in self.iter_vectors():
            vector_index.add_vectors(index, vectors, ids)
        return index

    def save_vectors(self) -> None:
        if self._vectors is None:
            return
        vector_index.save_vector_index(self._vectors, self.directory / VECTORS)
        atomic_write_text(self.directory / (VECTORS + ".json"),
                          json.dumps({"generation": self._vectors_generation,
                                      **({"trained_on": self._trained_on} if self._trained_on else {})}) + "\n")

    # ------------------------------------------------------------------ changes
    def add(self, record: SourceRecord) -> int:
        """Add one source (its patches and vectors); returns its id."""
        if self.milvus is not None:
            return self.db.add_source(record, command_line())[0]
        current = self.vectors  # brought up to date before this change
        source_id, ids = self.db.add_source(record, command_line())
        if len(ids):
            # What the store holds (float16 rounds), so that a rebuild from it gives this index again.
            stored = np.asarray(record.vectors, np.float32).astype(self.store.dtype).astype(np.float32)
            vector_index.add_vectors(current, stored, ids)
        self._vectors_generation = self.db.generation
        return source_id

    def remove(self, source_id: int) -> int:
        """Remove a source: its record, patches and block go in one transaction; its rows in the store
        become dead space (`compact` gives it back). With Milvus: the record and a pending deletion in
        one transaction, then the rows in Milvus, then the pending deletion is cleared."""
        if self.milvus is not None:
            ids = self.db.remove_source(source_id)
            crash_point("remove-recorded")  # the record is gone, Milvus still holds the rows
            pending = self.db.pending_deletions()
            self.milvus.delete_ranges([(first, count) for _, first, count in pending])
            self.db.clear_pending([row for row, _, _ in pending])
            return len(ids)
        current = self.vectors
        ids = self.db.remove_source(source_id)
        if len(ids) and not vector_index.remove_ids(current, ids):
            self._vectors = self._rebuild()  # HNSW cannot remove: rebuilt without them
        self._vectors_generation = self.db.generation
        return len(ids)

    def compact(self) -> StoreStats:
        """Rewrite the store's live rows into new chunks and delete the old ones (crash-safe: see
        vector_store.VectorStore.compact); returns the stats before. Writers only."""
        self._require_writer("compact")
        self._require_local("compact")
        return self.store.compact()

    def reindex(self, index_type: str, ivf_lists: int | None = None, pq_bytes: int = vector_index.DEFAULT_PQ_BYTES,
                opq: bool = False, rerank: int = 0) -> None:
        """Rebuild the faiss index as `index_type` from the store (nothing is embedded) and record the
        type in the manifest. The faiss file is written first: killed before the manifest, the file's
        kind differs from the manifest's type and the next open rebuilds it as the manifest says.
        With Milvus, the collection's index is built again as that type (MilvusVectors.build_index),
        and a writer opening the index builds it as the manifest says when the two differ."""
        self._require_writer("reindex")
        if self.milvus is not None:
            check_milvus_choice(self.settings.vector_store, index_type, self.settings.vector_dtype, opq)
        if index_type not in vector_index.INDEX_TYPES:
            raise UserError(f"--index-type {index_type}: choose one of {', '.join(vector_index.INDEX_TYPES)}")
        if ivf_lists is not None and ivf_lists < 1:
            raise UserError(f"--ivf-lists must be at least 1, got {ivf_lists}")
        generation = self.db.generation
        previous = self.settings
        self.settings = replace(previous, index_type=index_type, ivf_lists=ivf_lists, pq_bytes=pq_bytes, opq=opq,
                                rerank=rerank)
        try:
            if self.milvus is not None:
                self.milvus.configure(index_type, ivf_lists, self.settings.hnsw_m, pq_bytes)
                self.milvus.build_index()
            else:
                self._vectors = self._rebuild(index_type, ivf_lists)
        except BaseException:
            self.settings = previous
            raise
        if self.milvus is None:
            self._vectors_generation = generation
            self.save_vectors()
        crash_point("reindex-saved")
        manifest = json.loads((self.directory / MANIFEST).read_text())
        manifest["vector_index"] = {**manifest.get("vector_index", {}), **self.settings.vector_index_record()}
        atomic_write_text(self.directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    def _require_writer(self, what: str) -> None:
        if not self.writable:
            raise RuntimeError(f"{what} needs the index opened with writable=True")

    def merge_shards(self) -> list[str]:
        """Move every source of the shard databases left by torchrun processes into the index."""
        merged = []
        shard_dir = self.directory / SHARDS
        for shard_path in sorted(shard_dir.glob("*.sqlite")) if shard_dir.is_dir() else []:
            shard = PatchDatabase(shard_path)
            try:
                for source in shard.sources(None):
                    known = self.db.source_by_path(source.path)
                    if known is not None and known.state == "indexed":
                        continue
                    if source.state == "failed":
                        self.db.add_failure(source.path, source.reason)
                        continue
                    self.add(shard_record(shard, source, self.settings.dim))
                    merged.append(source.path)
            finally:
                shard.close()
            for suffix in ("", "-wal", "-shm"):
                Path(str(shard_path) + suffix).unlink(missing_ok=True)
        return merged

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None,
               nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k stored patches per query vector (vector_index.search). An ivfpq index's candidates are
        re-scored exactly from the store when the index was made with --rerank N: its best max(k, N)
        by their codes, then the best k of those by their stored vectors. With Milvus, Milvus searches
        (MilvusVectors.search), and a hit the record does not hold is never returned."""
        if self.milvus is not None:
            return self._search_milvus(np.ascontiguousarray(queries, np.float32), k, exclude, nprobe, ef_search)
        current = self.vectors
        rerank = self.settings.rerank if vector_index.index_kind(current) == "ivfpq" else 0
        return vector_index.search(current, np.ascontiguousarray(queries, np.float32), k, exclude, nprobe, ef_search,
                                   rerank=rerank or None, vectors_of=self.vectors_of if rerank else None)

    def _search_milvus(self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None,
                       nprobe: int | None, ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        """search() with Milvus. Hits the record does not hold (rows a concurrent writer has not
        committed, or a removal still pending) are excluded and the search asked again."""
        self.milvus.open()
        exclude = list(exclude) if exclude is not None else [None] * len(queries)
        rerank = self.settings.rerank if self.settings.index_type == "ivfpq" else 0
        fetch = max(k, rerank)
        unknown = np.empty(0, np.int64)
        for _ in range(4):
            scores, ids = self.milvus.search(queries, fetch, exclude, nprobe, ef_search)
            hits = np.unique(ids[ids >= 0])
            unknown = np.setdiff1d(hits, np.fromiter(self.db.patches(hits), np.int64))
            if not len(unknown):
                break
            exclude = [unknown if given is None else np.concatenate([np.asarray(given, np.int64), unknown])
                       for given in exclude]
        scores, ids = vector_index.first_k(scores, ids, ~np.isin(ids, unknown), fetch)
        if rerank:
            return vector_index.rerank(queries, ids, self.milvus.vectors, k)
        return scores[:, :k], ids[:, :k]

    def describe_vector_index(self) -> str:
        """The faiss index in a line: its type and settings, and for ivf and ivfpq whether it is
        trained (an untrained one searches exactly until the store holds enough vectors)."""
        s = self.settings
        if self.milvus is not None:
            return f"{s.index_type} in {self.milvus.describe()}"
        text = s.index_type + (f" ({s.pq_bytes} bytes a vector" + (", OPQ" if s.opq else "")
                               + (f", re-ranking the best {s.rerank} exactly" if s.rerank else "") + ")"
                               if s.index_type == "ivfpq" else "")
        if s.index_type not in TRAINED_KINDS:
            return text
        current = self.vectors
        if vector_index.index_kind(current) == "flat":
            needed = vector_index.min_train_vectors(s.index_type)
            return (f"{text}, untrained: searched exactly until it holds {needed} vectors to train on "
                    f"(it holds {current.ntotal})")
        lists = vector_index.ivf_list_count(current)
        trained = f"trained on {self._trained_on} vectors" if self._trained_on else "trained"
        return f"{text}, {trained}, {lists} lists"


def upgrade_index(directory: str | os.PathLike) -> int | None:
    """Convert an index folder of format 1 (vectors as blobs in patches.sqlite) to format 2 without
    embedding anything; returns the number of vectors the store holds after it (None for a folder
    already of format 2: nothing to do).
    Crash-safe, and finished or redone by running it again: the store is written (a killed try's
    rows are deleted by the store's recover), one transaction records every block and drops the
    blobs, then VACUUM gives their space back, then the manifest says format 2."""
    directory = Path(directory)
    manifest, settings = _read_manifest(directory)
    if manifest.get("format") == FORMAT:
        return None
    if manifest.get("format") != 1:
        raise UserError(f"{directory / MANIFEST}: index format {manifest.get('format')}, this version converts 1 "
                        f"and reads {FORMAT}; rebuild the index")
    lock = _lock_folder(directory)
    try:
        moved = 0
        if (directory / DATABASE).is_file():
            db = PatchDatabase(directory / DATABASE, store=directory / STORE, dim=settings.dim)
            try:
                connection, store = db.connection, db.store
                has_blobs = connection.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'vectors'").fetchone()
                if has_blobs:
                    blocks = []
                    for source_id, data in connection.execute(
                            "SELECT v.source_id, v.data FROM vectors v JOIN sources s ON s.id = v.source_id "
                            "ORDER BY s.first_patch"):  # one blob at a time
                        vectors = np.frombuffer(data, np.float32).reshape(-1, settings.dim)
                        blocks.append((source_id, store.append(vectors)))
                        crash_point("upgrade-append")
                    with connection:
                        for source_id, block in blocks:
                            store.record(source_id, block)
                        connection.execute("DROP TABLE vectors")
                    crash_point("upgrade-switched")
                connection.execute("VACUUM")
                moved = store.live_rows()
            finally:
                db.close()
        manifest.update(format=FORMAT, vector_store={"dtype": "float32"})
        atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    finally:
        lock.close()
    return moved


def shard_record(shard: PatchDatabase, source: SourceRow, dim: int) -> SourceRecord:
    """A shard's source as a record to add to the index (new ids are given there)."""
    ids, vectors = shard.source_vectors(source.id, dim)
    patches = shard.patches(ids)
    ordered = [patches[int(i)] for i in ids]
    thumbnail = shard.thumbnail(source.id)
    return SourceRecord(
        path=source.path, kind=source.kind, vectors=vectors.copy(),
        boxes=np.array([[p.x, p.y, p.width, p.height] for p in ordered], dtype=np.int64).reshape(-1, 4),
        tissue=np.array([np.nan if p.tissue is None else p.tissue for p in ordered], np.float32),
        files=[p.file for p in ordered], classes=[p.class_name for p in ordered], file_size=source.file_size,
        mtime=source.mtime, width=source.width, height=source.height, slide_mpp=source.slide_mpp,
        backend=source.backend, thumbnail=thumbnail.jpeg if thumbnail else None,
        thumbnail_downsample=thumbnail.downsample if thumbnail else None)
