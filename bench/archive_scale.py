"""An archive's worth of vectors in one index folder: disk, memory, build time, latency and recall of
the flat, ivf, hnsw and ivfpq (+ exact re-ranking) indexes, built from the vector store.

    python3 -m bench.archive_scale                          # 1,000,000 and 10,000,000 vectors (hours; ~25 GB of disk)
    python3 -m bench.archive_scale --sizes 1000000 --work /tmp/archive
    python3 -m bench.archive_scale --quick                  # 20,000 vectors (about a minute)

Data: a simulated archive of --slides slide records (records only: no slide file exists) whose
patches' vectors come from bench/search_speed.py's Mixture (clustered unit vectors of 512
dimensions, --centres components; queries are fresh points of the same mixture). Per --sizes N, a new
index folder in --work gets N / --slides patches per slide, written through PatchDatabase.add_sources
about 100,000 vectors at a time into its vector store (--vector-dtype, default float16: what an
archive would keep; re-ranking reads them). Then, per --types, SlideIndex.reindex builds that faiss
index from the store (trained on the store's sample, filled in batches: what `retrieve.py reindex`
does), timed, and measured:

- disk bytes per patch: the store's chunk files + patches.sqlite (the record) + vectors.faiss;
- memory of a query process: a subprocess that opens the index read-only (SlideIndex.open), runs
  the queries below through SlideIndex.search and reads its own /proc/self/status: the index's
  memory is the growth of RssAnon from before opening to after the first search loaded the faiss
  file; then what the queries added (RssAnon: freed buffers the allocator keeps; RssFile: the
  store's pages re-ranking read, page cache) and VmHWM (the peak, load included);
- latency of SlideIndex.search (k = --k, the index's default nprobe / efSearch, ivfpq re-ranking
  its best --rerank exactly) for a 10-patch query and a --mosaic-patch mosaic: median and p95 of
  --repeats batches of fresh query vectors (at least 3, fewer when they pass --max-seconds);
- recall@k of --queries query vectors against exact search computed by streaming the store
  (SlideIndex.iter_vectors: every stored vector, a batch at a time).

flat, ivf and hnsw keep every vector as float32 in memory (20 GB at 10M: more than a 24 GiB machine
holds beside the build), and hnsw's build is slow: above --full-max vectors they are not built;
their rows then say "extrapolated" and scale the largest measured size's bytes per patch.

--vector-store milvus-lite measures the same archive kept in a Milvus Lite database in the index
folder (`retrieve.py index --vector-store milvus-lite:DIR/milvus.db`): float32 vectors (Milvus's),
its FLAT, IVF_FLAT and HNSW indexes (Milvus Lite has no IVF_PQ), built by SlideIndex.reindex as
`retrieve.py reindex` builds them; disk is then Milvus Lite's files, and RAM the query process's
with Milvus Lite's engine started inside it (a fixed few hundred MB included).

Writes the table (command, machine, date, load) to bench/results.md's "Archive scale" section, or
"Archive scale with Milvus Lite" (--record PATH elsewhere; --no-record or --quick without --record:
never); main() returns the rows.
Exit status 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.archive_scale")

import numpy as np

from bench.search_speed import Mixture, recall  # the clustered vectors and recall@k of bench/search_speed.py
from bench.search_speed import get_args_parser as mixture_defaults
from bench.search_speed import machine as faiss_machine
from bench.timing import apply_quick_defaults, load_note, print_and_record
from histo_retrieval.errors import UserError, run_script
from histo_retrieval.search import vector_index
from histo_retrieval.search.index import IndexSettings, SlideIndex, SourceRecord
from histo_retrieval.search.milvus_vectors import LITE_INDEX_TYPES
from histo_retrieval.search.vector_store import DTYPES

REPO = Path(__file__).resolve().parent.parent
SECTIONS = {"local": "## Archive scale (bench/archive_scale.py)",
            "milvus-lite": "## Archive scale with Milvus Lite (bench/archive_scale.py --vector-store milvus-lite)"}
DIM = 512  # the colour histogram's 8 bins per channel: an encoder of 512-d vectors for the index's record
WRITE_ROWS = 100_000  # vectors per add_sources call while writing the archive
PATCH_SIDE = 448  # level-0 pixels of a patch's box in the records
GOALS = {"recall": 0.95, "ram_bytes": 100, "query_ms": 50}  # ivfpq + rerank, from the issue
FULL_VECTOR_TYPES = ("flat", "ivf", "hnsw")  # float32 vectors in RAM: built up to --full-max only
# --vector-store: its index types and its vector dtype (None: --vector-dtype's)
VECTOR_STORES = {"local": (vector_index.INDEX_TYPES, None), "milvus-lite": (LITE_INDEX_TYPES, "float32")}
MILVUS_LITE_FILE = "milvus.db"  # Milvus Lite's data folder inside the index folder


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000],
                        help="patches (vectors) in each archive measured (default: %(default)s)")
    parser.add_argument("--slides", type=int, default=2000, help="slide records the patches belong to (default: %(default)s)")
    parser.add_argument("--centres", type=int, default=4000, help="mixture components (default: %(default)s)")
    parser.add_argument("--types", nargs="+", default=None, choices=vector_index.INDEX_TYPES,
                        help="index types measured (default: every one the --vector-store has: "
                             f"{' '.join(vector_index.INDEX_TYPES)}; with milvus-lite {' '.join(LITE_INDEX_TYPES)})")
    parser.add_argument("--full-max", type=int, default=1_000_000,
                        help="flat, ivf and hnsw are built up to this many vectors, extrapolated above (default: %(default)s)")
    parser.add_argument("--vector-dtype", default=None, choices=DTYPES,
                        help="dtype of the stored vectors (default: float16 locally, float32 with milvus-lite)")
    parser.add_argument("--vector-store", default="local", choices=VECTOR_STORES,
                        help="where the vectors live: local (the index folder's chunk store, faiss) or milvus-lite "
                             "(a Milvus Lite database in the index folder) (default: %(default)s)")
    parser.add_argument("--pq-bytes", type=int, default=vector_index.DEFAULT_PQ_BYTES,
                        help="ivfpq code bytes per vector (default: %(default)s)")
    parser.add_argument("--opq", action="store_true", help="ivfpq with an OPQ rotation (default: off)")
    parser.add_argument("--rerank", type=int, default=100,
                        help="ivfpq: candidates re-ranked exactly from the store per query vector (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query vector (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=100, help="query vectors for recall (default: %(default)s)")
    parser.add_argument("--mosaic", type=int, default=100, help="patches of the mosaic query (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=30, help="timed batches per query size (default: %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=120,
                        help="stop timing a query size after this long, with at least 3 batches timed: exact "
                             "search of a 100-patch mosaic over 1M vectors takes seconds a batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="defaults --sizes 20000 --centres 40 --repeats 10 --full-max 20000: a check that runs in "
                             "about a minute, recorded only with --record (default: off)")
    parser.add_argument("--work", default=None,
                        help="folder for the index folders, kept (default: a temporary one, removed at the end)")
    parser.add_argument("--record", default=None,
                        help="Markdown file whose section gets the table (default: bench/results.md, with --quick none)")
    parser.add_argument("--no-record", action="store_true", help="write the table nowhere (default: off)")
    parser.add_argument("--query-worker", default=None, help=argparse.SUPPRESS)  # internal: the query process
    return parser


def check_args(args: argparse.Namespace) -> None:
    apply_quick_defaults(args, get_args_parser(), {"sizes": [20_000], "centres": 40, "repeats": 10, "full_max": 20_000})
    types, dtype = VECTOR_STORES[args.vector_store]
    args.types = args.types or list(types)
    refused = [kind for kind in args.types if kind not in types]
    if refused:
        raise UserError(f"--types {' '.join(refused)}: --vector-store {args.vector_store} has no such index; "
                        f"choose among {' '.join(types)}")
    if dtype and args.vector_dtype not in (None, dtype):
        raise UserError(f"--vector-dtype {args.vector_dtype}: --vector-store {args.vector_store} keeps {dtype}; "
                        "drop --vector-dtype")
    args.vector_dtype = args.vector_dtype or dtype or "float16"
    if args.slides < 1 or min(args.sizes) < args.slides:
        raise UserError(f"--sizes {args.sizes}, --slides {args.slides}: each size must be at least the slides (>= 1)")
    if args.max_seconds <= 0:
        raise UserError(f"--max-seconds {args.max_seconds}: must be positive")
    for name in ("centres", "k", "queries", "mosaic", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    if "ivfpq" in args.types and (args.pq_bytes < 1 or DIM % args.pq_bytes):
        raise UserError(f"--pq-bytes {args.pq_bytes}: must divide the vectors' {DIM} dimensions")
    if args.work and Path(args.work).exists() and any(Path(args.work).iterdir()):
        raise UserError(f"--work {args.work}: not empty; choose a new or empty folder")


# ----------------------------------------------------------------------------- the archive
def mixture(args: argparse.Namespace) -> Mixture:
    """bench/search_speed.py's mixture at its default shape, with --centres components of DIM dimensions."""
    shape = mixture_defaults().parse_args([])
    shape.dim, shape.centres = DIM, args.centres
    return Mixture(shape, np.random.default_rng(args.seed))


