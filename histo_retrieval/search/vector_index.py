"""Persistent inner-product vector indexes with ids (faiss), for the whole-slide search store.

Vectors are float32 rows whose inner product is the similarity (the caller normalises them); ids
are non-negative int64 (-1 is faiss's "no result"). Four kinds:

- flat: exact, IndexIDMap2(IndexFlatIP); cost grows with the number of vectors.
- ivf: IndexIVFFlat (k-means lists, IndexFlatIP quantizer): scans `nprobe` of the lists.
- hnsw: IndexIDMap2(IndexHNSWFlat): a graph walk of width `ef_search`; fastest at high recall, but
  faiss cannot remove from it (remove_ids returns False and the caller rebuilds).
- ivfpq: IndexIVFPQ, the ivf lists holding product-quantised codes (pq_bytes bytes a vector instead
  of 4 * dim), optionally behind an OPQ rotation (IndexPreTransform(OPQMatrix, IndexIVFPQ)). Its
  scores are approximate; search(..., rerank=N, vectors_of=...) re-ranks the best N exactly from
  vectors kept elsewhere (the vector store, Milvus): see rerank().

Training (ivf, ivfpq) takes a sample: train_sample_size() says how big, train_sample() draws it from
vectors read in chunks, can_train() / min_train_vectors() say whether there are enough.

bench/search_speed.py measures them against each other; bench/results.md has the figures.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence

import faiss
import numpy as np

from histo_retrieval.errors import UserError, one_line
from histo_retrieval.files import atomic_write

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
IVF_KINDS = ("ivf", "ivfpq")  # searched by lists, nprobe of them
# IVF: scan this fraction of the lists unless told otherwise (at least DEFAULT_MIN_NPROBE lists).
DEFAULT_NPROBE_FRACTION = 1 / 64
DEFAULT_MIN_NPROBE = 8
DEFAULT_EF_SEARCH = 128
TRAIN_POINTS_PER_LIST = 64
# HNSW graph construction width. faiss's default (40) builds a good graph only when all vectors come
# in one add() (it inserts them highest level first); added in batches, as slides are, recall@10
# fell from 0.99 to 0.88 (200k x 512 clustered vectors, 5,000 per add, efSearch 128), and on the
# bench's 1M (100,000 per add) to 0.67. With 120 it stayed at 0.99 on the 200k whatever the
# batches, and with 128 the 1M reaches 0.97 at efSearch 32: about twice the build time.
HNSW_EF_CONSTRUCTION = 128
# search() widens an HNSW walk up to this before searching a short row's vectors exactly.
HNSW_MAX_EF_SEARCH = 4096
# Exclusion sets up to this size (per index type) are handled by asking for k + len(set) results
# and dropping the excluded ones, bigger ones by a faiss IDSelector that skips them during the search.
# bench/search_speed.py, 1M x 512, batches of 10 queries, each excluding its own ~500-vector
# component: over-fetching is the faster for flat (the selector tests every vector against the set),
# exact either way, and for hnsw at recall@10 0.99 (and 0.90 against 0.81 at a narrower walk). ivf:
# the same lists are scanned either way, and with a shared 10,000-id set the selector is the faster
# (recall 0.94 against 0.96). Timings: bench/results.md, "Vector search".
# ivfpq scans lists as ivf does (not measured apart).
OVERFETCH_MAX = {"flat": 16384, "ivf": 256, "hnsw": 4096, "ivfpq": 256}
# IVF-PQ: pq_bytes sub-quantizers of PQ_BITS bits (256 centroids each). faiss's k-means asks for 39
# training points per centroid (it warns below, and fails below one per centroid), so an ivfpq index
# is not built on fewer than IVFPQ_MIN_TRAIN vectors; each sub-quantizer trains on at most
# PQ_TRAIN_POINTS of them (faiss's default cap, 256 per centroid), and an OPQ rotation likewise.
DEFAULT_PQ_BYTES = 64
PQ_BITS = 8
IVFPQ_MIN_TRAIN = 39 * 2**PQ_BITS
PQ_TRAIN_POINTS = 256 * 2**PQ_BITS
# Training samples (train_sample_size): what the k-means runs use, at most this many rows (2M x 512
# float32 is 4 GiB, plus faiss's residuals of them while training IVF-PQ).
TRAIN_SAMPLE_MAX = 2_000_000


def default_ivf_lists(num_train: int) -> int:
    """About 4 * sqrt(n) lists, fewer when k-means would get under 39 training points per list."""
    return max(1, min(round(4 * math.sqrt(num_train)), num_train // 39))


def min_train_vectors(kind: str) -> int:
    """The fewest training vectors new_vector_index accepts for `kind` (0: it needs none)."""
    if kind not in INDEX_TYPES:
        raise UserError(f"unknown vector index type {kind!r}; choose one of {', '.join(INDEX_TYPES)}")
    return {"ivf": 1, "ivfpq": IVFPQ_MIN_TRAIN}.get(kind, 0)


def can_train(kind: str, num_vectors: int, ivf_lists: int | None = None) -> bool:
    """Whether `num_vectors` training vectors are enough for a `kind` index (with ivf_lists lists,
    when given: k-means needs at least one vector per list). An index store holding fewer keeps an
    exact (flat) index until a run brings enough."""
    return num_vectors >= max(min_train_vectors(kind), ivf_lists or 0)


def train_sample_size(num_vectors: int, lists: int | None = None) -> int:
    """How many of `num_vectors` vectors to train an ivf / ivfpq index of `lists` lists (default
    default_ivf_lists(num_vectors)) on: what its k-means runs use, so that no row is read only to be
    dropped: TRAIN_POINTS_PER_LIST per list (the coarse k-means subsamples to that), at least
    PQ_TRAIN_POINTS (a PQ sub-quantizer's or OPQ's cap), at most TRAIN_SAMPLE_MAX, at most them all.
    The cap binds beyond about 60 million vectors at the default lists (31,250 lists); beyond about
    160 million the default lists would get fewer than the 39 rows faiss wants: pass fewer lists."""
    if num_vectors < 0:
        raise UserError(f"the number of vectors must be non-negative, got {num_vectors}")
    lists = default_ivf_lists(max(1, num_vectors)) if lists is None else lists
    return min(num_vectors, TRAIN_SAMPLE_MAX, max(TRAIN_POINTS_PER_LIST * lists, PQ_TRAIN_POINTS))


def train_sample(chunks: Iterable[np.ndarray | tuple[np.ndarray, np.ndarray]], num_vectors: int,
                 size: int | None = None, seed: int = 0) -> np.ndarray:
    """`size` rows (default train_sample_size(num_vectors)) drawn uniformly without replacement from
    the `num_vectors` rows that `chunks` yields in order (arrays of rows of any float dtype, e.g.
    float16 memmaps of a vector store, or (ids, rows) pairs), as one float32 array in row order.
    Only the sample is held, never a whole chunk's copy. The same seed and rows give the same sample."""
    size = train_sample_size(num_vectors) if size is None else size
    if not 0 <= size <= num_vectors:
        raise UserError(f"a training sample of {size} rows cannot be drawn from {num_vectors}")
    picks = np.sort(np.random.default_rng(seed).choice(num_vectors, size, replace=False))
    out: np.ndarray | None = None
    start = taken = 0
    for chunk in chunks:
        rows = chunk[-1] if isinstance(chunk, tuple) else chunk
        if rows.ndim != 2:
            raise UserError(f"training chunks must be n x dim arrays, got shape {rows.shape}")
        if out is None:
            out = np.empty((size, rows.shape[1]), np.float32)
        elif rows.shape[1] != out.shape[1]:
            raise UserError(f"training chunks of {out.shape[1]} and of {rows.shape[1]} dimensions")
        end = taken + int(np.searchsorted(picks[taken:], start + len(rows)))
        out[taken:end] = rows[picks[taken:end] - start]
        taken, start = end, start + len(rows)
    if start != num_vectors:
        raise UserError(f"the chunks held {start} rows, not the {num_vectors} said")
    return out if out is not None else np.empty((0, 0), np.float32)


