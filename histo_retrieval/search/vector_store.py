"""An index folder's patch vectors, outside SQLite: append-only chunk files addressed by patch id.

    DIR/vectors/NNNNNN.vec   raw little-endian rows of `dim` values (float32 or float16), read with np.memmap

The SQLite database of the index (histo_retrieval.search.index) says where each source's rows are:
a source's patch ids are contiguous (first_patch .. first_patch + patch_count - 1), so one row per
source, `vector_blocks(source_id, chunk, row)`, places them all; `vector_chunks(chunk, rows)` holds
each chunk's committed length. A writer appends a source's rows (flushed and fsynced) before the
transaction that records the source and its block, so a block never names bytes that are not on
disk. Opening a writer (`recover`) cuts each chunk back to its committed length and deletes chunk
files no committed chunk row names: the tail of a killed run, or the leftovers of a killed `compact`.
Bytes of removed sources stay in their chunk (never read, counted as dead) until `compact` rewrites
the live rows into new chunks, switches every block in one transaction and then deletes the old files.

Readers (a query, the search page) never change anything; they map chunks read-only and reload
their map whenever the database changed (PRAGMA data_version), so a compact under them is harmless:
a file deleted after the switch stays readable through a map made before it. Rows read by id far
apart (re-ranking's candidates) go through a second map of the chunk advised MADV_RANDOM: on a
plain map every page fault makes the kernel read up to the disk's read_ahead_kb around the row
(often megabytes) for one row of 1 KiB, which is what a store larger than memory pays.
"""
from __future__ import annotations

import mmap
import os
import signal
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from histo_retrieval.errors import UserError

__all__ = ["CHUNK_ROWS", "DTYPES", "SCATTERED_GAP_BYTES", "STORE_SCHEMA", "Block", "StoreStats", "VectorStore", "crash_point"]

