"""Query latency of histo_retrieval.search.vector_index's flat (exact), ivf, hnsw and ivfpq indexes, with their recall.

    python3 -m bench.search_speed            # 1,000,000 vectors of 512 dimensions (minutes; ~6 GB)
    python3 -m bench.search_speed --quick    # 50,000 vectors, a smaller sweep (under a minute)

Data (class Mixture): a Gaussian mixture shaped like embeddings (uniform noise has no neighbourhood
structure): components grouped around a few "tissue" directions, overlapping, each varying along
a few directions of its own (a low intrinsic dimension) plus a little isotropic noise; normalised.
Queries are fresh points of the same mixture. Every index is built through histo_retrieval.search.vector_index, ivf
trained on all the vectors (its k-means subsamples them), ivfpq (--pq-bytes, 4 sqrt(n) lists) on the
sample vector_index.train_sample draws and searched with --rerank N (the best N candidates re-ranked
exactly from the float32 vectors held in memory; a vector store reads them from disk); the vectors
added 100,000 at a time (as an index store adds them, slide by slide). Per type: build time
(training, or nothing), add time, size (the saved file's bytes), median latency of a batch of
--batch queries (k = --k, batches cycled through the --queries query vectors), recall@k over all
--queries against flat, and the speed-up over flat. A sweep over nlist x nprobe (ivf; ivfpq at its
one nlist) and M x efSearch (hnsw) stops at the first setting of
each nlist / M reaching --target-recall; the fastest such setting is the one reported. Then each
type is timed with exclusions (see exclusions()): --few-excluded random ids per query; each
query's own component (an "own slide"); and --shared-excluded ids around a batch's first query
shared by the batch (the worst case); the last two through both of search()'s paths (over-fetch,
IDSelector), and the sweep is continued with the own components excluded until it reaches the
target again.

It records its tables (command, machine, date) in bench/results.md's "Vector search" section
(not for --quick unless --record PATH is given; --no-record: never); main() returns the rows for
bench/run_all.py.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.search_speed")

import numpy as np

from histo_retrieval.search import vector_index as vi  # before faiss: it picks faiss's BLAS kernels (search/openblas.py)

import faiss  # noqa: E402
from bench.timing import apply_quick_defaults, results_file  # noqa: E402
from histo_retrieval.files import atomic_write_text, command_line

SECTION = "## Vector search (bench/search_speed.py)"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors (default: 1000000)")
    parser.add_argument("--dim", type=int, default=512, help="dimension, the default model's embedding size (default: 512)")
    parser.add_argument("--quick", action="store_true",
                        help="defaults --n 50000, --queries 200, --repeats 10, --hnsw-m 32: a check that runs in "
                             "under a minute (default: off)")
    parser.add_argument("--centres", type=int, default=None, help="mixture centres (default: n / 500, at least 20)")
    parser.add_argument("--groups", type=int, default=24, help="directions the centres group around, as tissue "
                        "classes (default: 24, Kimia Path24's)")
    parser.add_argument("--centre-offset", type=float, default=0.5,
                        help="norm of a centre's offset from its group's direction (default: 0.5)")
    parser.add_argument("--rank", type=int, default=32, help="directions of variation within a component (default: 32)")
    parser.add_argument("--spread", type=float, default=0.8,
                        help="norm of the variation within a component, times U(0.5, 1) per component (default: 0.8)")
    parser.add_argument("--noise", type=float, default=0.2, help="norm of the isotropic noise (default: 0.2)")
    parser.add_argument("--queries", type=int, default=1000, help="query vectors for recall (default: 1000)")
    parser.add_argument("--batch", type=int, default=10, help="queries per timed search (default: 10)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default: 10)")
    parser.add_argument("--repeats", type=int, default=30, help="timed batches per setting, median reported (default: 30)")
    parser.add_argument("--target-recall", type=float, default=0.95, help="recall@k to reach (default: 0.95)")
    parser.add_argument("--nlist", type=int, nargs="+", default=None,
                        help="ivf list counts to sweep (default: sqrt(n) and 4 sqrt(n), histo_retrieval.search.vector_index's default)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                        help="ivf nprobe values, ascending (default: 1 2 4 ... 256)")
    parser.add_argument("--hnsw-m", type=int, nargs="+", default=[16, 32], help="hnsw M values to sweep (default: 16 32)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512],
                        help="hnsw efSearch values, ascending (default: 16 32 64 128 256 512)")
    parser.add_argument("--few-excluded", type=int, default=5, help="ids excluded per query, few-ids case (default: 5)")
    parser.add_argument("--shared-excluded", type=int, default=10_000,
                        help="ids of the shared exclusion set (default: 10000)")
    parser.add_argument("--pq-bytes", type=int, default=vi.DEFAULT_PQ_BYTES,
                        help=f"ivfpq code bytes per vector; must divide --dim (default: {vi.DEFAULT_PQ_BYTES})")
    parser.add_argument("--rerank", type=int, default=100,
                        help="ivfpq: candidates re-ranked exactly per query, 0 for none (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data (default: 0)")
    parser.add_argument("--record", default=None,
                        help="Markdown file whose 'Vector search' section gets the tables (default: "
                             "bench/results.md, except with --quick: none)")
    parser.add_argument("--no-record", action="store_true", help="only print the tables (default: record them)")
    return parser


# ----------------------------------------------------------------------------- data
def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Mixture:
    """A Gaussian mixture shaped like embeddings: --groups "tissue" directions; --centres components,
    each a group's direction plus an offset of norm --centre-offset (so that components of a group
    overlap, as patches of one tissue from different slides do); within a component, variation of
    norm about --spread (times a per-component factor in [0.5, 1]) along its own --rank random
    directions (embeddings have a low intrinsic dimension; an isotropic 512-d blob would not) plus
    isotropic noise of norm --noise. Rows are normalised."""

    def __init__(self, args: argparse.Namespace, rng: np.random.Generator):
        groups = unit(rng.standard_normal((args.groups, args.dim), dtype=np.float32))
        offsets = unit(rng.standard_normal((args.centres, args.dim), dtype=np.float32))
        self.centres = unit(groups[rng.integers(0, args.groups, args.centres)] + args.centre_offset * offsets)
        self.bases = rng.standard_normal((args.centres, args.rank, args.dim), dtype=np.float32) / math.sqrt(args.dim)
        self.scales = rng.uniform(0.5, 1.0, args.centres).astype(np.float32) * args.spread / math.sqrt(args.rank)
        self.noise = args.noise

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(n unit rows float32, their components), made 100,000 rows at a time."""
        out = np.empty((n, self.centres.shape[1]), np.float32)
        labels = np.empty(n, np.int64)
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            label = np.sort(rng.integers(0, len(self.centres), m))
            rows = rng.standard_normal((m, out.shape[1]), dtype=np.float32)
            rows *= self.noise / math.sqrt(out.shape[1])
            z = rng.standard_normal((m, self.bases.shape[1]), dtype=np.float32) * self.scales[label][:, None]
            bounds = np.searchsorted(label, np.arange(len(self.centres) + 1))
            for c in np.flatnonzero(np.diff(bounds)):
                block = slice(bounds[c], bounds[c + 1])
                rows[block] += self.centres[c] + z[block] @ self.bases[c]
            order = rng.permutation(m)  # rows in random order, not grouped by component
            out[start:start + m], labels[start:start + m] = unit(rows)[order], label[order]
        return out, labels