def new_vector_index(kind: str, dim: int, train: np.ndarray | None = None, ivf_lists: int | None = None,
                     hnsw_m: int = 32, pq_bytes: int = DEFAULT_PQ_BYTES, opq: bool = False) -> faiss.Index:
    """An empty inner-product index with ids. flat: IndexIDMap2(IndexFlatIP) (exact). ivf:
    IndexIVFFlat with an IndexFlatIP quantizer, trained on `train` (required; ivf_lists defaults to
    default_ivf_lists(len(train)); k-means sees at most TRAIN_POINTS_PER_LIST of them per list).
    hnsw: IndexIDMap2(IndexHNSWFlat(dim, hnsw_m)), efConstruction HNSW_EF_CONSTRUCTION.
    ivfpq: IndexIVFPQ (IndexFlatIP quantizer, pq_bytes sub-quantizers of PQ_BITS bits: pq_bytes
    must divide dim), behind IndexPreTransform(OPQMatrix(dim, pq_bytes)) when `opq`; trained on at
    least IVFPQ_MIN_TRAIN vectors. When `train` is a sample (train_sample) pass ivf_lists =
    default_ivf_lists(all the vectors): the default counts the sample's rows."""
    if kind not in INDEX_TYPES:
        raise UserError(f"unknown vector index type {kind!r}; choose one of {', '.join(INDEX_TYPES)}")
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise UserError(f"vector dimension must be a positive integer, got {dim!r}")
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        if hnsw_m < 2:
            raise UserError(f"hnsw_m must be at least 2, got {hnsw_m}")
        graph = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return faiss.IndexIDMap2(graph)
    if kind == "ivfpq" and (not isinstance(pq_bytes, (int, np.integer)) or pq_bytes < 1 or dim % pq_bytes):
        raise UserError(f"pq_bytes (--pq-bytes) {pq_bytes!r} must divide the vector dimension {dim}: "
                        f"choose one of {', '.join(map(str, _divisors_near(dim, pq_bytes)))}")
    if train is None or len(train) == 0:
        raise UserError(f"an {kind} index needs training vectors (train=...): pass a sample of the vectors to index")
    train = _float_rows(train, dim, "training vectors")
    if kind == "ivfpq" and len(train) < IVFPQ_MIN_TRAIN:
        raise UserError(f"an ivfpq index needs at least {IVFPQ_MIN_TRAIN} training vectors (39 per centroid of "
                        f"its {2**PQ_BITS}-centroid sub-quantizers), got {len(train)}")
    lists = default_ivf_lists(len(train)) if ivf_lists is None else ivf_lists
    if not isinstance(lists, (int, np.integer)) or not 1 <= lists <= len(train):
        raise UserError(f"ivf_lists must be between 1 and the {len(train)} training vectors, got {lists}")
    if kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        ivf = index
    else:
        index = ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, lists, pq_bytes, PQ_BITS,
                                       faiss.METRIC_INNER_PRODUCT)
        if opq:  # the wrapper's constructor keeps Python references to both parts
            index = faiss.IndexPreTransform(faiss.OPQMatrix(dim, pq_bytes), ivf)
    # k-means on at most TRAIN_POINTS_PER_LIST points per list, a sample faiss draws (4,000 lists on
    # 1M x 512: bench/results.md); faiss's default, 256, takes about 4 times as long.
    # faiss asks for at least 39 per list, and at 64 the lists searched as well as the bench needs.
    ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
    index.train(train)
    return index


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add rows with their ids. The ids must be new (an IndexIDMap2 with a repeated id would map it
    to one row only), non-negative and unique."""
    vectors = _float_rows(vectors, index.d, "vectors")
    ids = _ids(ids, "ids")
    if len(ids) != len(vectors):
        raise UserError(f"{len(vectors)} vectors but {len(ids)} ids")
    if len(ids) == 0:
        return
    if (ids < 0).any():
        raise UserError(f"ids must be non-negative (-1 means 'no result'), got {ids.min()}")
    if len(np.unique(ids)) != len(ids):
        raise UserError("ids to add contain duplicates")
    present = np.isin(ids, index_ids(index), assume_unique=True)
    if present.any():
        raise UserError(f"{int(present.sum())} id(s) already in the index, e.g. {ids[present][0]}; remove them first")
    index.add_with_ids(vectors, ids)


def remove_ids(index: faiss.Index, ids: np.ndarray) -> bool:
    """Remove these ids (absent ones are ignored); False, with nothing removed, when the index type
    cannot remove (HNSW), so the caller rebuilds it from the vectors it keeps."""
    if index_kind(index) == "hnsw":
        return False
    ids = _ids(ids, "ids to remove")
    if len(ids):
        index.remove_ids(faiss.IDSelectorBatch(ids))
    return True


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids held, sorted int64."""
    if index_kind(index) in IVF_KINDS:
        lists = faiss.extract_index_ivf(index).invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(lists.nlist) if lists.list_size(i)]
        held = np.concatenate(parts) if parts else np.empty(0, np.int64)
    else:
        held = faiss.vector_to_array(index.id_map)
    return np.sort(held.astype(np.int64, copy=False))


