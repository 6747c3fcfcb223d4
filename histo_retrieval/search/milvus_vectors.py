"""An index's patch vectors in Milvus (pymilvus), for archives that outgrow one machine.

`retrieve.py index ... --vector-store milvus://HOST:PORT[/COLLECTION]` keeps the vectors in a
collection of a Milvus server (which shards, replicates and serves them across machines);
`--vector-store milvus-lite:PATH.db` in Milvus Lite, the embedded build (`pip install milvus-lite`),
through the same code. The index folder keeps its SQLite record (sources, patches, labels); the
collection holds one row per patch: its id (the primary key), its source's id and its vector.

Crash safety across the two (histo_retrieval.search.index does the SQLite side): a source's vectors
are inserted into the collection inside the SQLite transaction that records it, before its commit,
so a committed patch always has its vector; a writer opening the index deletes every id at or above
the record's next patch id (a killed run's uncommitted rows, `delete_from`). A removal records the
source's id range as pending in the transaction that deletes the source, then deletes it here, then
clears it; a writer replays what a killed removal left pending. Searches also drop any hit the
record does not hold (a concurrent writer's uncommitted rows on a server), see SlideIndex.search.

Milvus Lite serves one process at a time: a query or the search page cannot open the collection
while `retrieve.py index` writes it (a server has no such limit).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from histo_retrieval.errors import UserError, one_line

__all__ = ["DEFAULT_COLLECTION", "INDEX_TYPES", "LOCAL", "TOKEN_ENV", "MilvusLocation", "MilvusVectors",
           "parse_vector_store"]

LOCAL = "local"  # --vector-store's default: the index folder's chunk store and a faiss index
DEFAULT_COLLECTION = "patches"
TOKEN_ENV = "MILVUS_TOKEN"  # "user:password" or an API key of a server with authentication
# Our index types as Milvus's; Milvus Lite has no IVF_PQ (a server has).
INDEX_TYPES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW", "ivfpq": "IVF_PQ"}
LITE_INDEX_TYPES = ("flat", "ivf", "hnsw")
DEFAULT_NLIST = 1024  # Milvus trains its lists per segment, on the segment's own vectors
SEARCH_BATCH = 1024  # query vectors per request (Milvus takes at most 16,384)
GET_BATCH = 4096  # ids per get() request
MAX_TOP_K = 16384  # Milvus's limit on results per query vector
VECTOR_INDEX = "vector"  # the name of the collection's vector index
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_SERVER = re.compile(r"milvus://([^/:]+):(\d{1,5})(?:/([^/]*))?")


@dataclass(frozen=True)
class MilvusLocation:
    """Where the vectors are: a Milvus Lite file (`lite`) or a server's URI, and the collection."""
    uri: str
    collection: str
    lite: bool

    @property
    def spec(self) -> str:
        """The --vector-store value naming this location (what the manifest records)."""
        if self.lite:
            return f"milvus-lite:{self.uri}" + ("" if self.collection == DEFAULT_COLLECTION else f"#{self.collection}")
        return f"milvus://{self.uri.removeprefix('http://')}/{self.collection}"


def parse_vector_store(text: str) -> MilvusLocation | None:
    """The location a --vector-store value names (None for `local`), or a one-line UserError.
    milvus-lite:PATH is made absolute, so that the index opens from any directory."""
    if text == LOCAL:
        return None
    usage = ("--vector-store: use local, milvus-lite:PATH (Milvus Lite, a file) or milvus://HOST:PORT[/COLLECTION] "
             f"(a Milvus server); got {text!r}")
    if text.startswith("milvus-lite:"):
        path, _, collection = text.removeprefix("milvus-lite:").partition("#")
        if not path:
            raise UserError(usage)
        if not path.endswith(".db"):
            raise UserError(f"--vector-store {text}: Milvus Lite's PATH must end in .db (it is a folder of its "
                            "data), e.g. milvus-lite:archive.db")
        location = MilvusLocation(os.path.abspath(path), collection or DEFAULT_COLLECTION, lite=True)
    else:
        match = _SERVER.fullmatch(text)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise UserError(usage)
        host, port, collection = match.groups()
        location = MilvusLocation(f"http://{host}:{port}", collection or DEFAULT_COLLECTION, lite=False)
    if not _NAME.fullmatch(location.collection):
        raise UserError(f"--vector-store {text}: collection name {location.collection!r} must be letters, digits "
                        "and underscores, not starting with a digit")
    return location