def make_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, their ids, their components, queries, the queries' components)."""
    rng = np.random.default_rng(args.seed)
    mixture = Mixture(args, rng)
    vectors, labels = mixture.sample(args.n, rng)
    queries, query_labels = mixture.sample(args.queries, np.random.default_rng(args.seed + 1))
    ids = np.random.default_rng(args.seed + 2).permutation(args.n).astype(np.int64) * 3 + 7  # not row numbers
    return vectors, ids, labels, queries, query_labels


# ----------------------------------------------------------------------------- measuring
def seconds(call, *args, **kwargs) -> tuple[float, object]:
    """(wall seconds, result) of call(*args, **kwargs)."""
    start = time.perf_counter()
    result = call(*args, **kwargs)
    return time.perf_counter() - start, result


def batch_latency(index, queries: np.ndarray, args: argparse.Namespace, exclude=None,
                  **widths) -> tuple[float, float]:
    """(median, fastest) seconds of search() on one batch of args.batch queries, batches cycled, after
    one warm-up. The fastest shows what the median loses when other processes share the cores."""
    starts = range(0, len(queries) - args.batch + 1, args.batch)
    times = []
    for repeat in range(args.repeats + 1):
        start = starts[repeat % len(starts)]
        rows = slice(start, start + args.batch)
        batch_exclude = None if exclude is None else exclude[rows]
        elapsed, _ = seconds(search, index, queries[rows], args.k, batch_exclude, **widths)
        if repeat:
            times.append(elapsed)
    return statistics.median(times), min(times)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k that was found."""
    return float(np.mean([len(np.intersect1d(a[a >= 0], b[b >= 0])) / max(1, (b >= 0).sum())
                          for a, b in zip(found, truth)]))


def index_bytes(index) -> int:
    """Size of the saved index (what the store keeps on disk, about what it holds in memory)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.faiss")
        vi.save_vector_index(index, path)
        return os.path.getsize(path)


