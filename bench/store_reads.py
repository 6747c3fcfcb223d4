"""Re-ranking's reads from a vector store whose pages are not in memory (a store larger than RAM, or a
fresh machine): through a plain map, where the kernel reads ahead around every row, and through the
map advised MADV_RANDOM that histo_retrieval.search.vector_store uses for rows read far apart.

    python3 -m bench.store_reads            # 2,000,000 vectors of 512 float16 (2 GB of disk; a few minutes)
    python3 -m bench.store_reads --quick    # 100,000 vectors (seconds)

Data: bench/archive_scale.py's archive (clustered vectors over --slides slide records) of --rows
vectors in a new index folder in --work. Each of --queries reads gets --reads patch ids drawn at
random (a 10-patch query re-ranking its best 100 each reads 1,000), and reads them twice, once per
map, in a freshly opened read-only index (SlideIndex.open, as `retrieve.py query` opens it) after
the store's chunk files were dropped from the page cache (posix_fadvise POSIX_FADV_DONTNEED; the
index's SQLite record stays cached). Measured: wall time of SlideIndex.vectors_of and the bytes the
process read from the disk meanwhile (/proc/self/io read_bytes); both reads must give the same rows.
The plain map is the same store with scattered_gap_bytes set to infinity. Linux only.

Writes the table (command, machine, date, load, the disk's read_ahead_kb) to bench/results.md's
"Store reads on a cold cache" section (--record PATH elsewhere; --no-record or --quick without
--record: never); main() returns the rows.
Exit status 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.store_reads")

import numpy as np

from bench import archive_scale
from bench.timing import apply_quick_defaults, load_note, print_and_record
from histo_retrieval.errors import UserError, run_script
from histo_retrieval.search.index import SlideIndex
from histo_retrieval.search.vector_store import DTYPES, SCATTERED_GAP_BYTES

SECTION = "## Store reads on a cold cache (bench/store_reads.py)"
MAPS = {"plain map (the kernel's read-around)": math.inf,
        "advised MADV_RANDOM (the store's, rows far apart)": SCATTERED_GAP_BYTES}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="vectors in the store (default: %(default)s)")
    parser.add_argument("--slides", type=int, default=2000, help="slide records they belong to (default: %(default)s)")
    parser.add_argument("--vector-dtype", default="float16", choices=DTYPES,
                        help="dtype of the stored vectors (default: %(default)s)")
    parser.add_argument("--reads", type=int, default=1000,
                        help="patch ids read at a time, as one query's re-ranking reads them (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=10, help="reads timed per map (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the ids (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="--rows 100000 --slides 100 --reads 200 --queries 3 unless given; recorded only "
                             "with --record (default: off)")
    parser.add_argument("--work", default=None,
                        help="folder for the index folder, kept (default: a temporary one, removed at the end)")
    parser.add_argument("--record", default=None, help="Markdown file for the table (default: bench/results.md)")
    parser.add_argument("--no-record", action="store_true", help="write the table nowhere (default: off)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    apply_quick_defaults(args, get_args_parser(), {"rows": 100_000, "slides": 100, "reads": 200, "queries": 3})
    for name in ("rows", "slides", "reads", "queries"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.rows < args.slides:
        raise UserError(f"--rows {args.rows}, --slides {args.slides}: the rows must be at least the slides")
    if not Path("/proc/self/io").exists() or not hasattr(os, "posix_fadvise"):
        raise UserError("bench.store_reads reads Linux's /proc/self/io and drops pages with posix_fadvise: run it on Linux")
    if args.work and Path(args.work).exists() and any(Path(args.work).iterdir()):
        raise UserError(f"--work {args.work}: not empty; choose a new or empty folder")


def write_store(directory: Path, args: argparse.Namespace) -> None:
    """bench/archive_scale.py's archive of args.rows vectors, in a new index folder."""
    scale = archive_scale.get_args_parser().parse_args(
        ["--sizes", str(args.rows), "--slides", str(args.slides), "--vector-dtype", args.vector_dtype,
         "--seed", str(args.seed), "--centres", "100", "--no-record"])
    archive_scale.check_args(scale)
    archive_scale.write_archive(directory, args.rows, scale, archive_scale.mixture(scale))
    os.sync()  # written pages are clean, so that dropping them from the page cache drops them