class MilvusVectors:
    """One index's collection: add, delete, search and read vectors by patch id.

    It connects on first use, so that a process that never reads a vector (a `list --summary`, a
    torchrun process writing its shard) does not open Milvus Lite's file, which one process holds
    at a time. search() returns what vector_index.search does: (scores float32 n x k, ids int64
    n x k), best first, padded with -inf / -1; hits of equal score come in id order.
    """

    def __init__(self, location: MilvusLocation, dim: int, index_type: str = "flat", ivf_lists: int | None = None,
                 hnsw_m: int = 32, pq_bytes: int = 64) -> None:
        self.location, self.dim = location, int(dim)
        self.configure(index_type, ivf_lists, hnsw_m, pq_bytes)
        self._client = None
        self._loaded = False

    def configure(self, index_type: str, ivf_lists: int | None = None, hnsw_m: int = 32, pq_bytes: int = 64) -> None:
        """The vector index the collection should have (build_index makes it so)."""
        check_index_type(self.location, index_type)
        self.index_type, self.ivf_lists, self.hnsw_m, self.pq_bytes = index_type, ivf_lists, hnsw_m, pq_bytes

    # ------------------------------------------------------------------ connection
    @property
    def client(self):
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self):
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise UserError(f"--vector-store {self.location.spec}: pymilvus is not installed; "
                            "pip install 'pymilvus==3.0.2' 'milvus-lite==3.2.2' (or this project's [milvus] extra)") \
                from None
        where = f"--vector-store {self.location.spec}"
        if self.location.lite:
            Path(self.location.uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                return MilvusClient(self.location.uri)
            except Exception as error:
                if _lite_locked(self.location.uri):
                    raise UserError(f"{where}: another process has this Milvus Lite file open (Milvus Lite serves "
                                    "one process at a time: wait for it, or use a Milvus server)") from None
                raise UserError(f"{where}: Milvus Lite did not start ({one_line(error)})") from None
        token = os.environ.get(TOKEN_ENV, "")
        try:
            return MilvusClient(uri=self.location.uri, token=token, timeout=30)
        except Exception as error:
            raise UserError(f"{where}: cannot reach the Milvus server ({one_line(error)}); is it running, and "
                            f"is {TOKEN_ENV} set where it needs authentication?") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self._loaded = False
            if self.location.lite:
                # Milvus Lite's in-process server outlives the client and holds its file's lock; let
                # go of it, so that another process (a query after a run) can open the file.
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.location.uri)

    def exists(self) -> bool:
        return bool(self.client.has_collection(self.location.collection))

    def refuse_existing(self) -> None:
        """A one-line UserError when the collection exists (a new index never adopts another's vectors)."""
        if self.exists():
            raise UserError(f"--vector-store {self.location.spec}: the collection {self.location.collection!r} exists "
                            "already (another index's?); name a new one (milvus://HOST:PORT/NAME or "
                            "milvus-lite:PATH#NAME) or drop it")

    def create(self) -> None:
        """Create the collection (id, source_id, vector; inner product) with its vector index.
        Refused when it exists: a new index never adopts another's vectors."""
        from pymilvus import DataType

        name = self.location.collection
        self.refuse_existing()
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("source_id", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        params = self._index_spec()
        # Strong: a search sees every insert and delete made before it (our crash safety relies on it).
        self.client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")

    def open(self, create: bool = False, writer: bool = False) -> None:
        """Load the collection for searching (once); with `create`, make it first when it is not there.
        A `writer` builds its vector index again when it is not of the configured type (a `reindex`
        killed before it recorded the new type, or after it dropped the old index)."""
        if self._loaded:
            return
        if create and not self.exists():
            self.create()
        if not self.exists():
            raise UserError(f"--vector-store {self.location.spec}: the collection {self.location.collection!r} is "
                            "gone; the index's vectors are lost with it: build the index again")
        if writer and self._built_type() != INDEX_TYPES[self.index_type]:
            self.build_index()
        self.client.load_collection(self.location.collection)
        self._loaded = True

    def _built_type(self) -> str | None:
        name = self.location.collection
        if VECTOR_INDEX not in self.client.list_indexes(name):
            return None
        return self.client.describe_index(name, VECTOR_INDEX)["index_type"]

    def build_index(self) -> None:
        """Build the collection's vector index again as configured, dropping the one it has (Milvus
        builds it from the vectors it keeps; nothing is embedded)."""
        name = self.location.collection
        self.client.release_collection(name)
        self._loaded = False
        if VECTOR_INDEX in self.client.list_indexes(name):
            self.client.drop_index(name, VECTOR_INDEX)
        self.client.create_index(name, self._index_spec())
        self.client.load_collection(name)
        self._loaded = True

    def _index_spec(self):
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_name=VECTOR_INDEX, index_type=INDEX_TYPES[self.index_type],
                         metric_type="IP", params=self._index_params())
        return params

    def _index_params(self) -> dict:
        lists = self.ivf_lists or DEFAULT_NLIST
        return {"flat": {}, "ivf": {"nlist": lists}, "hnsw": {"M": self.hnsw_m, "efConstruction": 128},
                "ivfpq": {"nlist": lists, "m": self.pq_bytes, "nbits": 8}}[self.index_type]

    # ------------------------------------------------------------------ writes
    def add(self, ids: np.ndarray, source_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert rows (patch id, its source's id, float32 vector); call before the SQLite commit."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        for start in range(0, len(ids), GET_BATCH):
            rows = slice(start, start + GET_BATCH)
            self.client.insert(self.location.collection, [
                {"id": int(i), "source_id": int(s), "vector": v}
                for i, s, v in zip(ids[rows], source_ids[rows], vectors[rows])])

    def delete_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Delete the rows of the patch ids first .. first + count - 1 of each (first, count)."""
        for first, count in ranges:
            if count > 0:
                self.client.delete(self.location.collection, filter=f"id >= {int(first)} and id < {int(first + count)}")

    def delete_from(self, first: int) -> None:
        """Delete every row of id `first` or above (uncommitted rows of a killed run)."""
        self.client.delete(self.location.collection, filter=f"id >= {int(first)}")

    # ------------------------------------------------------------------ reads
    def count(self) -> int:
        """Rows the collection holds (a server may count deleted rows until it compacts)."""
        self.open()
        return int(self.client.get_collection_stats(self.location.collection)["row_count"])

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors (float32, len(ids) x dim, in the order given) of these patch ids; KeyError for
        an id the collection does not hold."""
        self.open()
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), np.float32)
        distinct = np.unique(ids)
        found: dict[int, list[float]] = {}
        for start in range(0, len(distinct), GET_BATCH):
            for row in self.client.get(self.location.collection, ids=distinct[start:start + GET_BATCH].tolist(),
                                       output_fields=["vector"]):
                found[int(row["id"])] = row["vector"]
        for i, patch_id in enumerate(ids):
            if int(patch_id) not in found:
                raise KeyError(f"patch id {int(patch_id)} is not in the index")
            out[i] = found[int(patch_id)]
        return out

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray | None] | None = None,
               nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product, never an id of exclude[i] for query i (a filter on the id, as
        ranges: a source's ids are contiguous, so a slide's or a patient's set is a few ranges)."""
        self.open()
        queries = np.ascontiguousarray(queries, np.float32)
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_TOP_K:
            raise UserError(f"k must be an integer from 1 to {MAX_TOP_K} with Milvus, got {k!r}")
        n = len(queries)
        if exclude is not None and len(exclude) != n:
            raise UserError(f"{n} queries but {len(exclude)} exclusion sets")
        scores = np.full((n, k), -np.inf, np.float32)
        ids = np.full((n, k), -1, np.int64)
        groups: dict[bytes, tuple[np.ndarray, list[int]]] = {}
        for i in range(n):
            banned = np.unique(np.asarray(exclude[i], np.int64)) if exclude is not None and exclude[i] is not None \
                else np.empty(0, np.int64)
            groups.setdefault(banned.tobytes(), (banned, []))[1].append(i)
        params = {"metric_type": "IP", "params": self._search_params(k, nprobe, ef_search)}
        for banned, rows in groups.values():
            expression = _excluding(banned)
            for start in range(0, len(rows), SEARCH_BATCH):
                batch = rows[start:start + SEARCH_BATCH]
                found = self.client.search(self.location.collection, data=[q for q in queries[batch]], limit=k,
                                           filter=expression, search_params=params, anns_field="vector",
                                           output_fields=["id"])  # not the vectors
                for row, hits in zip(batch, found):
                    pairs = sorted(((float(hit["distance"]), int(hit["id"])) for hit in hits),
                                   key=lambda pair: (-pair[0], pair[1]))[:k]
                    if pairs:
                        scores[row, :len(pairs)] = [s for s, _ in pairs]
                        ids[row, :len(pairs)] = [i for _, i in pairs]
        return scores, ids

    def _search_params(self, k: int, nprobe: int | None, ef_search: int | None) -> dict:
        if self.index_type in ("ivf", "ivfpq"):
            return {"nprobe": int(nprobe or max(8, (self.ivf_lists or DEFAULT_NLIST) // 64))}
        if self.index_type == "hnsw":
            return {"ef": max(int(ef_search or 128), k)}
        return {}

    def describe(self) -> str:
        engine = "Milvus Lite" if self.location.lite else "Milvus"
        return (f"{engine} {INDEX_TYPES[self.index_type]} (inner product), collection {self.location.collection!r} "
                f"at {self.location.uri}")


def check_index_type(location: MilvusLocation, index_type: str) -> None:
    """Refuse in one line an index type the engine at `location` does not build."""
    if index_type not in INDEX_TYPES:
        raise UserError(f"--index-type {index_type}: choose one of {', '.join(INDEX_TYPES)}")
    if location.lite and index_type not in LITE_INDEX_TYPES:
        raise UserError(f"--index-type {index_type}: Milvus Lite has no {INDEX_TYPES[index_type]} index (a Milvus "
                        f"server has); choose {', '.join(LITE_INDEX_TYPES)}, or point --vector-store at a server")


def _excluding(banned: np.ndarray) -> str:
    """A Milvus filter keeping every id but the sorted, distinct `banned`, written as ranges."""
    if not len(banned):
        return ""
    breaks = np.flatnonzero(np.diff(banned) != 1) + 1
    starts, ends = banned[np.r_[0, breaks]], banned[np.r_[breaks - 1, len(banned) - 1]]
    return " and ".join(f"id != {a}" if a == b else f"(id < {a} or id > {b})" for a, b in zip(starts, ends))


def _lite_locked(path: str) -> bool:
    """Whether another process holds Milvus Lite's lock on the data folder at `path`."""
    import fcntl

    lock = Path(path) / "LOCK"
    if not lock.is_file():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