def machine() -> str:
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)"


# search()'s re-ranking arguments per index (by id(index): faiss objects take no new attributes).
RERANK: dict[int, dict] = {}


def search(index, queries: np.ndarray, k: int, exclude=None, **widths) -> tuple[np.ndarray, np.ndarray]:
    """vi.search, re-ranking as the index was set up to (see with_rerank)."""
    return vi.search(index, queries, k, exclude, **widths, **RERANK.get(id(index), {}))


def with_rerank(index, candidates: int, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Make search() re-rank this index's best `candidates` exactly from `vectors` (0: never), until
    RERANK.pop(id(index))."""
    if candidates:
        order = np.argsort(ids)
        sorted_ids = ids[order]
        RERANK[id(index)] = {"rerank": candidates,
                             "vectors_of": lambda wanted: vectors[order[np.searchsorted(sorted_ids, wanted)]]}


# ----------------------------------------------------------------------------- the benchmark
def build(kind: str, vectors: np.ndarray, ids: np.ndarray, **kwargs) -> tuple[object, float, float]:
    """(index, build seconds, add seconds), printing progress. ivfpq trains on a sample drawn from
    100,000-row chunks as from a vector store (its lists counted on all the vectors)."""
    print(f"building {kind} {kwargs or ''} ...", flush=True)
    train = vectors if kind == "ivf" else None
    if kind == "ivfpq":
        chunks = (vectors[start:start + 100_000] for start in range(0, len(vectors), 100_000))
        train = vi.train_sample(chunks, len(vectors), vi.train_sample_size(len(vectors), kwargs["ivf_lists"]))
    build_s, index = seconds(vi.new_vector_index, kind, vectors.shape[1], train=train, **kwargs)
    add_s = 0.0
    chunk = 100_000
    for start in range(0, len(vectors), chunk):
        elapsed, _ = seconds(vi.add_vectors, index, vectors[start:start + chunk], ids[start:start + chunk])
        add_s += elapsed
        if len(vectors) > chunk:
            print(f"  {kind}: added {min(start + chunk, len(vectors)):,} / {len(vectors):,} ({add_s:.0f} s)", flush=True)
    print(f"  {kind}: build {build_s:.1f} s, add {add_s:.1f} s", flush=True)
    return index, build_s, add_s


def sweep(index, kind: str, width_name: str, widths: list[int], queries, truth, args, exclude=None) -> list[dict]:
    """Recall and latency per width, ascending, up to the first that reaches the target."""
    points = []
    for width in widths:
        found = search(index, queries, args.k, exclude, **{width_name: width})[1]
        latency, fastest = batch_latency(index, queries, args, exclude, **{width_name: width})
        point = {width_name: width, "recall": recall(found, truth), "latency": latency, "fastest": fastest}
        points.append(point)
        print(f"  {kind} {width_name}={width}{' (with exclusions)' if exclude else ''}: recall@{args.k} "
              f"{point['recall']:.4f}, {point['latency'] * 1e3:.2f} ms / batch", flush=True)
        if point["recall"] >= args.target_recall:
            break
    return points


def exclusions(ids: np.ndarray, labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray, flat,
               args) -> dict[str, list]:
    """The exclusion cases: a few random ids per query; each query's own component (the "own slide":
    other components of its group still hold good matches); the flat top matches of a batch's first
    query, shared by the batch (the worst case: the whole neighbourhood gone)."""
    rng = np.random.default_rng(args.seed + 3)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(args.centres + 1))
    members = [ids[order[bounds[c]:bounds[c + 1]]] for c in range(args.centres)]
    shared = []
    for start in range(0, len(queries), args.batch):
        nearest = vi.search(flat, queries[start:start + 1], args.shared_excluded)[1][0]
        shared += [nearest] * len(queries[start:start + args.batch])
    return {f"{args.few_excluded} random ids per query": [rng.choice(ids, args.few_excluded, replace=False)
                                                          for _ in queries],
            f"own component per query (~{args.n // args.centres} ids)": [members[c] for c in query_labels],
            f"{args.shared_excluded:,} nearest of the batch's first query, shared": shared}


def forced_path(path: str | None) -> dict[str, int]:
    """Set search()'s limits so that every exclusion set takes `path` (None: leave them); returns the old ones."""
    old = vi.OVERFETCH_MAX
    if path:
        vi.OVERFETCH_MAX = dict.fromkeys(old, 10**12 if path == "over-fetch" else 0)
    return old