def rerank(queries: np.ndarray, ids: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray],
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k among each query's candidates: ids (n x c int, -1 padded, e.g. an approximate
    search's) re-scored by the exact inner product with their vectors, re-sorted (ties keep the
    candidates' order), the best k kept: (scores float32 n x k, ids int64 n x k), padded with -inf / -1.
    vectors_of(ids) gets each distinct candidate id once, sorted (1-D int64), and returns their rows
    in that order (n x dim, float32 or float16), from wherever they are kept: a vector store, Milvus.
    An id repeated in a row counts once."""
    queries = np.asarray(queries)
    queries = _float_rows(queries, queries.shape[1] if queries.ndim == 2 else -1, "queries")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"k must be a positive integer, got {k!r}")
    ids = np.asarray(ids)
    if ids.ndim != 2 or len(ids) != len(queries) or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise UserError(f"candidate ids must be an integer array with a row per query ({len(queries)}), "
                        f"got {ids.dtype} of shape {ids.shape}")
    ids = ids.astype(np.int64, copy=False)
    held = ids >= 0
    if ids.shape[1] > 1:  # a repeated id keeps its first place
        order = np.argsort(ids, axis=1, kind="stable")
        ordered = np.take_along_axis(ids, order, axis=1)
        repeat = np.zeros(ids.shape, bool)
        repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        np.put_along_axis(held, order, np.take_along_axis(held, order, axis=1) & ~repeat, axis=1)
    scores = np.full(ids.shape, -np.inf, np.float32)
    distinct = np.unique(ids[held])
    if len(distinct):
        rows = np.asarray(vectors_of(distinct))
        if rows.shape != (len(distinct), queries.shape[1]) or not np.issubdtype(rows.dtype, np.floating):
            raise UserError(f"vectors_of gave {rows.dtype} rows of shape {rows.shape} for {len(distinct)} ids "
                            f"of dimension {queries.shape[1]}")
        rows = rows.astype(np.float32, copy=False)
        where = np.searchsorted(distinct, np.where(held, ids, distinct[0]))
        # In blocks of queries, so that the gathered candidate rows stay under about 64 MiB.
        step = max(1, 2**24 // max(1, ids.shape[1] * queries.shape[1]))
        for start in range(0, len(ids), step):
            block = slice(start, start + step)
            gathered = rows[where[block]]  # queries x candidates x dim
            scores[block] = np.matmul(gathered, queries[block, :, None])[..., 0]
        scores[~held] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return first_k(np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1),
                    np.take_along_axis(held, order, axis=1), k)


_rerank = rerank  # search()'s parameter of that name hides it there


def search(index: faiss.Index, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None,
           nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None,
           vectors_of: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: (scores float32 n x k, ids int64 n x k), best first, padded with
    -inf / -1 when the index holds fewer than k allowed vectors. exclude[i]: ids query i must never
    get (None: nothing; pass the same array object for queries that share a set: it is read once). Queries with
    identical sets are searched together; sets of at most OVERFETCH_MAX[kind] ids by over-fetching
    k + len(set) and filtering, bigger ones with a faiss IDSelectorNot(IDSelectorBatch) so the
    search skips them. An approximate search that comes back short (its lists / walk held too few
    allowed vectors) is redone wider, see _complete.

    nprobe (ivf): lists scanned; default max(8, nlist/64), at most nlist. ef_search (hnsw): width
    of the graph walk; default 128. Both widen with the exclusions (_widened). The defaults are
    wider than the fastest settings reaching recall@10 0.95 on bench/search_speed.py's 1M x 512
    vectors (nprobe 4 of 4,000 lists; efSearch 32 at M 32) because excluding each query's own
    neighbourhood (its own slide's patches, when a slide's patches cluster) needs it: there,
    nprobe 4 kept recall@10 0.38 and the default (63) 0.99; hnsw's default 0.99 (timings:
    bench/results.md). Check real embeddings against flat before narrowing them.

    rerank (None or 0: off): fetch the best max(k, rerank) allowed candidates this way, then keep
    the k best by their exact inner products with vectors_of(ids) (see rerank()): ivfpq's scores
    are approximate, and so is its candidates' order.
    """
    if rerank:
        if not isinstance(rerank, (int, np.integer)) or rerank < 0:
            raise UserError(f"rerank must be a non-negative integer, got {rerank!r}")
        if vectors_of is None:
            raise UserError("rerank needs vectors_of, the function that reads the candidates' stored vectors")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"k must be a positive integer, got {k!r}")
        candidates = search(index, queries, max(k, rerank), exclude, nprobe, ef_search)[1]
        return _rerank(queries, candidates, vectors_of, k)
    kind = index_kind(index)
    queries = _float_rows(queries, index.d, "queries")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"k must be a positive integer, got {k!r}")
    n = len(queries)
    if exclude is not None and len(exclude) != n:
        raise UserError(f"{n} queries but {len(exclude)} exclusion sets")
    scores = np.full((n, k), -np.inf, np.float32)
    ids = np.full((n, k), -1, np.int64)
    if n == 0 or index.ntotal == 0:
        return scores, ids
    nprobe, ef_search = _search_widths(index, kind, nprobe, ef_search)

    # Group the queries by exclusion set: None or empty sets together, identical sets together (an
    # array object passed for many queries is read once).
    groups: dict[bytes, tuple[np.ndarray, list[int]]] = {}
    none = np.empty(0, np.int64)
    seen: dict[int, tuple[object, np.ndarray, bytes]] = {}  # holds the object, so its id stays its own
    for i in range(n):
        given = None if exclude is None else exclude[i]
        if given is None:
            banned, key = none, b""
        elif id(given) in seen:
            _, banned, key = seen[id(given)]
        else:
            banned = np.unique(_ids(given, f"exclude[{i}]"))
            key = banned.tobytes()
            seen[id(given)] = given, banned, key
        groups.setdefault(key, (banned, []))[1].append(i)
    # Over-fetch in one batch per power-of-two size class of the sets, so that one big set does not
    # make every query fetch as many.
    batches: dict[int, list[tuple[np.ndarray, list[int]]]] = {}
    for banned, rows in groups.values():
        if len(banned) <= OVERFETCH_MAX[kind]:
            extra = 0 if len(banned) == 0 else 1 << (len(banned) - 1).bit_length()
            batches.setdefault(extra, []).append((banned, rows))
            continue
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(banned))  # IDSelectorNot keeps the batch alive
        params = _params(kind, *_widened(index, kind, k, len(banned), nprobe, ef_search), selector, index)
        found = index.search(queries[rows], k, params=params)
        scores[rows], ids[rows] = first_k(*found, np.ones(found[1].shape, bool), k)
    for extra, members in batches.items():
        rows = [row for _, group_rows in members for row in group_rows]
        fetch = min(k + extra, index.ntotal)
        params = _params(kind, *_widened(index, kind, k, extra, nprobe, ef_search), None, index)
        found_scores, found_ids = index.search(queries[rows], fetch, params=params)
        keep = np.ones(found_ids.shape, bool)
        start = 0
        for banned, group_rows in members:
            block = slice(start, start + len(group_rows))
            if len(banned):
                keep[block] = ~np.isin(found_ids[block], banned)
            start += len(group_rows)
        scores[rows], ids[rows] = first_k(found_scores, found_ids, keep, k)
    if kind != "flat":  # flat is exact: a short row there means too few allowed vectors
        for banned, rows in groups.values():
            short = np.asarray(rows)[ids[rows, -1] < 0]
            if len(short):
                scores[short], ids[short] = _complete(index, kind, queries[short], k, banned, nprobe, ef_search,
                                                      scores[short], ids[short])
    return scores, ids