DTYPES = ("float32", "float16")
# A chunk takes sources until it passes this many rows (a source is never split): 2**20 rows of 512
# float32 values is 2 GiB, a size every file system and memory map handles.
CHUNK_ROWS = 2 ** 20
# Rows read by id further apart than this on average are read through the chunk's MADV_RANDOM map;
# closer ones (a training sample, a whole source) keep the kernel's read-ahead: reading the pages
# between them in one sequential stream costs less than a random read per row.
SCATTERED_GAP_BYTES = 2 ** 17
SUFFIX = ".vec"
STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS vector_chunks (chunk INTEGER PRIMARY KEY, rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vector_blocks (
    source_id INTEGER PRIMARY KEY REFERENCES sources(id) ON DELETE CASCADE, chunk INTEGER NOT NULL,
    row INTEGER NOT NULL);
"""
# Tests stop a process at a named point of a write with SIGKILL (crash safety is tested by really
# killing): HISTO_RETRIEVAL_CRASH_AT=NAME, or NAME:N for the N-th time it is reached.
CRASH_ENV = "HISTO_RETRIEVAL_CRASH_AT"
_reached: dict[str, int] = {}
T = TypeVar("T")


def crash_point(name: str) -> None:
    """Kill this process here when the test hook (CRASH_ENV) names this point; nothing otherwise."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Block:
    """Where a source's rows are: `count` rows from `row` of chunk `chunk`."""
    chunk: int
    row: int
    count: int


@dataclass(frozen=True)
class StoreStats:
    """What the store holds: live rows (of indexed sources), and rows and bytes nothing reads any more
    (of removed sources), which `compact` gives back."""
    dtype: str
    chunks: int
    live_rows: int
    dead_rows: int
    row_bytes: int

    @property
    def file_bytes(self) -> int:
        return (self.live_rows + self.dead_rows) * self.row_bytes

    @property
    def dead_bytes(self) -> int:
        return self.dead_rows * self.row_bytes


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VectorStore:
    """The vectors of an index, by patch id, in DIR/vectors/ (see the module's docstring).

    It shares the index database's connection: `record` runs inside the caller's transaction, so a
    source and its block are committed together. Reads return float32 whatever the stored dtype.
    """

    def __init__(self, directory: str | os.PathLike, connection: sqlite3.Connection, dim: int,
                 dtype: str = "float32", writable: bool = False, chunk_rows: int = CHUNK_ROWS,
                 scattered_gap_bytes: float = SCATTERED_GAP_BYTES) -> None:
        if dtype not in DTYPES:
            raise UserError(f"--vector-dtype {dtype}: choose one of {', '.join(DTYPES)}")
        self.directory, self.connection, self.dim, self.writable = Path(directory), connection, int(dim), writable
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.dtype_name, self.chunk_rows, self.scattered_gap_bytes = dtype, chunk_rows, scattered_gap_bytes
        self.row_bytes = self.dim * self.dtype.itemsize
        self._version: tuple[int, int] | None = None
        self._maps: dict[tuple[int, bool], np.ndarray] = {}  # (chunk, advised MADV_RANDOM): its rows
        self._tail: tuple[int, int] | None = None  # writer: (chunk, rows written) where the next append goes
        if writable:
            self.directory.mkdir(parents=True, exist_ok=True)
            connection.executescript(STORE_SCHEMA)
            self.recover()

    # ------------------------------------------------------------------ files
    def chunk_path(self, chunk: int) -> Path:
        return self.directory / f"{chunk:06d}{SUFFIX}"

    def _committed(self) -> dict[int, int]:
        return dict(self.connection.execute("SELECT chunk, rows FROM vector_chunks"))

    def _chunk_files(self) -> dict[int, Path]:
        found = {}
        for path in self.directory.glob(f"*{SUFFIX}"):
            if path.stem.isdigit():
                found[int(path.stem)] = path
        return found

    def recover(self) -> None:
        """Cut every chunk back to its committed length and delete the chunk files no committed chunk
        names (a killed run's rows, a killed compact's new or old files). Writer only."""
        committed = self._committed()
        for chunk, path in self._chunk_files().items():
            if chunk not in committed:
                path.unlink()
            elif path.stat().st_size > committed[chunk] * self.row_bytes:
                os.truncate(path, committed[chunk] * self.row_bytes)
        for path in self.directory.glob("*.tmp"):
            path.unlink()
        for chunk, rows in committed.items():
            if not self.chunk_path(chunk).is_file() or self.chunk_path(chunk).stat().st_size < rows * self.row_bytes:
                raise UserError(f"{self.chunk_path(chunk)}: missing or shorter than the {rows} rows the index records; "
                                "the index folder was damaged, rebuild it")
        self._tail = max(committed.items()) if committed else None
        self._maps.clear()
        self._version = None

    # ------------------------------------------------------------------ writes
    def append(self, vectors: np.ndarray) -> Block:
        """Write one source's rows to the end of the store and flush them to disk; `record` then
        makes them the source's, inside the transaction that adds the source. Writer only."""
        if not self.writable:
            raise RuntimeError("the vector store was opened read-only")
        rows = np.ascontiguousarray(vectors, dtype=self.dtype)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"vectors must be n x {self.dim}, got shape {rows.shape}")
        count = len(rows)
        if self._tail is None or (self._tail[1] > 0 and self._tail[1] + count > self.chunk_rows):
            highest = max([*self._committed(), *self._chunk_files(), *([self._tail[0]] if self._tail else [])],
                          default=0)
            self._tail = (highest + 1, 0)
        chunk, start = self._tail
        if count:
            path = self.chunk_path(chunk)
            new = not path.exists()
            with open(path, "r+b" if not new else "wb") as f:
                f.truncate(start * self.row_bytes)  # bytes a failed append left past the tail
                f.seek(start * self.row_bytes)
                f.write(rows.tobytes())
                f.flush()
                os.fsync(f.fileno())
            if new:
                _fsync_directory(self.directory)
        self._tail = (chunk, start + count)
        return Block(chunk, start, count)

    def record(self, source_id: int, block: Block) -> None:
        """Make `block` the rows of `source_id`: call inside the transaction that inserts the source."""
        if not block.count:
            return
        self.connection.execute("INSERT INTO vector_blocks (source_id, chunk, row) VALUES (?, ?, ?)",
                                (source_id, block.chunk, block.row))
        self.connection.execute(
            "INSERT INTO vector_chunks (chunk, rows) VALUES (?, ?) ON CONFLICT (chunk) DO UPDATE SET "
            "rows = MAX(rows, excluded.rows)", (block.chunk, block.row + block.count))

    # ------------------------------------------------------------------ the map
    def _current(self) -> None:
        """Reload the id map when the database changed since it was read (another process's commit
        moves data_version, this connection's own total_changes)."""
        version = (self.connection.execute("PRAGMA data_version").fetchone()[0], self.connection.total_changes)
        if version == self._version:
            return
        rows = self.connection.execute(
            "SELECT s.first_patch, s.patch_count, b.chunk, b.row, b.source_id FROM vector_blocks b "
            "JOIN sources s ON s.id = b.source_id ORDER BY s.first_patch").fetchall()
        table = np.array(rows, dtype=np.int64).reshape(-1, 5)
        self._first, self._count, self._chunk, self._row, self._source = table.T.copy()
        self._by_source = {int(s): i for i, s in enumerate(self._source)}
        self._lengths = self._committed()
        self._maps = {}
        self._version = version

    def _map(self, chunk: int, scattered: bool = False) -> np.ndarray:
        """The committed rows of `chunk`, mapped read-only; `scattered`: through a map advised
        MADV_RANDOM (no read-ahead), for rows read far apart."""
        mapped = self._maps.get((chunk, scattered))
        if mapped is None:
            rows = self._lengths.get(chunk, 0)
            if rows == 0:
                mapped = np.zeros((0, self.dim), self.dtype)
            else:
                with open(self.chunk_path(chunk), "rb") as f:
                    pages = mmap.mmap(f.fileno(), rows * self.row_bytes, access=mmap.ACCESS_READ)
                if scattered and hasattr(mmap, "MADV_RANDOM"):
                    pages.madvise(mmap.MADV_RANDOM)
                mapped = np.frombuffer(pages, self.dtype).reshape(rows, self.dim)
            self._maps[chunk, scattered] = mapped
        return mapped

    def _read(self, read: Callable[[], T]) -> T:
        """read() under a current map; once more after reloading it when a chunk file went away
        (a compact switched the blocks between our check and our read)."""
        self._current()
        try:
            return read()
        except FileNotFoundError:
            self._version = None
            self._current()
            return read()

    # ------------------------------------------------------------------ reads
    def source_vectors(self, source_id: int) -> np.ndarray:
        """One source's rows (float32, a copy), in patch order; empty when it has none."""
        def read() -> np.ndarray:
            i = self._by_source.get(int(source_id))
            if i is None:
                return np.zeros((0, self.dim), np.float32)
            return np.array(self._map(int(self._chunk[i]))[self._row[i]:self._row[i] + self._count[i]], np.float32)

        return self._read(read)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The rows of these patch ids (float32, len(ids) x dim, in the order given), found with
        np.searchsorted over the sources' id ranges: no SQL per id. KeyError for an id no live
        source holds."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)

        def read() -> np.ndarray:
            out = np.empty((len(ids), self.dim), np.float32)
            if not len(ids):
                return out
            at = np.searchsorted(self._first, ids, side="right") - 1
            valid = (at >= 0) & (ids >= 0)
            at = np.maximum(at, 0)
            valid &= len(self._first) > 0
            if len(self._first):
                valid &= ids < self._first[at] + self._count[at]
            if not valid.all():
                raise KeyError(f"patch id {int(ids[~valid][0])} is not in the index")
            rows = self._row[at] + ids - self._first[at]
            chunks = self._chunk[at]
            for chunk in np.unique(chunks):
                mine = chunks == chunk
                scattered = self._lengths.get(int(chunk), 0) * self.row_bytes > self.scattered_gap_bytes * mine.sum()
                out[mine] = self._map(int(chunk), bool(scattered))[rows[mine]]
            return out

        return self._read(read)

    def iter_vectors(self, batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every live (patch ids, float32 vectors), in id order, in batches of about `batch_rows` rows
        (a source is never split), so that a rebuild never holds all the vectors at once. It reads
        the store as it was when it began: every chunk is mapped first, so a compact that deletes
        them meanwhile changes nothing it reads."""
        def snapshot():
            return (list(zip(self._first, self._count, self._chunk, self._row)),
                    {int(chunk): self._map(int(chunk)) for chunk in np.unique(self._chunk)})

        order, maps = self._read(snapshot)
        ids_parts, vector_parts, held = [], [], 0
        for first, count, chunk, row in order:
            ids_parts.append(np.arange(first, first + count, dtype=np.int64))
            vector_parts.append(np.array(maps[int(chunk)][row:row + count], np.float32))
            held += count
            if held >= batch_rows:
                yield np.concatenate(ids_parts), np.concatenate(vector_parts)
                ids_parts, vector_parts, held = [], [], 0
        if ids_parts:
            yield np.concatenate(ids_parts), np.concatenate(vector_parts)

    def spread_ids(self, size: int) -> np.ndarray:
        """`size` live patch ids evenly spread over all of them in id order (a training sample),
        without listing every id: positions are mapped through the sources' cumulative counts."""
        self._current()
        total = int(self._count.sum())
        positions = np.linspace(0, total - 1, min(size, total)).astype(np.int64) if total else np.zeros(0, np.int64)
        ends = np.cumsum(self._count)
        at = np.searchsorted(ends, positions, side="right")
        return self._first[at] + positions - (ends[at] - self._count[at])

    def live_rows(self) -> int:
        self._current()
        return int(self._count.sum())

    def stats(self) -> StoreStats:
        self._current()
        total = sum(self._lengths.values())
        live = int(self._count.sum())
        return StoreStats(self.dtype_name, len(self._lengths), live, total - live, self.row_bytes)

    # ------------------------------------------------------------------ compact
    def compact(self) -> StoreStats:
        """Rewrite the live rows into new chunk files, switch every block to them in one transaction,
        then delete the old files; returns the stats before. Killed at any point, the index reads the
        same: before the switch the new files are a tail `recover` deletes, after it the old ones are.
        Writer only (the caller holds the index's lock)."""
        if not self.writable:
            raise RuntimeError("the vector store was opened read-only")
        before = self.stats()
        old = set(self._lengths) | set(self._chunk_files())
        blocks = list(zip(self._source, self._first, self._count, self._chunk, self._row))
        chunk = max(old, default=0) + 1
        written: dict[int, int] = {}
        moves = []
        f = None
        try:
            for source_id, first, count, old_chunk, old_row in blocks:
                if f is None or (written[chunk] > 0 and written[chunk] + count > self.chunk_rows):
                    if f is not None:
                        f.flush()
                        os.fsync(f.fileno())
                        f.close()
                        chunk += 1
                    f = open(self.chunk_path(chunk), "wb")
                    written[chunk] = 0
                f.write(np.ascontiguousarray(self._map(int(old_chunk))[old_row:old_row + count]).tobytes())
                moves.append((chunk, written[chunk], int(source_id)))
                written[chunk] += int(count)
                crash_point("compact-copy")
        finally:
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        _fsync_directory(self.directory)
        crash_point("compact-written")
        with self.connection:
            self.connection.execute("DELETE FROM vector_chunks")
            self.connection.executemany("INSERT INTO vector_chunks (chunk, rows) VALUES (?, ?)", written.items())
            self.connection.executemany("UPDATE vector_blocks SET chunk = ?, row = ? WHERE source_id = ?", moves)
        crash_point("compact-switched")
        self._maps.clear()
        for number in sorted(old):
            self.chunk_path(number).unlink(missing_ok=True)
        _fsync_directory(self.directory)
        self._tail = max(written.items()) if written else None
        self._version = None
        return before