def exclusion_rows(kind: str, index, queries, cases, widths: dict, args) -> list[str]:
    """Latency and recall with each exclusion case, as Markdown table rows."""
    lines = []
    for case, exclude, truth, path in cases:
        old = forced_path(path)
        try:
            found = search(index, queries, args.k, exclude, **widths)[1]
            latency = batch_latency(index, queries, args, exclude, **widths)[0]
        finally:
            vi.OVERFETCH_MAX = old
        lines.append(f"| {kind} | {case} | {latency * 1e3:.2f} | {recall(found, truth):.4f} |")
        print("  " + lines[-1], flush=True)
    return lines


def run(args: argparse.Namespace) -> tuple[list[dict], str]:
    """The measurements: rows for bench/run_all.py and the Markdown text."""
    apply_quick_defaults(args, get_args_parser(), {"n": 50_000, "queries": 200, "repeats": 10, "hnsw_m": [32]})
    args.centres = args.centres or max(20, args.n // 500)
    args.nlist = args.nlist or sorted({vi.default_ivf_lists(args.n) // 4, vi.default_ivf_lists(args.n)})
    args.queries = max(args.queries, args.batch)
    args.shared_excluded = min(args.shared_excluded, args.n)
    print(f"data: {args.n:,} x {args.dim} vectors, {args.centres:,} centres, {args.queries} queries; {machine()}",
          flush=True)
    load_before = os.getloadavg()[0]
    elapsed, (vectors, ids, labels, queries, query_labels) = seconds(make_data, args)
    print(f"  generated in {elapsed:.0f} s", flush=True)

    # Exact search: the ground truth (also with exclusions) and the baseline. Then freed: at most one
    # index is in memory at a time (1M x 512 is 2 GB per index, plus 2 GB of vectors).
    flat, build_s, add_s = build("flat", vectors, ids)
    elapsed, (truth_scores, truth) = seconds(vi.search, flat, queries, args.k)
    args.top1 = float(truth_scores[:, 0].mean())
    print(f"  exact top-{args.k} of {len(queries)} queries: {elapsed:.1f} s", flush=True)
    cases, own = [], None
    for number, (name, exclude) in enumerate(exclusions(ids, labels, queries, query_labels, flat, args).items()):
        truth_case = vi.search(flat, queries, args.k, exclude)[1]
        own = (exclude, truth_case) if number == 1 else own
        cases += [(f"{name}, {path or 'default'}", exclude, truth_case, path)
                  for path in ((None,) if number == 0 else ("over-fetch", "IDSelector"))]
    latency, fastest = batch_latency(flat, queries, args)
    results = {"flat": {"setting": "exact", "build": build_s, "add": add_s, "bytes": index_bytes(flat),
                        "recall": 1.0, "latency": latency, "fastest": fastest,
                        "exclusions": exclusion_rows("flat", flat, queries, cases, {}, args), "wider": [],
                        "defaults": []}}
    del flat

    candidates = [("ivf", {"ivf_lists": nlist}, "nprobe", [p for p in args.nprobe if p <= nlist] or [nlist])
                  for nlist in args.nlist]
    candidates += [("hnsw", {"hnsw_m": m}, "ef_search", args.ef_search) for m in args.hnsw_m]
    pq_lists = vi.default_ivf_lists(args.n)
    if args.pq_bytes and vi.can_train("ivfpq", args.n):
        candidates.append(("ivfpq", {"ivf_lists": pq_lists, "pq_bytes": args.pq_bytes}, "nprobe",
                           [p for p in args.nprobe if p <= pq_lists] or [pq_lists]))
    sweeps: list[str] = []
    for kind, kwargs, width_name, widths in candidates:
        index, build_s, add_s = build(kind, vectors, ids, **kwargs)
        if kind == "ivfpq":
            with_rerank(index, args.rerank, vectors, ids)
        points = sweep(index, kind, width_name, widths, queries, truth, args)
        setting = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        if kind == "ivfpq":
            setting += f", rerank={args.rerank}"
        sweeps += [f"| {kind} | {setting} | {p[width_name]} | {p['recall']:.4f} | {p['latency'] * 1e3:.2f} |"
                   for p in points]
        best, previous = points[-1], results.get(kind)
        def rank(r: dict) -> tuple:  # the fastest reaching the target, else the best recall
            reached = r["recall"] >= args.target_recall
            return reached, -r["latency"] if reached else r["recall"]
        if previous is None or rank(best) > rank(previous):
            width = {width_name: best[width_name]}
            # With each query's own component excluded, the search must go further: the width that
            # reaches the target then (doubling on up to every list / HNSW_MAX_EF_SEARCH).
            limit = kwargs["ivf_lists"] if kind in vi.IVF_KINDS else vi.HNSW_MAX_EF_SEARCH
            wider_widths = [best[width_name]]
            while wider_widths[-1] < limit:
                wider_widths.append(min(2 * wider_widths[-1], limit))
            wider = sweep(index, kind, width_name, wider_widths, queries, own[1], args, own[0])
            default_width = vi._search_widths(index, kind, None, None)[0 if kind in vi.IVF_KINDS else 1]
            defaults = []
            for case, exclude, truth_case in (("none", None, truth), ("own component", own[0], own[1])):
                found = search(index, queries, args.k, exclude)[1]
                defaults.append(f"| {kind} | {setting}, {width_name}={default_width} | {case} | "
                                f"{recall(found, truth_case):.4f} | "
                                f"{batch_latency(index, queries, args, exclude)[0] * 1e3:.2f} |")
                print("  " + defaults[-1], flush=True)
            results[kind] = {"setting": f"{setting}, {width_name}={best[width_name]}", "build": build_s,
                             "add": add_s, "bytes": index_bytes(index), "recall": best["recall"],
                             "latency": best["latency"], "fastest": best["fastest"],
                             "exclusions": exclusion_rows(kind, index, queries, cases, width, args),
                             "defaults": defaults,
                             "wider": [f"| {kind} | {setting} | {p[width_name]} (own component excluded) | "
                                       f"{p['recall']:.4f} | {p['latency'] * 1e3:.2f} |" for p in wider]}
        RERANK.pop(id(index), None)
        del index
    args.load = f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores"
    return report(results, sweeps, len(queries), args)


def report(results: dict[str, dict], sweeps: list[str], num_queries: int,
           args: argparse.Namespace) -> tuple[list[dict], str]:
    exact = results["flat"]["latency"]
    rows, table = [], []
    for kind, r in results.items():
        speedup = exact / r["latency"]
        table.append(f"| {kind} | {r['setting']} | {r['build']:.1f} | {r['add']:.1f} | {r['bytes'] / 2**20:,.0f} | "
                     f"{r['latency'] * 1e3:.2f} | {r['fastest'] * 1e3:.2f} | {r['recall']:.4f} | {speedup:.1f}x |")
        rows.append({"benchmark": "vector_search", "case": f"{kind} ({r['setting']}), {args.n:,} x {args.dim}, "
                     f"batch of {args.batch}, k={args.k}, recall@{args.k} {r['recall']:.3f}",
                     "ours": f"{r['latency'] * 1e3:.2f}", "baseline": f"{exact * 1e3:.2f}",
                     "unit": f"ms / {args.batch} queries", "speedup": f"{speedup:.1f}x"})
    approximate = {kind: r for kind, r in results.items() if kind != "flat"}
    verdict = ", ".join(f"{kind}: {exact / r['latency']:.1f}x at recall {r['recall']:.3f}"
                        for kind, r in approximate.items())
    goal = all(exact / r["latency"] >= 10 and r["recall"] >= args.target_recall for r in approximate.values())
    exclusion_table = [line for r in results.values() for line in r["exclusions"]]
    text = (f"{args.n:,} x {args.dim} vectors (Gaussian mixture: {args.centres:,} components around {args.groups} "
            f"directions, offset {args.centre_offset}, rank {args.rank}, spread {args.spread}, noise {args.noise}; "
            f"top-1 similarity {args.top1:.2f}), {num_queries} queries, k={args.k}, batches of {args.batch}, "
            f"median of {args.repeats}; load average {args.load}. "
            f"Goal (>= 10x faster than exact at recall@{args.k} >= {args.target_recall}): "
            f"{'met' if goal else 'NOT met'} ({verdict}).\n\n"
            f"| type | setting | build s | add s | MiB | ms / {args.batch} queries | fastest ms | recall@{args.k} "
            f"| speed-up |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(table) + "\n\n"
            f"Sweep (each stops at the first setting reaching recall@{args.k} >= {args.target_recall}):\n\n"
            f"| type | index | nprobe / efSearch | recall@{args.k} | ms / {args.batch} queries |\n"
            f"|---|---|---|---|---|\n" + "\n".join(sweeps + [line for r in results.values() for line in r["wider"]])
            + "\n\n"
            f"With exclusions (chosen settings; recall against exact search with the same exclusions; search() "
            f"over-fetches for sets up to {', '.join(f'{n:,} ids ({kind})' for kind, n in vi.OVERFETCH_MAX.items())}"
            f" and uses an IDSelector above):\n\n"
            f"| type | excluded | ms / {args.batch} queries | recall@{args.k} |\n|---|---|---|---|\n"
            + "\n".join(exclusion_table) + "\n\n"
            f"search()'s default widths (nprobe None: max({vi.DEFAULT_MIN_NPROBE}, nlist / "
            f"{round(1 / vi.DEFAULT_NPROBE_FRACTION)}); ef_search None: {vi.DEFAULT_EF_SEARCH}) on the chosen indexes:\n\n"
            f"| type | index | excluded | recall@{args.k} | ms / {args.batch} queries |\n|---|---|---|---|---|\n"
            + "\n".join(line for r in results.values() for line in r["defaults"]) + "\n")
    print("\n" + text, flush=True)
    return rows, text


def record(path: str, text: str) -> None:
    """Put `text` under SECTION in the Markdown file `path`, replacing that section's old text."""
    old = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    stamp = f"Command: `{command_line()}` on {machine()}, {datetime.date.today().isoformat()}\n\n"
    section = f"{SECTION}\n\n{stamp}{text}"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = pattern.sub(lambda _: section + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, new)
    print(f"recorded in {path}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run, record the full (not --quick) run or any run given --record, and return the rows."""
    args = get_args_parser().parse_args(argv)
    rows, text = run(args)
    path = results_file(args)
    if path:
        record(path, text)
    return rows


if __name__ == "__main__":
    main()
