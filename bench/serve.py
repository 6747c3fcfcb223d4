"""The search page under load: searches by upload against `retrieve.py serve`, over HTTP, with concurrent clients.

    python3 -m bench.serve                     # 100,000 patches, 8 clients, 400 searches (about 1 min on 2 cores)
    python3 -m bench.serve --patches 2000 --clients 2 --requests 8 --crop-size 32 --slide-size 1024x1024

Set-up (not timed), in a temporary folder or --work DIR:
- a randomly initialised --model (its default options) saved as train.py saves it, with crop size
  --crop-size (64 by default, not the paper's 224: the model's forward pass is most of a search's
  time, and a small crop keeps the bench short; the figures are those of a small model input);
- --slides synthetic slides (KIMIA_data/synthetic.py's write_slide_set, 0.5 um/px), so that the
  index's thumbnails and tiles exist;
- an index (SlideIndex.create with the IndexSettings `retrieve.py index` gives this checkpoint by
  default: 0.5 um/px, patch size = crop size, flat faiss index) of --patches patches whose vectors
  are NOT the model's (embedding 100,000 patches would take hours on 2 cores): random unit vectors
  of the model's embedding size, on a grid of patch-sized boxes over the whole of each slide. Each
  source is a hard link (a copy where links fail) of one of the slide files, so that every source
  has a path of its own; as many sources as the grid needs to hold --patches;
- QUERIES (8) query patches cut from the slides' tissue at the index's scale, as PNGs in memory, whose
  real embeddings (the model's, as the server computes them) replace the random vectors at their
  own boxes: each upload has a true nearest neighbour, its own patch, and the bench counts how
  many responses rank it first.

Then `python3 retrieve.py serve --index DIR --host 127.0.0.1 --port PORT --device cpu` starts as a
subprocess, as a user runs it; once GET /api/index answers (or --start-timeout passes: an error with
the server's stderr), one search warms it up (reported apart), and --clients threads, each with its
own httpx2.Client, send --requests POST /api/search/upload in all (multipart `file` = a query PNG,
in turn; `top_k` = --top-k), each taking the next request number until all are sent or --timeout
passes (requests not sent by then count as errors). A request is an error when it raises, answers
other than 200, or its JSON has no `matches` list. The server is stopped (terminate, then kill)
whatever happens.

Reported: requests per second (requests / wall time of the load), median and 95th-percentile latency,
errors, the server's peak memory (its peak resident set, VmHWM in /proc/PID/status, read at the end of
the load: start-up, index and model included), the index's patch count (from /api/index), the machine,
load averages and both commands.
The search service holds one lock around the model and the database, so searches run one at a
time: with c clients a request waits for the c - 1 ahead of it, and the median latency is about c
times the service time.

Breakdown (after the server has stopped, in this process, over --breakdown-repeats searches): the
same index opened with histo_retrieval.search.service.SearchService, whole search_upload timed, and apart:
decoding the upload, the model's forward pass on one patch, the faiss search, the patch rows read
from SQLite, and the response model built and serialised to JSON (histo_retrieval.search.app's SearchOut). They
run in a thread other than the main one, as the server runs its searches (FastAPI's thread pool);
the forward pass is also timed from the main thread, where torch runs faster. The difference
between the HTTP service time (wall / requests) and the in-process search is HTTP, multipart
parsing, the thread pool and the client threads sharing the cores.

Writes serve.md and serve.json to --out and puts the tables (command, machine, date) in
bench/results.md's "Search page under load" section (--record PATH elsewhere; --no-record: never).
Exit status 1 when any request failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.serve")

import numpy as np
import torch
from PIL import Image

from bench.timing import system_busy, write_checkpoint  # noqa: E402
from histo_retrieval.encoders.project import load_model  # noqa: E402
from histo_retrieval.evaluation.embedder import Embedder  # noqa: E402
from histo_retrieval.errors import UserError  # noqa: E402
from histo_retrieval.files import atomic_write_text, command_line  # noqa: E402
from histo_retrieval.search.indexing import Job, plan_job  # noqa: E402
from histo_retrieval.runtime import cpu_name  # noqa: E402
from histo_retrieval.search.index import IndexSettings, SlideIndex, SourceRecord  # noqa: E402
from histo_retrieval.search.slides import Tiling, open_slide  # noqa: E402
from KIMIA_data import synthetic  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Search page under load (bench/serve.py)"
MPP = 0.5  # the index's and the slides' scale: patches are read from level 0
QUERIES = 8  # distinct query patches, uploaded in turn
TISSUE_THRESHOLD = 0.5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=100_000, help="patches in the index (default: 100000)")
    parser.add_argument("--slides", type=int, default=4, help="synthetic slide files written (default: 4)")
    parser.add_argument("--slide-size", type=synthetic.parse_slide_size, default=(3072, 2048),
                        help="level-0 WIDTHxHEIGHT of each slide (default: 3072x2048)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--requests", type=int, default=400, help="searches by upload, in all (default: 400)")
    parser.add_argument("--crop-size", type=int, default=64,
                        help="model input and patch side in pixels (default: 64, to keep the model fast)")
    parser.add_argument("--model", default="se_resnet50",
                        help="architecture, with its default options (default: se_resnet50)")
    parser.add_argument("--top-k", type=int, default=10, help="matches per search, the form's top_k (default: 10)")
    parser.add_argument("--work", default=None,
                        help="new or empty folder for the checkpoint, slides, index and server logs, kept "
                             "(default: a temporary folder, deleted)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "serve"),
                        help="folder for serve.md and serve.json (default: bench/results/serve)")
    parser.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds the load may take; requests not sent by then are errors (default: 600)")
    parser.add_argument("--start-timeout", type=float, default=180.0,
                        help="seconds the server may take to answer GET /api/index (default: 180)")
    parser.add_argument("--breakdown-repeats", type=int, default=30,
                        help="in-process searches timed for the breakdown, 0 for none (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, slides and vectors (default: 0)")
    parser.add_argument("--record", default=str(REPO / "bench" / "results.md"),
                        help="Markdown file whose 'Search page under load' section gets the tables "
                             "(default: bench/results.md)")
    parser.add_argument("--no-record", action="store_true", help="do not touch --record (default: record)")
    parser.add_argument("--quick", action="store_true",
                        help="a check that it works: 2,000 patches, one 1024 px slide, 32 px crops, 2 clients, 16 "
                             "requests, 3 breakdown repeats (default: off)")
    return parser


QUICK = {"patches": 2000, "slides": 1, "slide_size": (1024, 1024), "crop_size": 32, "clients": 2, "requests": 16,
         "breakdown_repeats": 3}


def check_args(args: argparse.Namespace) -> None:
    for name in ("patches", "slides", "clients", "requests"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.crop_size < 8:
        raise UserError(f"--crop-size must be at least 8, got {args.crop_size}")
    if not 1 <= args.top_k <= 100:
        raise UserError(f"--top-k must be from 1 to 100, got {args.top_k}")
    width, height = args.slide_size
    if width < 4 * args.crop_size or height < 4 * args.crop_size:
        raise UserError(f"--slide-size {width}x{height}: too small for --crop-size {args.crop_size} patches")
    if args.work and Path(args.work).exists() and any(Path(args.work).iterdir()):
        raise UserError(f"--work {args.work}: not empty; choose a new or empty folder")


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- set-up (not timed)
def grid_boxes(width: int, height: int, side: int) -> np.ndarray:
    """Level-0 x, y, w, h of every patch of a non-overlapping grid over the slide, row by row."""
    ys, xs = np.meshgrid(np.arange(0, height - side + 1, side), np.arange(0, width - side + 1, side), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, side), np.full(xs.size, side)], 1).astype(np.int64)


def pick_queries(records: list[dict], slides_used: int, side: int,
                 rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(slide number, x, y) of QUERIES grid patches inside the slides' tissue boxes (their middle
    60%, clear of the ragged edge), slides in turn, distinct where the boxes allow."""
    chosen: list[tuple[int, int, int]] = []
    for q in range(QUERIES):
        k = q % slides_used
        regions = records[k]["regions"]
        r = regions[(q // slides_used) % len(regions)]

        def inner(start: int, size: int) -> list[int]:
            low, high = start + 0.2 * size, start + 0.8 * size
            cells = [v for v in range(0, start + size, side) if v >= low and v + side <= high]
            return cells or [int((start + size / 2) // side * side)]

        candidates = [(k, x, y) for y in inner(r["y"], r["h"]) for x in inner(r["x"], r["w"])]
        fresh = [c for c in candidates if c not in chosen] or candidates
        chosen.append(fresh[int(rng.integers(len(fresh)))])
    return chosen


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def build_index(work: Path, args: argparse.Namespace) -> dict:
    """Checkpoint, slides, index and query PNGs under `work`; what the report needs about them."""
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    checkpoint = work / f"{args.model}_MSLoss_0.5000.pth"
    write_checkpoint(checkpoint, args.model, args.crop_size, args.seed)
    loaded = load_model(checkpoint, "cpu")
    settings = IndexSettings.for_model(loaded, Tiling(MPP, loaded.crop_size, TISSUE_THRESHOLD))
    side = settings.patch_size  # level-0 pixels: the slides are scanned at the index's scale
    print(f"checkpoint: {checkpoint.name} ({settings.model_name} {settings.model_options}, crop {settings.crop_size}, "
          f"{settings.dim}-d)", flush=True)

    records = synthetic.write_slide_set(work / "slides", count=args.slides, classes=3, size=args.slide_size,
                                        mpp=MPP, seed=args.seed)
    slide_files = [work / "slides" / r["file"] for r in records]
    boxes = grid_boxes(*args.slide_size, side)
    sources = math.ceil(args.patches / len(boxes))
    slides_used = min(args.slides, sources)
    if slides_used < args.slides:
        print(f"note: {args.patches} patches fill {sources} source(s); slides {slides_used}-{args.slides - 1} "
              "are not used", flush=True)
    print(f"slides: {args.slides} of {args.slide_size[0]} x {args.slide_size[1]} px at {MPP} um/px, "
          f"{len(boxes)} grid patches each; {sources} sources", flush=True)

    # The queries: PNGs of tissue patches, embedded by the model as the server will embed them.
    tiling = Tiling(settings.mpp, settings.patch_size, settings.tissue_threshold)
    places = pick_queries(records, slides_used, side, rng)
    pngs, crops = [], []
    for k, x, y in places:
        with open_slide(slide_files[k]) as slide:
            pixels = slide.read(x, y, 0, side, side)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
        crops.append(settings.input_steps(Image.fromarray(pixels)))
    real = Embedder(loaded.model, "cpu", preprocessing=loaded.preprocessing).embed(torch.stack(crops)).float().numpy()

    info = {}  # per slide file: its size, scale, thumbnail (as index_sources records them)
    for k in range(slides_used):
        plan, _, _, _ = plan_job(Job(str(slide_files[k]), "slide"), tiling, None)
        info[k] = plan.info
    (work / "sources").mkdir()
    index_dir = work / "index"
    index = SlideIndex.create(index_dir, settings)
    queries = []
    try:
        left = args.patches
        for j in range(sources):
            k = j % slides_used
            path = work / "sources" / f"source_{j:04d}_slide_{k:03d}.tif"
            link_or_copy(slide_files[k], path)
            count = min(left, len(boxes))
            order = np.arange(len(boxes))
            own = [q for q, (slide, _, _) in enumerate(places) if slide == k] if j == k else []
            if own:  # the queries' own boxes first, so that a source cut short still holds them
                at = [int(np.flatnonzero((boxes[:, 0] == places[q][1]) & (boxes[:, 1] == places[q][2]))[0])
                      for q in own]
                order = np.concatenate([at, np.setdiff1d(order, at)])
            chosen = boxes[order[:count]]
            vectors = rng.standard_normal((count, settings.dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            for row, q in enumerate(own):
                vectors[row] = real[q]
                queries.append({"name": f"query_{q}.png", "png": pngs[q], "source": path.name,
                                "x": places[q][1], "y": places[q][2]})
            index.add(SourceRecord(path=str(path.resolve()), kind="slide", vectors=vectors, boxes=chosen,
                                   tissue=None, **info[k]))
            left -= count
    finally:
        index.close()
    queries.sort(key=lambda q: q["name"])
    seconds = time.perf_counter() - started
    print(f"index: {args.patches:,} patches in {sources} sources, built in {seconds:.0f} s ({index_dir})", flush=True)
    return {"index": index_dir, "settings": settings, "sources": sources, "queries": queries,
            "setup_seconds": seconds}


# ----------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_up(process: subprocess.Popen, base: str, timeout: float, stderr: Path) -> tuple[dict, float]:
    """The server's /api/index once it answers, and the seconds that took; UserError with its stderr if
    it exits or does not answer within `timeout`."""
    import httpx2

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise UserError(f"the server exited with status {process.returncode} before answering; its stderr:\n"
                            f"{tail(stderr)}")
        try:
            response = httpx2.get(f"{base}/api/index", timeout=5)
            if response.status_code == 200:
                return response.json(), time.perf_counter() - started
        except httpx2.HTTPError:
            pass
        time.sleep(0.25)
    raise UserError(f"the server did not answer GET /api/index within {timeout:.0f} s (--start-timeout); its "
                    f"stderr:\n{tail(stderr)}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


# ----------------------------------------------------------------------------- the load
def process_cpu(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of process `pid`, or of this process."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def peak_memory_mib(pid: int) -> float:
    """Peak resident memory of process `pid` so far (VmHWM), in MiB; nan where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def search(client, query: dict, top_k: int, timeout: float) -> dict:
    """One POST /api/search/upload: its latency, and an error or whether its first match is the query's patch."""
    started = time.perf_counter()
    try:
        response = client.post("/api/search/upload", files={"file": (query["name"], query["png"], "image/png")},
                               data={"top_k": str(top_k)}, timeout=max(1.0, timeout))
        latency = time.perf_counter() - started
        if response.status_code != 200:
            return {"latency": latency, "error": f"HTTP {response.status_code}: {response.text[:200]}"}
        body = response.json()
        matches = body.get("matches")
        if not isinstance(matches, list) or not matches:
            return {"latency": latency, "error": "no matches in the response"}
        first = matches[0]
        own = (first.get("source_name"), first.get("x"), first.get("y")) == (query["source"], query["x"], query["y"])
        return {"latency": latency, "error": None, "own_first": own, "similarity": first.get("similarity"),
                "matches": len(matches)}
    except Exception as error:  # any failure of a request counts, whatever raised it
        return {"latency": time.perf_counter() - started, "error": f"{type(error).__name__}: {error}"}


def load(base: str, queries: list[dict], args: argparse.Namespace) -> tuple[list[dict], float]:
    """--requests searches from --clients threads; (one result per request, wall seconds)."""
    import httpx2

    results: list[dict | None] = [None] * args.requests
    next_number = iter(range(args.requests))
    lock = threading.Lock()
    started = time.perf_counter()
    deadline = started + args.timeout

    def client_loop() -> None:
        with httpx2.Client(base_url=base) as client:
            while True:
                with lock:
                    number = next(next_number, None)
                if number is None:
                    return
                if time.perf_counter() >= deadline:
                    results[number] = {"latency": float("nan"), "error": "not sent: --timeout passed"}
                    continue
                results[number] = search(client, queries[number % len(queries)], args.top_k,
                                         deadline - time.perf_counter())

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.perf_counter()) + 30)
    wall = time.perf_counter() - started
    return [r or {"latency": float("nan"), "error": "no answer: the client thread hung past --timeout"}
            for r in results], wall


# ----------------------------------------------------------------------------- breakdown (in process)
def breakdown(index_dir: Path, queries: list[dict], args: argparse.Namespace) -> list[tuple[str, float]]:
    """(step, median ms) of a search by upload in this process, over --breakdown-repeats searches, run
    in a thread other than the main one as the server runs them (FastAPI's thread pool); the model's
    forward pass is timed from the main thread as well, for comparison."""
    from histo_retrieval.search.service import SearchService, check_upload
    from histo_retrieval.search.app import SearchOut

    service = SearchService.open(str(index_dir), "cpu", top_k=args.top_k)
    crop = service.index.settings.input_steps  # as an upload is cut (decode_upload)
    times: dict[str, list[float]] = {}
    failures: list[BaseException] = []

    def timed(name: str, call, *a, **kw):
        start = time.perf_counter()
        value = call(*a, **kw)
        times.setdefault(name, []).append(time.perf_counter() - start)
        return value

    def forward(image):
        return service.embedder.embed(crop(image)[None]).float().numpy()

    def searches() -> None:
        try:
            for repeat in range(args.breakdown_repeats + 1):
                query = queries[repeat % len(queries)]
                found = timed("search", service.search_upload, query["png"], query["name"], args.top_k)
                timed("response", lambda search: SearchOut.of(search, service).model_dump_json(), found)
                image = timed("decode", check_upload, query["png"], query["name"])
                vector = timed("model", forward, image)
                _, ids = timed("faiss", service.index.search, vector, args.top_k)
                timed("sqlite", service.index.patches, ids[0].tolist())
                if repeat == 0:  # a warm-up
                    times.clear()
        except BaseException as error:  # re-raised in the main thread
            failures.append(error)

    try:
        worker = threading.Thread(target=searches, name="breakdown")
        worker.start()
        worker.join()
        if failures:
            raise failures[0]
        image = check_upload(queries[0]["png"], queries[0]["name"])
        forward(image)
        for _ in range(args.breakdown_repeats):
            timed("model_main", forward, image)
    finally:
        service.close()
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    parts = ("decode", "model", "faiss", "sqlite")
    rest = median["search"] - sum(median[p] for p in parts)
    return [("SearchService.search_upload, whole", median["search"]),
            ("· decoding the upload (check_upload)", median["decode"]),
            ("· the model's forward pass on one patch (Embedder.embed)", median["model"]),
            (f"· faiss search, flat, k={args.top_k} (SlideIndex.search)", median["faiss"]),
            ("· patch rows from SQLite (PatchDatabase.patches)", median["sqlite"]),
            ("· the rest: DataLoader, ranking, JPEG preview", rest),
            ("the same forward pass from the main thread (not in the sum)", median["model_main"]),
            ("response built and serialised to JSON (SearchOut)", median["response"])]


# ----------------------------------------------------------------------------- the report
def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(args: argparse.Namespace, built: dict, summary: dict, results: list[dict], wall: float,
           warmup: dict, start_seconds: float, server_command: list[str], parts: list[tuple[str, float]],
           load_avg: tuple[float, float], cores: dict[str, float], peak_mib: float) -> tuple[dict, str]:
    ok = [r for r in results if r["error"] is None]
    errors = [r for r in results if r["error"] is not None]
    latencies = [r["latency"] * 1e3 for r in ok]
    own = sum(bool(r.get("own_first")) for r in ok)
    rps = len(ok) / wall if wall > 0 else 0.0
    settings = built["settings"]
    data = {
        "command": command_line(), "server_command": " ".join(server_command), "machine": machine(),
        "cpu": cpu_name(), "cores": os.cpu_count(), "date": datetime.date.today().isoformat(),
        "model": settings.model_name, "model_options": settings.model_options, "crop_size": settings.crop_size,
        "dim": settings.dim, "index_type": settings.index_type, "patches": summary.get("patches"),
        "sources": built["sources"], "clients": args.clients, "requests": len(results), "top_k": args.top_k,
        "ok": len(ok), "errors": len(errors), "error_messages": sorted({r["error"] for r in errors})[:10],
        "wall_s": wall, "rps": rps, "median_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
        "max_ms": max(latencies) if latencies else float("nan"),
        "service_ms": wall / len(ok) * 1e3 if ok else float("nan"),
        "own_patch_first": own, "warmup_ms": warmup["latency"] * 1e3, "server_start_s": start_seconds,
        "setup_s": built["setup_seconds"], "load_average": list(load_avg), "cpu_cores": cores,
        "breakdown_ms": dict(parts), "latencies_ms": latencies, "server_peak_mib": peak_mib}
    table = ("| patches | clients | requests | errors | requests/s | median ms | p95 ms | max ms | server peak MiB |\n"
             "|---|---|---|---|---|---|---|---|---|\n"
             f"| {data['patches']:,} | {args.clients} | {len(results)} | {len(errors)} | {rps:.1f} | "
             f"{data['median_ms']:.0f} | {data['p95_ms']:.0f} | {data['max_ms']:.0f} | {peak_mib:.0f} |\n")
    lines = [
        f"POST /api/search/upload against `{data['server_command']}`: {data['patches']:,} patches in "
        f"{built['sources']} sources ({settings.model_name} {settings.model_options}, randomly initialised, "
        f"crop {settings.crop_size} px, not the paper's 224; {settings.dim}-d random unit vectors but for the "
        f"queries' own patches, flat faiss index), {len(built['queries'])} query PNGs of {settings.patch_size} px "
        f"uploaded in turn, top_k {args.top_k}, {args.clients} concurrent clients (threads, httpx2) on the same "
        f"machine; load average {load_avg[0]:.1f} at the start, {load_avg[1]:.1f} at the end, on "
        f"{os.cpu_count()} cores.",
        "",
        table,
        f"Service time (wall / requests, searches run one at a time): {data['service_ms']:.1f} ms; the first "
        f"search (warm-up, not counted) {data['warmup_ms']:.0f} ms; the server answered {start_seconds:.1f} s "
        f"after it started; set-up {built['setup_seconds']:.0f} s. The query's own patch ranked first in "
        f"{own} of {len(ok)} responses. During the load the server used {cores['server']:.2f} cores, the client "
        f"threads {cores['clients']:.2f}, other programs {cores['other']:.2f} (of {os.cpu_count()})."
        + (f" Errors: {'; '.join(data['error_messages'])}" if errors else ""),
    ]
    if parts:
        lines += ["", f"Where a search's time goes (this process, the server stopped, median of "
                      f"{args.breakdown_repeats}, in a thread other than the main one as in the server):", "",
                  "| step | ms |", "|---|---|"]
        lines += [f"| {name} | {ms:.2f} |" for name, ms in parts]
        overhead = data["service_ms"] - parts[0][1] - parts[-1][1]
        noise = " (within the noise of the two measurements)" if abs(overhead) < 0.05 * data["service_ms"] else ""
        lines += ["", f"The HTTP service time less the in-process search and response, i.e. HTTP, multipart parsing, "
                      f"the thread pool and the clients sharing the cores: {overhead:.1f} ms per request{noise}."]
    return data, "\n".join(lines) + "\n"


def record(path: str, text: str, section_title: str = SECTION) -> None:
    """Put `text` under `section_title` in the Markdown file `path`, replacing that section's old text."""
    old = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    stamp = f"Command: `{command_line()}` on {machine()}, {datetime.date.today().isoformat()}\n\n"
    section = f"{section_title}\n\n{stamp}{text}"
    pattern = re.compile(rf"^{re.escape(section_title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = pattern.sub(lambda _: section + "\n", old) if pattern.search(old) else \
        (old.rstrip("\n") + "\n\n" if old.strip() else "") + section
    atomic_write_text(path, new)
    print(f"recorded in {path}")


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace, work: Path) -> tuple[dict, str]:
    load_before = os.getloadavg()[0]
    built = build_index(work, args)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(REPO / "retrieve.py"), "serve", "--index", str(built["index"]), "--host",
               "127.0.0.1", "--port", str(port), "--device", "cpu"]
    shown = ["python3", "retrieve.py", *command[2:]]
    stdout, stderr = work / "server.stdout", work / "server.stderr"
    print(f"starting: {' '.join(shown)}", flush=True)
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        summary, start_seconds = wait_until_up(process, base, args.start_timeout, stderr)
        print(f"server up in {start_seconds:.1f} s: {summary['patches']:,} patches, {summary['slides']} slides",
              flush=True)
        import httpx2
        with httpx2.Client(base_url=base) as client:
            warmup = search(client, built["queries"][0], args.top_k, args.start_timeout)
        if warmup["error"]:
            raise UserError(f"the first search failed: {warmup['error']}; the server's stderr:\n{tail(stderr)}")
        print(f"warm-up search: {warmup['latency'] * 1e3:.0f} ms; {args.requests} searches from {args.clients} "
              "clients ...", flush=True)
        before = (process_cpu(process.pid), process_cpu(), system_busy())
        results, wall = load(base, built["queries"], args)
        server, clients, busy = (b - a for a, b in zip(before, (process_cpu(process.pid), process_cpu(),
                                                                 system_busy())))
        cores = {"server": server / wall, "clients": clients / wall,
                 "other": max(0.0, busy - server - clients) / wall}
        peak_mib = peak_memory_mib(process.pid)  # while it runs: /proc forgets a process once it has exited
    finally:
        stop(process)
    if process.returncode not in (0, -signal.SIGTERM):
        print(f"note: the server exited with status {process.returncode}; its stderr:\n{tail(stderr)}", flush=True)
    load_after = os.getloadavg()[0]
    parts = breakdown(built["index"], built["queries"], args) if args.breakdown_repeats > 0 else []
    data, text = report(args, built, summary, results, wall, warmup, start_seconds, shown, parts,
                        (load_before, load_after), cores, peak_mib)
    return data, text


def main(argv: list[str] | None = None) -> list[dict]:
    """Run, write --out, record; returns the rows for bench/run_all.py (each with the error count)."""
    args = get_args_parser().parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    check_args(args)
    started = time.perf_counter()
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        data, text = run(args, work.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
            data, text = run(args, Path(folder))
    data["total_s"] = time.perf_counter() - started
    print("\n" + text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"Command: `{data['command']}` on {data['machine']}, {data['date']}\n\n"
    atomic_write_text(out / "serve.md", f"{SECTION}\n\n{stamp}{text}")
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()}
    atomic_write_text(out / "serve.json", json.dumps(finite, indent=1) + "\n")
    print(f"written: {out / 'serve.md'}, {out / 'serve.json'} (the bench took {data['total_s']:.0f} s)")
    if not args.no_record:
        record(args.record, text)
    case = f"POST /api/search/upload, {data['patches']:,} patches, {args.clients} clients, crop {args.crop_size}"
    rows = [{"benchmark": "serve", "case": case, "ours": round(data["rps"], 1), "unit": "requests/s",
             "errors": data["errors"]},
            {"benchmark": "serve", "case": case + ", median latency", "ours": round(data["median_ms"]),
             "unit": "ms", "errors": data["errors"]},
            {"benchmark": "serve", "case": case + ", p95 latency", "ours": round(data["p95_ms"]), "unit": "ms",
             "errors": data["errors"]}]
    if data["errors"]:
        print(f"FAILED: {data['errors']} of {data['requests']} requests failed", file=sys.stderr)
    return rows


if __name__ == "__main__":
    try:
        sys.exit(1 if main()[0]["errors"] else 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
