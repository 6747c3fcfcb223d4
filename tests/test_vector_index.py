"""histo_retrieval.search.vector_index: search against a naive numpy top-k, exclusions, removal, ids, save/load,
IVF-PQ (with and without OPQ) and exact re-ranking, training samples, errors."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from histo_retrieval.search import vector_index as vi
from histo_retrieval.errors import UserError

DIM = 32


def unit_rows(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def naive_top_k(queries, vectors, ids, k, exclude=None):
    """Exact top-k by inner product with numpy: argsort of all scores, excluded ones dropped."""
    all_scores = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    found = np.full((len(queries), k), -1, np.int64)
    for i, row in enumerate(all_scores):
        order = np.argsort(-row, kind="stable")
        if exclude is not None:
            order = order[~np.isin(ids[order], exclude[i])]
        order = order[:k]
        scores[i, :len(order)], found[i, :len(order)] = row[order], ids[order]
    return scores, found


def assert_exact(result, expected):
    np.testing.assert_array_equal(result[1], expected[1])
    np.testing.assert_allclose(result[0], expected[0], atol=1e-5, rtol=0)
    assert result[0].dtype == np.float32 and result[1].dtype == np.int64


@pytest.fixture(scope="module")
def data():
    vectors = unit_rows(3000, seed=0)
    ids = np.random.default_rng(1).permutation(10**6)[:3000].astype(np.int64)  # unordered, sparse ids
    return vectors, ids, unit_rows(40, seed=2)


def clustered(n, seed, centres=30, noise=0.15, dim=DIM):
    """Unit rows around the same few centres whatever the seed, as embeddings are (uniform noise has
    no neighbourhood structure)."""
    rng = np.random.default_rng(seed)
    x = unit_rows(centres, 7, dim)[rng.integers(0, centres, n)]
    x = x + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


PQ_BYTES = 8  # DIM / 8 = 4 dimensions per sub-quantizer


@pytest.fixture(scope="module")
def pq_trained():
    """Empty IVF-PQ indexes trained once (PQ training takes seconds): plain, and with OPQ (its
    rotation trained with few iterations: the tests check how the index is used, not OPQ's quality)."""
    train = clustered(vi.IVFPQ_MIN_TRAIN, seed=20)
    plain = vi.new_vector_index("ivfpq", DIM, train, pq_bytes=PQ_BYTES)
    real = faiss.OPQMatrix

    def quick_opq(dim, m):
        opq = real(dim, m)
        opq.niter, opq.niter_pq_0 = 2, 4
        return opq
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(faiss, "OPQMatrix", quick_opq)
        rotated = vi.new_vector_index("ivfpq", DIM, train, pq_bytes=PQ_BYTES, opq=True)
    return {False: plain, True: rotated}


def new_index(kind, vectors, pq=None, opq=False, **kwargs):
    """An empty index of `kind` for rows like `vectors` (ivf trains on them); ivfpq ones are copies
    of pq_trained's (trained on other rows of the same dimension)."""
    if kind == "ivfpq":
        return faiss.clone_index(pq[opq])
    return vi.new_vector_index(kind, vectors.shape[1], train=vectors if kind == "ivf" else None, **kwargs)


def build(kind, vectors, ids, pq=None, opq=False, **kwargs):
    index = new_index(kind, vectors, pq, opq, **kwargs)
    vi.add_vectors(index, vectors, ids)
    return index


@pytest.fixture(params=["overfetch", "selector"])
def exclusion_path(request, monkeypatch):
    """Run a test with every exclusion set handled by over-fetching, then by an IDSelector."""
    limit = 10**9 if request.param == "overfetch" else 0
    monkeypatch.setattr(vi, "OVERFETCH_MAX", dict.fromkeys(vi.INDEX_TYPES, limit))
    return request.param


def few_ids_per_query(ids, n, seed=3):
    """A different small exclusion set per query (some empty, some with ids not in the index)."""
    rng = np.random.default_rng(seed)
    sets = [rng.choice(ids, size=rng.integers(0, 6), replace=False) for _ in range(n)]
    sets[0] = np.array([], np.int64)
    sets[1] = np.array([-5, 2 * 10**6])
    return sets


def test_flat_equals_exact_without_exclusions(data):
    vectors, ids, queries = data
    assert_exact(vi.search(build("flat", vectors, ids), queries, 10), naive_top_k(queries, vectors, ids, 10))


def test_flat_equals_exact_with_few_ids_per_query(data, exclusion_path):
    vectors, ids, queries = data
    index = build("flat", vectors, ids)
    # Exclude each query's own true top matches, so that the exclusions matter.
    top = naive_top_k(queries, vectors, ids, 3)[1]
    exclude = [np.concatenate([top[i, :i % 4], extra]) for i, extra in enumerate(few_ids_per_query(ids, len(queries)))]
    assert_exact(vi.search(index, queries, 10, exclude), naive_top_k(queries, vectors, ids, 10, exclude))


def test_exclusions_as_rows_of_an_array_or_none(data):
    """Rows of a 2-D array are new view objects each time (their ids get reused): never mixed up."""
    vectors, ids, queries = data
    index = build("flat", vectors, ids)
    table = naive_top_k(queries, vectors, ids, 4)[1]  # each query's own 4 nearest
    assert_exact(vi.search(index, queries, 10, table), naive_top_k(queries, vectors, ids, 10, table))
    mixed = [None if i % 2 else table[i] for i in range(len(queries))]
    expected = naive_top_k(queries, vectors, ids, 10, [np.array([], np.int64) if e is None else e for e in mixed])
    assert_exact(vi.search(index, queries, 10, mixed), expected)


def test_flat_equals_exact_with_a_big_shared_set(data, exclusion_path):
    vectors, ids, queries = data
    index = build("flat", vectors, ids)
    slide_a, slide_b = ids[:1200], ids[1200:2000]  # two "own slides" shared by many queries
    exclude = [slide_a if i % 3 == 0 else slide_b if i % 3 == 1 else ids[2990:2993] for i in range(len(queries))]
    assert_exact(vi.search(index, queries, 10, exclude), naive_top_k(queries, vectors, ids, 10, exclude))


def test_default_paths_with_a_set_above_the_flat_overfetch_limit():
    vectors = unit_rows(vi.OVERFETCH_MAX["flat"] + 500, seed=4, dim=8)
    ids = np.arange(len(vectors), dtype=np.int64)
    queries = unit_rows(6, seed=5, dim=8)
    exclude = [ids[:vi.OVERFETCH_MAX["flat"] + 1]] * 3 + [ids[:2]] * 3
    index = build("flat", vectors, ids)
    assert_exact(vi.search(index, queries, 7, exclude), naive_top_k(queries, vectors, ids, 7, exclude))


def test_ivf_with_every_list_probed_equals_exact(data, exclusion_path):
    vectors, ids, queries = data
    index = build("ivf", vectors, ids)
    assert index.nlist == vi.default_ivf_lists(len(vectors)) == 3000 // 39
    exclude = few_ids_per_query(ids, len(queries))
    exclude[5] = ids[:1500]
    assert_exact(vi.search(index, queries, 10, exclude, nprobe=index.nlist),
                 naive_top_k(queries, vectors, ids, 10, exclude))


def test_hnsw_with_a_wide_walk_on_small_data_equals_exact(data, exclusion_path):
    vectors, ids, queries = data
    vectors, ids = vectors[:1000], ids[:1000]
    index = build("hnsw", vectors, ids, hnsw_m=16)
    exclude = few_ids_per_query(ids, len(queries))
    exclude[7] = ids[:400]
    assert_exact(vi.search(index, queries, 10, exclude, ef_search=1000),
                 naive_top_k(queries, vectors, ids, 10, exclude))


def test_approximate_defaults_find_most_neighbours():
    # Clustered data, as embeddings are (uniform noise has no neighbourhood structure).
    rng = np.random.default_rng(6)
    centres = unit_rows(30, seed=7)
    vectors = centres[rng.integers(0, 30, 3000)] + 0.15 * rng.standard_normal((3000, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:50] + 0.05 * rng.standard_normal((50, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = np.arange(3000, dtype=np.int64)
    expected = naive_top_k(queries, vectors, ids, 10)[1]
    for kind in ("ivf", "hnsw"):
        found = vi.search(build(kind, vectors, ids), queries, 10)[1]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, expected)])
        assert recall >= 0.9, (kind, recall)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_rows_are_complete_when_exclusions_cover_the_neighbourhood(data, kind, monkeypatch):
    """A narrow approximate search whose neighbourhood is excluded comes back short; search()
    widens it (nprobe up to every list; ef_search, then an exact scan of HNSW's vectors)."""
    vectors, ids, queries = data
    index = build(kind, vectors, ids)
    exclude = list(naive_top_k(queries, vectors, ids, 2500)[1])  # each query's 2500 nearest of 3000
    width = {"nprobe": 1} if kind == "ivf" else {"ef_search": 16}
    short = 0
    for query, banned in zip(queries, exclude):  # what faiss alone returns
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(banned))
        short += (index.search(query[None], 10, params=vi._params(kind, 1, 16, selector))[1] < 0).any()
    assert short >= 5
    exact_scans = []
    if kind == "hnsw":  # no widening: every short row goes to the exact scan
        monkeypatch.setattr(vi, "HNSW_MAX_EF_SEARCH", 16)
        translated = faiss.IDSelectorTranslated
        monkeypatch.setattr(faiss, "IDSelectorTranslated", lambda *a: exact_scans.append(1) or translated(*a))
    scores, found = vi.search(index, queries, 10, exclude, **width)
    assert (found >= 0).all() and np.isfinite(scores).all()
    assert not any(np.isin(row, banned).any() for row, banned in zip(found, exclude))
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    assert bool(exact_scans) == (kind == "hnsw")


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_removed_ids_are_never_returned(data, kind):
    vectors, ids, queries = data
    index = build(kind, vectors, ids)
    nprobe = index.nlist if kind == "ivf" else None
    before = vi.search(index, queries, 10, nprobe=nprobe)[1]
    gone = np.unique(np.concatenate([before[:, :3].ravel(), ids[:500]]))
    assert vi.remove_ids(index, gone)
    assert index.ntotal == len(vectors) - len(gone)
    keep = ~np.isin(ids, gone)
    result = vi.search(index, queries, 10, nprobe=nprobe)
    assert not np.isin(result[1], gone).any()
    assert_exact(result, naive_top_k(queries, vectors[keep], ids[keep], 10))
    np.testing.assert_array_equal(vi.index_ids(index), np.sort(ids[keep]))
    assert vi.remove_ids(index, np.array([], np.int64)) and vi.remove_ids(index, gone)  # nothing left to remove