def drop_from_page_cache(directory: Path) -> None:
    for path in (directory / "vectors").glob("*.vec"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_bytes() -> int:
    with open("/proc/self/io", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def cold_read(directory: Path, ids: np.ndarray, gap_bytes: float) -> tuple[float, int, np.ndarray]:
    """(seconds, bytes read from disk, rows) of reading `ids` from a freshly opened index whose
    store pages were dropped, with the store's scattered_gap_bytes at `gap_bytes`."""
    gc.collect()  # unmap the previous index's chunks: the kernel keeps mapped pages
    with SlideIndex.open(directory) as index:
        index.store.scattered_gap_bytes = gap_bytes
        index.store.live_rows()  # the id map, from the record, before the clock starts
        drop_from_page_cache(directory)
        before, started = disk_read_bytes(), time.perf_counter()
        rows = index.vectors_of(ids)
        return time.perf_counter() - started, disk_read_bytes() - before, rows


def read_ahead_kb(directory: Path) -> str:
    """The read_ahead_kb of the block device holding `directory` (what a plain map's fault reads around)."""
    device = os.stat(directory).st_dev
    for path in (Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/queue/read_ahead_kb"),
                 Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/../queue/read_ahead_kb")):
        if path.exists():
            return f"{path.read_text().strip()} KiB"
    return "unknown"


def measure(directory: Path, args: argparse.Namespace) -> list[dict]:
    with SlideIndex.open(directory) as index:
        live = index.store.spread_ids(index.store.live_rows())
    rng = np.random.default_rng(args.seed + 1)
    times: dict[str, list[float]] = {name: [] for name in MAPS}
    read: dict[str, list[int]] = {name: [] for name in MAPS}
    for query in range(args.queries):
        ids = np.sort(rng.choice(live, size=min(args.reads, len(live)), replace=False))
        rows = {}
        for name, gap in MAPS.items():
            seconds, disk, rows[name] = cold_read(directory, ids, gap)
            times[name].append(seconds)
            read[name].append(disk)
        first, *others = rows.values()
        if any(not np.array_equal(first, other) for other in others):
            raise RuntimeError(f"read {query}: the two maps gave different rows")
        print(f"read {query + 1}/{args.queries}: " + ", ".join(
            f"{name.split(' (')[0]} {times[name][-1] * 1000:.0f} ms, {read[name][-1] / 2 ** 20:.1f} MiB"
            for name in MAPS), flush=True)
    return [{"map": name, "median_ms": statistics.median(times[name]) * 1000,
             "max_ms": max(times[name]) * 1000, "read_mib": statistics.median(read[name]) / 2 ** 20,
             "rows": min(args.reads, len(live))} for name in MAPS]


def report(rows: list[dict], args: argparse.Namespace, directory: Path, load: tuple[float, float]) -> str:
    from bench.search_speed import machine

    lines = ["| map of the store | read of the rows: median ms | slowest ms | read from disk: median MiB | "
             "disk bytes per row |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['map']} | {row['median_ms']:.0f} | {row['max_ms']:.0f} | {row['read_mib']:.1f} | "
                     f"{row['read_mib'] * 2 ** 20 / row['rows']:,.0f} |")
    plain, advised = rows
    row_bytes = 512 * np.dtype(args.vector_dtype).itemsize
    return "\n".join(lines) + "\n\n" + (
        f"{args.queries} reads of {plain['rows']:,} random patch ids each (a 10-patch query re-ranking its best "
        f"100 a patch reads 1,000) from a store of {args.rows:,} vectors of {row_bytes:,} bytes ({args.vector_dtype}), "
        f"its pages dropped from the page cache before each read. The advised map read "
        f"{plain['read_mib'] / max(advised['read_mib'], 1e-9):.0f}x fewer bytes, "
        f"{plain['median_ms'] / max(advised['median_ms'], 1e-9):.1f}x faster (median). The disk's read_ahead_kb: "
        f"{read_ahead_kb(directory)}. {machine()}. {load_note(load)}\n")


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="store_reads_"))
    try:
        directory = work / f"store_{args.rows}"
        print(f"writing {args.rows:,} vectors to {directory} ...", flush=True)
        write_store(directory, args)
        load_before = os.getloadavg()[0]
        rows = measure(directory, args)
        text = report(rows, args, directory, (load_before, os.getloadavg()[0]))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_and_record(args, text, SECTION)
    return rows


if __name__ == "__main__":
    sys.exit(run_script(main, None))