def write_archive(directory: Path, size: int, args: argparse.Namespace, source: Mixture) -> None:
    """A new index at `directory` of `size` patches over args.slides slide records, written through
    PatchDatabase.add_sources about WRITE_ROWS vectors at a time."""
    from histo_retrieval.encoders.registry import load_encoder
    from histo_retrieval.search.slides import Tiling

    encoder = load_encoder("histogram", "cpu", options={"bins": round(DIM ** (1 / 3))})
    store = None if args.vector_store == "local" else f"{args.vector_store}:{directory / MILVUS_LITE_FILE}"
    settings = IndexSettings.for_model(encoder, Tiling(0.5, 224, 0.5), vector_dtype=args.vector_dtype,
                                       vector_store=store)
    counts = np.full(args.slides, size // args.slides)
    counts[:size % args.slides] += 1
    rng = np.random.default_rng(args.seed + 10)
    index = SlideIndex.create(directory, settings)
    try:
        slide, written = 0, 0
        while slide < args.slides:
            batch = max(1, WRITE_ROWS // int(counts[slide]))
            numbers = range(slide, min(slide + batch, args.slides))
            vectors = source.sample(int(counts[numbers.start:numbers.stop].sum()), rng)[0]
            records, start = [], 0
            for number in numbers:
                count = int(counts[number])
                side = int(np.ceil(np.sqrt(count)))
                boxes = np.array([[PATCH_SIDE * (j % side), PATCH_SIDE * (j // side), PATCH_SIDE, PATCH_SIDE]
                                  for j in range(count)], np.int64)
                records.append(SourceRecord(path=f"/archive/slides/slide_{number:06d}.svs", kind="slide",
                                            vectors=vectors[start:start + count], boxes=boxes,
                                            tissue=np.ones(count, np.float32), file_size=1, mtime=0.0,
                                            width=PATCH_SIDE * side, height=PATCH_SIDE * side, slide_mpp=0.25,
                                            backend="openslide"))
                start += count
            index.db.add_sources(records, "bench.archive_scale")
            slide, written = numbers.stop, written + start
            if size > WRITE_ROWS:
                print(f"  written {written:,} / {size:,} vectors ({slide} slides)", flush=True)
    finally:
        index.close()


def exact_top_k(directory: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of each query's exact top-k by inner product, streaming every stored vector once."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    with SlideIndex.open(directory) as index:
        for ids, vectors in index.iter_vectors():
            scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
            every = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            best_scores, best_ids = np.take_along_axis(scores, top, 1), np.take_along_axis(every, top, 1)
    return np.take_along_axis(best_ids, np.argsort(-best_scores, axis=1, kind="stable"), 1)


def disk_bytes(directory: Path) -> dict[str, int]:
    """Bytes on disk of the store (the chunk files, or Milvus Lite's files), the SQLite record (with
    its WAL) and the faiss file."""
    def size(paths) -> int:
        return sum(p.stat().st_size for p in paths if p.is_file())
    return {"store": size((directory / "vectors").glob("*")) + size((directory / MILVUS_LITE_FILE).rglob("*")),
            "record": size(directory.glob("patches.sqlite*")),
            "faiss": size(directory.glob("vectors.faiss"))}


# ----------------------------------------------------------------------------- the query process
def proc_status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in bytes."""
    status = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                status[name] = int(value.split()[0]) * 1024
    return status


def query_worker(spec_path: str) -> None:
    """The query process: open the index read-only, time its searches, print the figures as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    recall_queries, timed = np.load(spec["recall_queries"]), np.load(spec["timed_queries"])
    before = proc_status()
    index = SlideIndex.open(spec["index"])
    k = spec["k"]
    index.search(recall_queries[:1], k)  # loads the faiss file
    loaded = proc_status()
    found = index.search(recall_queries, k)[1]
    latencies = {}
    for name, size in (("query", 10), ("mosaic", spec["mosaic"])):
        times, start, began = [], 0, time.perf_counter()
        for repeat in range(spec["repeats"]):
            if repeat >= 3 and time.perf_counter() - began > spec["max_seconds"]:
                break
            if start + size > len(timed):
                start = 0
            batch = timed[start:start + size]
            started = time.perf_counter()
            index.search(batch, k)
            times.append(time.perf_counter() - started)
            start += size
        latencies[name] = times
    after = proc_status()
    result = {"before": before, "loaded": loaded, "after": after, "found": found.tolist(), "latencies": latencies,
              "describe": index.describe_vector_index()}
    index.close()
    print(json.dumps(result))


def measure_queries(directory: Path, files: dict[str, Path], args: argparse.Namespace, work: Path) -> dict:
    spec = work / "query_spec.json"
    spec.write_text(json.dumps({"index": str(directory), "k": args.k, "mosaic": args.mosaic,
                                "repeats": args.repeats, "max_seconds": args.max_seconds, **{name: str(path) for name, path in files.items()}}))
    result = subprocess.run([sys.executable, "-m", "bench.archive_scale", "--query-worker", str(spec)], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the query process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the benchmark
def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def measure_size(size: int, args: argparse.Namespace, source: Mixture, work: Path) -> list[dict]:
    directory = work / f"archive_{size}"
    print(f"archive of {size:,} vectors over {args.slides:,} slides ({args.vector_dtype}, {args.vector_store} store) ...",
          flush=True)
    started = time.perf_counter()
    write_archive(directory, size, args, source)
    written_s = time.perf_counter() - started
    rng = np.random.default_rng(args.seed + 1)
    files = {"recall_queries": work / "recall_queries.npy", "timed_queries": work / "timed_queries.npy"}
    recall_queries = source.sample(args.queries, rng)[0]
    np.save(files["recall_queries"], recall_queries)
    np.save(files["timed_queries"], source.sample(max(1000, args.mosaic), rng)[0])
    started = time.perf_counter()
    truth = exact_top_k(directory, recall_queries, args.k)
    print(f"  written in {written_s:.0f} s; exact top-{args.k} of {args.queries} queries by streaming the store: "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    rows = []
    for kind in args.types:
        row = {"size": size, "type": kind, "written_s": written_s}
        if kind in FULL_VECTOR_TYPES and size > args.full_max:
            rows.append({**row, "skipped": True})
            print(f"  {kind}: not built above --full-max {args.full_max:,}", flush=True)
            continue
        print(f"  {kind}: reindex ...", flush=True)
        with SlideIndex.open(directory, writable=True) as index:
            started = time.perf_counter()
            index.reindex(kind, pq_bytes=args.pq_bytes, opq=args.opq, rerank=args.rerank if kind == "ivfpq" else 0)
            row["build_s"] = time.perf_counter() - started
        del index  # its faiss index (2 GB of float32 at 1M for flat) before the query process loads its own
        row["disk"] = disk_bytes(directory)
        result = measure_queries(directory, files, args, work)
        row["describe"] = result["describe"]
        row["recall"] = recall(np.array(result["found"]), truth)
        before, loaded, after = result["before"], result["loaded"], result["after"]
        row["ram"] = loaded["RssAnon"] - before["RssAnon"]
        row["queries_anon"] = after["RssAnon"] - loaded["RssAnon"]
        row["queries_file"] = after["RssFile"] - loaded["RssFile"]
        row["hwm"] = after["VmHWM"]
        for name, times in result["latencies"].items():
            row[name] = (statistics.median(times), p95(times))
            row[name + "_batches"] = len(times)
        rows.append(row)
        print(f"  {kind}: {row['describe']}; build {row['build_s']:.1f} s, disk {sum(row['disk'].values()) / size:,.0f} "
              f"B/patch, RAM {row['ram'] / size:,.1f} B/patch, 10 patches {row['query'][0] * 1e3:.1f} ms, "
              f"mosaic {row['mosaic'][0] * 1e3:.1f} ms, recall@{args.k} {row['recall']:.4f}", flush=True)
    return rows


def batches(row: dict, name: str, args: argparse.Namespace) -> str:
    """A note when --max-seconds cut the timed batches short."""
    count = row[name + "_batches"]
    return "" if count >= args.repeats else f" ({count} batches)"


def report(rows: list[dict], args: argparse.Namespace, load: tuple[float, float]) -> str:
    lines = [f"| vectors | type | index | build s (train + add + save) | disk B/patch: store + record + faiss | "
             f"query process: index in RAM, B/patch (MiB) | its queries' added heap + store pages, MiB | peak MiB | "
             f"10 patches: median / p95 ms | "
             f"{args.mosaic}-patch mosaic: median / p95 ms | recall@{args.k} |",
             "|---:|---|---|---:|---|---|---|---:|---|---|---:|"]
    measured = {}
    for row in rows:
        kind, size = row["type"], row["size"]
        if row.get("skipped"):
            base = measured.get(kind)
            if base is None:
                lines.append(f"| {size:,} | {kind} | not built (above --full-max) | | | | | | | | |")
                continue
            disk, ram = sum(base["disk"].values()) / base["size"], base["ram"] / base["size"]
            lines.append(f"| {size:,} | {kind} | extrapolated from {base['size']:,} (not built) | | ~{disk:,.0f} | "
                         f"~{ram:,.0f} (~{ram * size / 2**20:,.0f}) | | | | | |")
            continue
        measured[kind] = row
        disk = row["disk"]
        lines.append(
            f"| {size:,} | {kind} | {row['describe']} | {row['build_s']:.1f} | "
            f"{sum(disk.values()) / size:,.0f}: {disk['store'] / size:,.0f} + {disk['record'] / size:,.0f} + "
            f"{disk['faiss'] / size:,.0f} | {row['ram'] / size:,.1f} ({row['ram'] / 2**20:,.0f}) | "
            f"{row['queries_anon'] / 2**20:,.0f} + {row['queries_file'] / 2**20:,.0f} | {row['hwm'] / 2**20:,.0f} | "
            f"{row['query'][0] * 1e3:.1f} / {row['query'][1] * 1e3:.1f}{batches(row, 'query', args)} | "
            f"{row['mosaic'][0] * 1e3:.1f} / {row['mosaic'][1] * 1e3:.1f}{batches(row, 'mosaic', args)} | "
            f"{row['recall']:.4f} |")
    goals = []
    for row in rows:
        if row["type"] == "ivfpq" and not row.get("skipped"):
            met = {"recall": row["recall"] >= GOALS["recall"], "ram": row["ram"] / row["size"] < GOALS["ram_bytes"],
                   "query": row["query"][0] * 1e3 < GOALS["query_ms"]}
            goals.append(f"{row['size']:,}: recall@{args.k} {row['recall']:.3f} ({'met' if met['recall'] else 'NOT met'}), "
                         f"{row['ram'] / row['size']:.1f} B/patch ({'met' if met['ram'] else 'NOT met'}), "
                         f"{row['query'][0] * 1e3:.1f} ms ({'met' if met['query'] else 'NOT met'})")
    text = "\n".join(lines) + "\n\n" + (
        f"Goals for ivfpq with re-ranking (recall@{args.k} >= {GOALS['recall']}, under {GOALS['ram_bytes']} bytes of "
        f"RAM per patch, a 10-patch query under {GOALS['query_ms']} ms): " + ("; ".join(goals) or "not measured") + ".\n\n"
        f"Data: {args.slides:,} slide records, vectors of {DIM} dimensions from bench/search_speed.py's mixture "
        f"({args.centres:,} components), stored as {args.vector_dtype} ({args.vector_store} store); {args.queries} fresh query vectors for "
        f"recall against exact search streamed from the store; latencies of SlideIndex.search (k={args.k}, the "
        f"index's default nprobe / efSearch) over {args.repeats} batches (fewer where said: --max-seconds "
        f"{args.max_seconds:g}). RAM: in a query process, the growth of its "
        f"anonymous resident memory (RssAnon) from before it opened the index to after its first search loaded "
        f"the faiss file (the index's own memory, per patch); then what the queries added: anonymous memory (the "
        f"allocator keeping freed search buffers: a fixed cost, not per patch) and the store's file pages "
        f"re-ranking read (page cache, which the kernel drops under pressure); peak: its VmHWM, Python and its "
        f"libraries included. "
        f"ivfpq: {args.pq_bytes} bytes a vector{', OPQ' if args.opq else ''}, re-ranking the best {args.rerank} "
        f"exactly. flat, ivf and hnsw are built up to {args.full_max:,} vectors; above, their bytes per patch are "
        f"the largest measured size's. {faiss_machine()}. {load_note(load)}\n")
    return text


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    if args.query_worker:
        query_worker(args.query_worker)
        return []
    check_args(args)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="archive_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    source = mixture(args)
    try:
        rows = [row for size in args.sizes for row in measure_size(size, args, source, work)]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = report(rows, args, (load_before, os.getloadavg()[0]))
    print_and_record(args, text, SECTIONS[args.vector_store])
    return rows


if __name__ == "__main__":
    sys.exit(run_script(main, None))