def test_hnsw_cannot_remove(data):
    vectors, ids, _ = data
    index = build("hnsw", vectors[:200], ids[:200])
    assert vi.remove_ids(index, ids[:5]) is False
    assert index.ntotal == 200
    np.testing.assert_array_equal(vi.index_ids(index), np.sort(ids[:200]))


@pytest.mark.parametrize("kind", vi.INDEX_TYPES)
def test_index_ids_after_adds(data, kind, pq_trained):
    vectors, ids, _ = data
    index = new_index(kind, vectors, pq_trained)
    assert vi.index_ids(index).dtype == np.int64 and len(vi.index_ids(index)) == 0
    vi.add_vectors(index, vectors[:1000], ids[:1000])
    vi.add_vectors(index, vectors[1000:1500], ids[1000:1500].astype(np.int32))  # any integer dtype
    np.testing.assert_array_equal(vi.index_ids(index), np.sort(ids[:1500]))
    vi.add_vectors(index, np.empty((0, DIM), np.float32), np.empty(0, np.int64))
    assert index.ntotal == 1500


@pytest.mark.parametrize("kind", vi.INDEX_TYPES)
def test_save_and_load_give_identical_results(data, kind, tmp_path, pq_trained):
    vectors, ids, queries = data
    index = build(kind, vectors, ids, pq_trained)
    exclude = [ids[:700]] * 20 + few_ids_per_query(ids, 20)
    path = tmp_path / "sub" / "vectors.faiss"
    vi.save_vector_index(index, path)
    assert [p.name for p in path.parent.iterdir()] == ["vectors.faiss"]  # no temp file left
    loaded = vi.load_vector_index(path)
    assert type(loaded) is type(index) and loaded.ntotal == index.ntotal
    for got, want in zip(vi.search(loaded, queries, 10, exclude), vi.search(index, queries, 10, exclude)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(vi.index_ids(loaded), vi.index_ids(index))
    vi.save_vector_index(loaded, path)  # overwrites in place
    assert [p.name for p in path.parent.iterdir()] == ["vectors.faiss"]


@pytest.mark.parametrize("kind", vi.INDEX_TYPES)
def test_padding_when_k_exceeds_the_allowed_vectors(data, kind, exclusion_path, pq_trained):
    vectors, ids, queries = data
    index = new_index(kind, vectors, pq_trained, ivf_lists=4)
    vi.add_vectors(index, vectors[:5], ids[:5])
    nprobe = 4 if kind == "ivf" else None  # ivfpq: its default, 8 of 256 lists, then widened to find all 5
    scores, found = vi.search(index, queries[:3], 8, [ids[:2], np.array([], np.int64), ids[:5]], nprobe=nprobe)
    assert ((found >= 0).sum(axis=1) == [3, 5, 0]).all()
    assert (found[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    assert np.isneginf(scores[2]).all() and (found[2] == -1).all()
    assert set(found[0, :3]) == set(ids[2:5])
    empty = new_index(kind, vectors, pq_trained, ivf_lists=4)
    scores, found = vi.search(empty, queries[:2], 3)
    assert scores.shape == (2, 3) and (found == -1).all() and np.isneginf(scores).all()


def test_ivf_default_lists():
    assert vi.default_ivf_lists(1) == 1
    assert vi.default_ivf_lists(390) == 10  # 39 points per list is the cap
    assert vi.default_ivf_lists(10**6) == 4000
    assert vi.default_ivf_lists(100_000) == round(4 * 100_000 ** 0.5)


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < 200
    return message


def test_errors_say_what_is_wrong(data, tmp_path):
    vectors, ids, queries = data
    assert "unknown vector index type 'pq'" in one_line_error(vi.new_vector_index, "pq", DIM)
    assert "flat, ivf, hnsw" in one_line_error(vi.new_vector_index, "pq", DIM)
    assert "needs training vectors" in one_line_error(vi.new_vector_index, "ivf", DIM)
    assert "n x 32" in one_line_error(vi.new_vector_index, "ivf", DIM, train=unit_rows(100, 0, dim=16))
    assert "between 1 and the 100" in one_line_error(vi.new_vector_index, "ivf", DIM, train=vectors[:100],
                                                      ivf_lists=101)
    index = build("flat", vectors[:10], ids[:10])
    assert "got shape (3, 16)" in one_line_error(vi.add_vectors, index, unit_rows(3, 0, dim=16), ids[20:23])
    assert "float32, got float64" in one_line_error(vi.add_vectors, index, vectors[:3].astype(np.float64), ids[20:23])
    assert "3 vectors but 2 ids" in one_line_error(vi.add_vectors, index, vectors[:3], ids[20:22])
    assert "duplicates" in one_line_error(vi.add_vectors, index, vectors[:2], np.array([7, 7]))
    assert "already in the index" in one_line_error(vi.add_vectors, index, vectors[:2], ids[9:11])
    assert "non-negative" in one_line_error(vi.add_vectors, index, vectors[:1], np.array([-1]))
    assert "integers" in one_line_error(vi.add_vectors, index, vectors[:1], np.array([1.5]))
    assert index.ntotal == 10  # nothing was added by the failed calls
    assert "queries must be n x 32" in one_line_error(vi.search, index, unit_rows(2, 0, dim=8), 3)
    assert "2 queries but 1 exclusion sets" in one_line_error(vi.search, index, queries[:2], 3, [ids[:1]])
    assert "k must be a positive integer" in one_line_error(vi.search, index, queries[:2], 0)
    assert "nprobe must be a positive integer" in one_line_error(vi.search, index, queries[:2], 3, nprobe=0)
    assert "no such vector index file" in one_line_error(vi.load_vector_index, tmp_path / "missing.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    assert "not a faiss index" in one_line_error(vi.load_vector_index, tmp_path / "junk.faiss")


# ----------------------------------------------------------------------------- IVF-PQ and re-ranking
@pytest.fixture(scope="module")
def pq_data():
    """12,000 clustered rows with sparse ids, queries near some of them, and a vectors_of that counts its calls."""
    vectors = clustered(12_000, seed=30)
    ids = np.random.default_rng(31).permutation(10**6)[:12_000].astype(np.int64) * 2 + 1
    noise = 0.02 * np.random.default_rng(32).standard_normal((40, DIM)).astype(np.float32)
    queries = vectors[:40] + noise  # near copies of indexed rows: each should find its original first
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return vectors, ids, queries


def lookup(vectors, ids, dtype=np.float32):
    """vectors_of for rows kept outside the index: checks it is given distinct sorted ids, records the calls."""
    order = np.argsort(ids)
    sorted_ids, rows = ids[order], vectors[order].astype(dtype)

    def vectors_of(wanted):
        assert wanted.dtype == np.int64 and wanted.ndim == 1 and (np.diff(wanted) > 0).all()
        vectors_of.calls.append(len(wanted))
        return rows[np.searchsorted(sorted_ids, wanted)]
    vectors_of.calls = []
    return vectors_of


def recall_at(found, expected):
    return np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum()) for a, b in zip(found, expected)])


@pytest.mark.parametrize("opq", [False, True], ids=["pq", "opq"])
def test_ivfpq_with_rerank_finds_the_exact_neighbours(pq_data, pq_trained, opq):
    vectors, ids, queries = pq_data
    index = build("ivfpq", vectors, ids, pq_trained, opq)
    assert vi.index_kind(index) == "ivfpq" and vi.uses_opq(index) == opq
    assert index.ntotal == len(vectors) and faiss.extract_index_ivf(index).code_size == PQ_BYTES
    expected = naive_top_k(queries, vectors, ids, 10)
    vectors_of = lookup(vectors, ids)
    approximate = vi.search(index, queries, 10, nprobe=32)
    scores, found = vi.search(index, queries, 10, nprobe=32, rerank=100, vectors_of=vectors_of)
    assert len(vectors_of.calls) == 1 and vectors_of.calls[0] <= 40 * 100  # one read, each candidate once
    assert recall_at(found, expected[1]) >= 0.95 > recall_at(approximate[1], expected[1])
    assert (found[:, 0] == ids[:40]).all()  # each near copy finds its original first
    # The re-ranked scores are the exact inner products, best first.
    rows = {i: v for i, v in zip(ids, vectors)}
    exact = np.array([[queries[q] @ rows[i] for i in row] for q, row in enumerate(found)])
    np.testing.assert_allclose(scores, exact, atol=1e-5, rtol=0)
    assert (np.diff(scores, axis=1) <= 0).all()
    # With every list probed and every vector a candidate, re-ranking is exact search.
    assert_exact(vi.search(index, queries, 10, nprobe=vi.ivf_list_count(index), rerank=len(vectors), vectors_of=vectors_of),
                 expected)


@pytest.mark.parametrize("opq", [False, True], ids=["pq", "opq"])
def test_ivfpq_exclusions_removal_and_reload(pq_data, pq_trained, opq, exclusion_path, tmp_path):
    """Exclusion sets (per query and shared, both search paths, the OPQ wrapper's parameters
    included), remove_ids and a save/load round trip, against naive numpy: with every list probed
    and every allowed vector re-ranked, the results are exact."""
    vectors, ids, queries = pq_data
    index = build("ivfpq", vectors, ids, pq_trained, opq)
    vectors_of = lookup(vectors, ids)
    own = naive_top_k(queries, vectors, ids, 3)[1]  # each query's original and its next two
    exclude = [np.concatenate([own[i, :1 + i % 3], extra]) for i, extra in enumerate(few_ids_per_query(ids, 40))]
    exclude[5:15] = [ids[:3000]] * 10
    exact = {"nprobe": vi.ivf_list_count(index), "rerank": len(vectors), "vectors_of": vectors_of}
    assert_exact(vi.search(index, queries, 10, exclude, **exact), naive_top_k(queries, vectors, ids, 10, exclude))
    # The approximate search honours them as well.
    for found, banned in zip(vi.search(index, queries, 10, exclude)[1], exclude):
        assert (found >= 0).all() and not np.isin(found, banned).any()

    gone = np.unique(np.concatenate([own[:, 0], ids[:2000]]))
    assert vi.remove_ids(index, gone)
    keep = ~np.isin(ids, gone)
    assert index.ntotal == keep.sum()
    np.testing.assert_array_equal(vi.index_ids(index), np.sort(ids[keep]))
    after = vi.search(index, queries, 10, exclude, **exact)
    assert_exact(after, naive_top_k(queries, vectors[keep], ids[keep], 10, exclude))
    assert not np.isin(vi.search(index, queries, 10)[1], gone).any()

    path = tmp_path / "vectors.faiss"
    vi.save_vector_index(index, path)
    loaded = vi.load_vector_index(path)
    assert vi.index_kind(loaded) == "ivfpq" and vi.uses_opq(loaded) == opq and loaded.ntotal == index.ntotal
    for got, want in zip(vi.search(loaded, queries, 10, exclude), vi.search(index, queries, 10, exclude)):
        np.testing.assert_array_equal(got, want)
    assert_exact(vi.search(loaded, queries, 10, exclude, **exact), after)


def test_rerank_against_naive_numpy(pq_data):
    vectors, ids, queries = pq_data
    rng = np.random.default_rng(40)
    candidates = np.stack([rng.choice(ids[:500], 30, replace=False) for _ in queries])
    candidates[:, 25:] = -1  # padding
    candidates[3, 1] = candidates[3, 0]  # a repeated id counts once
    candidates[4, :] = -1  # no candidate at all
    vectors_of = lookup(vectors, ids, np.float16)  # a float16 store
    scores, found = vi.rerank(queries, candidates, vectors_of, 10)
    assert vectors_of.calls == [len(np.unique(candidates[candidates >= 0]))]
    stored = vectors.astype(np.float16).astype(np.float32)
    for q in range(len(queries)):
        allowed = np.unique(candidates[q][candidates[q] >= 0])
        want = naive_top_k(queries[q:q + 1], stored[np.isin(ids, allowed)], ids[np.isin(ids, allowed)], 10)
        np.testing.assert_array_equal(found[q], want[1][0])
        np.testing.assert_allclose(scores[q], want[0][0], atol=1e-5, rtol=0)
    assert (found[4] == -1).all() and np.isneginf(scores[4]).all()
    # Fewer candidates than k: padded.
    scores, found = vi.rerank(queries[:2], candidates[:2, :3], vectors_of, 5)
    assert found.shape == (2, 5) and (found[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert set(found[0, :3]) == set(candidates[0, :3])


def test_rerank_of_an_exact_search_changes_nothing(data):
    vectors, ids, queries = data
    index = build("flat", vectors, ids)
    exclude = few_ids_per_query(ids, len(queries))
    assert_exact(vi.search(index, queries, 10, exclude, rerank=50, vectors_of=lookup(vectors, ids)),
                 naive_top_k(queries, vectors, ids, 10, exclude))
    assert_exact(vi.search(index, queries, 10, rerank=0, vectors_of=None), naive_top_k(queries, vectors, ids, 10))


def test_training_sample_size_and_minimum():
    assert vi.IVFPQ_MIN_TRAIN == 39 * 256
    assert not vi.can_train("ivfpq", vi.IVFPQ_MIN_TRAIN - 1) and vi.can_train("ivfpq", vi.IVFPQ_MIN_TRAIN)
    assert vi.min_train_vectors("ivfpq") == vi.IVFPQ_MIN_TRAIN and vi.min_train_vectors("flat") == 0
    assert vi.can_train("flat", 0) and vi.can_train("hnsw", 0) and not vi.can_train("ivf", 0)
    assert vi.can_train("ivf", 1) and not vi.can_train("ivf", 99, ivf_lists=100)
    assert vi.train_sample_size(5000) == 5000  # fewer than the PQ's 65,536: all of them
    assert vi.train_sample_size(100_000) == 1265 * 64  # 1,265 lists x 64 rows > the PQ's 65,536
    assert vi.train_sample_size(20_000, lists=100) == 20_000
    assert vi.train_sample_size(1_000_000) == 4000 * vi.TRAIN_POINTS_PER_LIST
    assert vi.train_sample_size(10**6, lists=100) == vi.PQ_TRAIN_POINTS
    assert vi.train_sample_size(10**8) == vi.TRAIN_SAMPLE_MAX  # 40,000 lists: 50 rows each


def test_train_sample_reads_chunks_in_order():
    rows = np.zeros((50_000, 4), np.float16)  # a float16 store; its first two values tell a row's position
    rows[:, 0] = np.arange(50_000) % 2048
    rows[:, 1] = np.arange(50_000) // 2048
    position = lambda sample: (sample[:, 1] * 2048 + sample[:, 0]).astype(np.int64)
    chunks = [rows[i:i + 7_000] for i in range(0, len(rows), 7_000)]
    sample = vi.train_sample(chunks, len(rows), 3_000, seed=3)
    assert sample.dtype == np.float32 and sample.shape == (3_000, 4)
    picked = position(sample)
    assert (np.diff(picked) > 0).all()  # distinct rows, in row order
    np.testing.assert_array_equal(sample, rows[picked].astype(np.float32))
    assert picked.min() < 5_000 and picked.max() > 45_000  # drawn from all of them
    # (ids, rows) pairs and other chunk sizes give the same sample; another seed another one.
    pairs = ((np.arange(i, i + 999), rows[i:i + 999]) for i in range(0, len(rows), 999))
    np.testing.assert_array_equal(vi.train_sample(pairs, len(rows), 3_000, seed=3), sample)
    assert not np.array_equal(position(vi.train_sample([rows], len(rows), 3_000, seed=4)), picked)
    assert len(vi.train_sample([rows], len(rows))) == vi.train_sample_size(len(rows))
    assert "held 49000 rows, not the 50000" in one_line_error(vi.train_sample, chunks[:-1], len(rows), 10)
    assert "cannot be drawn from 50000" in one_line_error(vi.train_sample, chunks, len(rows), 50_001)


def test_ivfpq_errors_say_what_is_wrong(pq_data):
    vectors, ids, queries = pq_data
    message = one_line_error(vi.new_vector_index, "ivfpq", DIM, vectors, pq_bytes=5)
    assert "pq_bytes (--pq-bytes) 5 must divide the vector dimension 32" in message
    assert "4, 8" in message  # divisors to choose from
    assert "must divide the vector dimension 32" in one_line_error(vi.new_vector_index, "ivfpq", DIM, vectors)  # 64
    message = one_line_error(vi.new_vector_index, "ivfpq", DIM, vectors[:vi.IVFPQ_MIN_TRAIN - 1], pq_bytes=8)
    assert f"needs at least {vi.IVFPQ_MIN_TRAIN} training vectors" in message and f"got {vi.IVFPQ_MIN_TRAIN - 1}" in message
    assert "an ivfpq index needs training vectors" in one_line_error(vi.new_vector_index, "ivfpq", DIM, pq_bytes=8)
    index = build("flat", vectors[:100], ids[:100])
    assert "rerank needs vectors_of" in one_line_error(vi.search, index, queries, 5, rerank=20)
    assert "rerank must be a non-negative integer" in one_line_error(vi.search, index, queries, 5, rerank=2.5,
                                                                     vectors_of=lookup(vectors, ids))
    assert "vectors_of gave float32 rows of shape (3, 16)" in one_line_error(
        vi.rerank, queries[:1], ids[None, :3], lambda wanted: np.zeros((3, 16), np.float32), 2)
    assert "a row per query (2)" in one_line_error(vi.rerank, queries[:2], ids[None, :3], lookup(vectors, ids), 2)