def _complete(index: faiss.Index, kind: str, queries: np.ndarray, k: int, banned: np.ndarray, nprobe: int,
              ef_search: int, scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Search again, wider, for queries whose approximate search came back with fewer than k ids
    (the probed lists or the graph walk held too few allowed vectors, e.g. when the exclusions
    cover the query's neighbourhood), so that a short row means the index holds too few: nprobe
    doubles up to every list (exact), ef_search up to HNSW_MAX_EF_SEARCH, then HNSW's stored
    vectors are searched exactly."""
    allowed = index.ntotal - int(np.isin(banned, index_ids(index), assume_unique=True).sum())
    want = min(k, allowed)
    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(banned)) if len(banned) else None
    todo = np.flatnonzero((ids >= 0).sum(axis=1) < want)
    nprobe, ef_search = _widened(index, kind, k, len(banned), nprobe, ef_search)
    width, limit = (nprobe, ivf_list_count(index)) if kind in IVF_KINDS else (ef_search, HNSW_MAX_EF_SEARCH)
    while len(todo) and width < limit:
        width = min(2 * width, limit)
        found = index.search(queries[todo], k, params=_params(kind, width, width, selector, index))
        found_scores, found_ids = first_k(*found, np.ones(found[1].shape, bool), k)
        done = (found_ids >= 0).sum(axis=1) >= want
        scores[todo], ids[todo] = found_scores, found_ids  # the widest try so far, even if short
        todo = todo[~done]
    if len(todo) and kind == "hnsw":
        # Exact search of the graph's storage (internal row numbers), the selector seeing our ids.
        storage = faiss.downcast_index(faiss.downcast_index(index.index).storage)
        translated = faiss.IDSelectorTranslated(index.id_map, selector) if selector is not None else None
        params = faiss.SearchParameters()
        if translated is not None:
            params.sel = translated
        found_scores, rows = storage.search(queries[todo], k, params=params)
        id_map = faiss.vector_to_array(index.id_map)
        found_ids = np.where(rows >= 0, id_map[np.maximum(rows, 0)], -1)
        scores[todo], ids[todo] = first_k(found_scores, found_ids, np.ones(rows.shape, bool), k)
    return scores, ids


def save_vector_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write the index atomically: a temp file beside `path`, then a rename (histo_retrieval.files)."""
    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))


def load_vector_index(path: str | os.PathLike) -> faiss.Index:
    """Read an index written by save_vector_index."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such vector index file")
    try:
        index = faiss.read_index(path)
    except RuntimeError as err:  # faiss's message: "Error in <function> at <file>:<line>: <reason>"
        reason = re.sub(r"^Error in .*? at \S+:\d+: ", "", one_line(err))
        raise UserError(f"{path}: not a faiss index ({reason[:100]})") from None
    index_kind(index)  # refuses index types this module did not write
    return index


# ----------------------------------------------------------------------------- helpers
def index_kind(index: faiss.Index) -> str:
    """Which of INDEX_TYPES `index` is."""
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    # An OPQ rotation in front of IVF-PQ. faiss reads a saved OPQMatrix back as its base class,
    # LinearTransform (a square rotation here).
    if isinstance(index, faiss.IndexPreTransform) and index.chain.size() == 1 \
            and isinstance(faiss.downcast_index(index.index), faiss.IndexIVFPQ):
        rotation = faiss.downcast_VectorTransform(index.chain.at(0))
        if isinstance(rotation, faiss.LinearTransform) and rotation.d_in == rotation.d_out == index.d:
            return "ivfpq"
    if isinstance(index, faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSW):
            return "hnsw"
        if isinstance(inner, faiss.IndexFlat):
            return "flat"
    raise UserError(f"unsupported faiss index {type(index).__name__}: expected one made by new_vector_index")


def uses_opq(index: faiss.Index) -> bool:
    """Whether an ivfpq index rotates its vectors with OPQ first (new_vector_index(opq=True))."""
    return index_kind(index) == "ivfpq" and isinstance(index, faiss.IndexPreTransform)


def ivf_list_count(index: faiss.Index) -> int:
    """The lists of an ivf or ivfpq index (through an OPQ transform)."""
    return faiss.extract_index_ivf(index).nlist


def _divisors_near(dim: int, wanted: object) -> list[int]:
    """Up to four divisors of dim near `wanted` (for the pq_bytes message)."""
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    target = wanted if isinstance(wanted, (int, np.integer)) and wanted > 0 else DEFAULT_PQ_BYTES
    return sorted(sorted(divisors, key=lambda d: (abs(math.log(d / target)), d))[:4])


def _float_rows(array: np.ndarray, dim: int, what: str) -> np.ndarray:
    """`array` as a C-contiguous float32 n x dim matrix (faiss reads raw memory), or a UserError."""
    array = np.asarray(array)
    if array.dtype != np.float32:
        raise UserError(f"{what} must be float32, got {array.dtype}")
    if array.ndim != 2 or array.shape[1] != dim:
        raise UserError(f"{what} must be n x {dim} (the index's dimension), got shape {array.shape}")
    return np.ascontiguousarray(array)


def _ids(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.size == 0:
        return np.empty(0, np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{what} must be a 1-D array of integers, got {array.dtype} of shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _search_widths(index: faiss.Index, kind: str, nprobe: int | None, ef_search: int | None) -> tuple[int, int]:
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if kind in IVF_KINDS:
        nlist = ivf_list_count(index)
        if nprobe is None:
            nprobe = max(DEFAULT_MIN_NPROBE, math.ceil(nlist * DEFAULT_NPROBE_FRACTION))
        nprobe = min(nprobe, nlist)
    return nprobe or 1, ef_search or DEFAULT_EF_SEARCH


def _widened(index: faiss.Index, kind: str, k: int, excluded: int, nprobe: int, ef_search: int) -> tuple[int, int]:
    """The widths for a query with `excluded` ids excluded. Excluded vectors near a query (its own
    slide's, say) take the places of the ones it should get, so the search must look further: an
    HNSW walk 2 (k + excluded) wide, at most HNSW_MAX_EF_SEARCH (bench/search_speed.py, each query
    excluding the ~500 vectors of its own component: recall@10 0.07 at efSearch 16 on 50k vectors;
    on 1M, 0.90 at k + excluded, 0.99 at twice that), and as many more IVF lists as the excluded
    vectors would fill. IVF needs more than that when the exclusions hold the neighbourhood (1M,
    same case: nprobe 4 of 4000 lists, recall 0.38; 64, 0.99): the default nprobe is chosen for it."""
    if kind in IVF_KINDS and excluded:
        nlist = ivf_list_count(index)
        nprobe = min(nlist, nprobe + round(excluded * nlist / max(1, index.ntotal)))
    if kind == "hnsw" and excluded:
        ef_search = max(ef_search, min(2 * (k + excluded), HNSW_MAX_EF_SEARCH))
    return nprobe, ef_search


def _params(kind: str, nprobe: int, ef_search: int, selector: faiss.IDSelector | None,
            index: faiss.Index | None = None) -> faiss.SearchParameters:
    """Search parameters for `kind`; for an OPQ-wrapped index (IndexPreTransform), the IVF's own
    parameters (nprobe, selector) wrapped in SearchParametersPreTransform, which passes them on."""
    if kind in IVF_KINDS:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
    elif kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=ef_search)
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector  # a plain pointer: the caller keeps `selector` alive during the search
    if isinstance(index, faiss.IndexPreTransform):
        inner, params = params, faiss.SearchParametersPreTransform()
        params.index_params = inner  # also a plain pointer (older faiss keeps no reference): kept below
        params.referenced_objects = [inner]
    return params


def first_k(scores: np.ndarray, ids: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first k entries that are kept and real (id >= 0), padded with -inf / -1."""
    keep = keep & (ids >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    held = np.take_along_axis(keep, order, axis=1)
    scores[~held], ids[~held] = -np.inf, -1
    if scores.shape[1] < k:  # the index holds fewer than k vectors
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, ids
