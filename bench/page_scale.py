"""The search page at archive size: its first load and a name search over 10 and 100,000 slide records.

    python3 -m bench.page_scale                      # 10 and 100,000 records, 5 repeats each (a few minutes on 2 cores)
    python3 -m bench.page_scale --sizes 10 1000 --repeats 2 --no-browser

Set-up (timed apart, not part of the figures), per --sizes N, in a temporary folder or --work DIR: an
index of N slide records written by write_records (records only: no slide file exists; each record has
--patches patches with random unit vectors of the colour histogram's 64 dimensions, and one small shared
thumbnail), then `python3 retrieve.py serve --index DIR` as a subprocess, as a user starts it.

Measured, --repeats times each, the median reported:
- the API calls the page makes at start: GET /api/index and GET /api/slides?kind=slide&offset=0&limit=100
  (the first page of the list), and a name search, GET /api/slides?kind=slide&q=NAME&limit=100 with the
  name of the last slide (one match, found by scanning every record's name);
- in Debian's Chromium through Playwright (unless --no-browser, or when either is missing: said so in
  the output): the page's first load, from navigation to the first slide card in the list with its
  thumbnail decoded, and a name search, from typing the last slide's name into the filter to the list
  showing that one slide (the page waits FILTER_DELAY_MS = 250 ms after typing before it asks: included).

Writes the table (command, machine, date, the load average at the start and the end) to bench/results.md's "Search page at archive size" section
(--record PATH elsewhere; --no-record: never). Exit status 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.page_scale")

import numpy as np
from PIL import Image

from bench.serve import free_port, machine, record, stop, tail, wait_until_up  # noqa: E402
from bench.timing import load_note  # noqa: E402
from histo_retrieval.encoders.registry import load_encoder  # noqa: E402
from histo_retrieval.errors import UserError, run_script  # noqa: E402
from histo_retrieval.search.index import IndexSettings, SlideIndex, SourceRecord  # noqa: E402
from histo_retrieval.search.slides import Tiling  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Search page at archive size (bench/page_scale.py)"
BINS = 4  # the colour histogram's bins per channel: 64-d vectors keep 100,000 records' vectors small
SLIDE_SIZE = (40_000, 30_000)  # level-0 pixels each record claims
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def record_name(number: int) -> str:
    return f"slide_{number:06d}.svs"


def write_records(directory: str | os.PathLike, count: int, patches: int = 3, seed: int = 0,
                  folder: str = "/archive/slides") -> Path:
    """A new index at `directory` holding `count` slide records (`folder`/slide_000000.svs, ...) of
    `patches` patches each, with random unit vectors of the colour histogram's BINS**3 dimensions and
    one small shared thumbnail, written by PatchDatabase.add_sources in one transaction (100,000 records take seconds).
    Records only: the slide files do not exist, so tiles and region searches of them answer 404, but
    the list, counts, thumbnails and searches by vector work."""
    encoder = load_encoder("histogram", "cpu", options={"bins": BINS})
    settings = IndexSettings.for_model(encoder, Tiling(0.5, 224, 0.5))
    index = SlideIndex.create(directory, settings)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (214, 160, 190)).save(buffer, "JPEG", quality=70)
    thumbnail = buffer.getvalue()
    rng = np.random.default_rng(seed)
    boxes = np.array([[448 * j, 0, 448, 448] for j in range(patches)], dtype=np.int64).reshape(-1, 4)

    def vectors() -> np.ndarray:
        block = rng.standard_normal((patches, settings.dim)).astype(np.float32)
        return block / np.linalg.norm(block, axis=1, keepdims=True)

    records = [SourceRecord(path=f"{folder}/{record_name(i)}", kind="slide", vectors=vectors(), boxes=boxes,
                            tissue=np.ones(patches, np.float32), file_size=1, mtime=0.0, width=SLIDE_SIZE[0],
                            height=SLIDE_SIZE[1], slide_mpp=0.25, backend="openslide", thumbnail=thumbnail,
                            thumbnail_downsample=625.0) for i in range(count)]
    try:
        index.db.add_sources(records, "bench")
    finally:
        index.close()
    return Path(directory)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100_000],
                        help="slide records in each index measured (default: %(default)s)")
    parser.add_argument("--patches", type=int, default=3, help="patches per record (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="times each step is measured (default: %(default)s)")
    parser.add_argument("--no-browser", action="store_true",
                        help="measure the API calls only, not the page in Chromium (default: off)")
    parser.add_argument("--start-timeout", type=float, default=300,
                        help="seconds the server may take to answer (default: %(default)s)")
    parser.add_argument("--work", default=None, help="folder for the indexes (default: a temporary one, removed)")
    parser.add_argument("--record", default=str(REPO / "bench" / "results.md"),
                        help="Markdown file whose section gets the table (default: bench/results.md)")
    parser.add_argument("--no-record", action="store_true", help="write the table nowhere (default: off)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not args.sizes or min(args.sizes) < 1:
        raise UserError(f"--sizes {args.sizes}: each must be at least 1")
    if args.patches < 1 or args.repeats < 1:
        raise UserError(f"--patches {args.patches}, --repeats {args.repeats}: each must be at least 1")
    if args.work and Path(args.work).exists() and any(Path(args.work).iterdir()):
        raise UserError(f"--work {args.work}: not empty; choose a new or empty folder")


def median_ms(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def browser_or_reason():
    """(a launcher of Chromium through Playwright, None) or (None, why the page is not measured)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None, "Playwright is not installed"
    if chromium is None:
        return None, "no Chromium"
    return (sync_playwright, chromium), None


def measure_page(base: str, last: str, repeats: int, launcher) -> tuple[float, float]:
    """Median ms of the page's first load (to the first slide card with its thumbnail) and of a name search."""
    sync_playwright, chromium = launcher
    loads, searches = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            for _ in range(repeats):
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                started = time.perf_counter()
                page.goto(base + "/")
                page.wait_for_function("() => { const i = document.querySelector('#slide-list li a img'); "
                                       "return i && i.complete && i.naturalWidth > 0; }", timeout=120_000)
                loads.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                page.fill("#filter", last)
                page.wait_for_function("name => { const a = document.querySelectorAll('#slide-list li a'); "
                                       "return a.length === 1 && a[0].textContent.startsWith(name); }", arg=last,
                                       timeout=120_000)
                searches.append((time.perf_counter() - started) * 1000)
                context.close()
        finally:
            browser.close()
    return statistics.median(loads), statistics.median(searches)


def measure(size: int, work: Path, args: argparse.Namespace, launcher) -> dict:
    import httpx2

    started = time.perf_counter()
    index = write_records(work / f"index_{size}", size, args.patches)
    written = time.perf_counter() - started
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stderr = work / f"serve_{size}.log"
    with open(stderr, "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "retrieve.py"), "serve", "--index", str(index),
                                    "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        summary, up = wait_until_up(process, base, args.start_timeout, stderr)
        if summary["slides"] != size:
            raise UserError(f"/api/index counts {summary['slides']} slides, {size} were written")
        last = record_name(size - 1).rsplit(".", 1)[0]
        with httpx2.Client(base_url=base, timeout=120) as client:
            def get(url: str, expected: int | None = None) -> None:
                response = client.get(url)
                if response.status_code != 200 or (expected is not None and len(response.json()) != expected):
                    raise UserError(f"GET {url}: {response.status_code} {response.text[:300]}; server log:\n"
                                    f"{tail(stderr)}")

            row = {"size": size, "written_s": written, "server_up_s": up,
                   "index_ms": median_ms(lambda: get("/api/index"), args.repeats),
                   "first_page_ms": median_ms(lambda: get("/api/slides?kind=slide&offset=0&limit=100",
                                                          min(size, 100)), args.repeats),
                   "search_api_ms": median_ms(lambda: get(f"/api/slides?kind=slide&q={last}&limit=100", 1),
                                              args.repeats)}
        if launcher is not None:
            row["page_load_ms"], row["page_search_ms"] = measure_page(base, last, args.repeats, launcher)
        return row
    finally:
        stop(process)


def report(rows: list[dict], args: argparse.Namespace, browser_note: str | None,
           load: tuple[float, float] = (0.0, 0.0)) -> str:
    lines = ["| slide records | GET /api/index | GET /api/slides, first page (100) | name search, API | "
             "page: first load to the first slide card | page: name search typed to its one result | "
             "set-up: records written, server up |", "|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        page = (f"{row['page_load_ms']:.0f} ms", f"{row['page_search_ms']:.0f} ms") if "page_load_ms" in row \
            else ("not measured", "not measured")
        lines.append(f"| {row['size']:,} | {row['index_ms']:.1f} ms | {row['first_page_ms']:.1f} ms | "
                     f"{row['search_api_ms']:.1f} ms | {page[0]} | {page[1]} | {row['written_s']:.1f} s, "
                     f"{row['server_up_s']:.1f} s |")
    lines += ["", f"Medians of {args.repeats} runs; {args.patches} patches a record. The page's name search includes "
              "the page's 250 ms typing pause before it asks the server."]
    if browser_note:
        lines.append(f"The page itself was not measured: {browser_note}.")
    lines.append(load_note(load))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    launcher, note = (None, "--no-browser") if args.no_browser else browser_or_reason()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="page_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    try:
        rows = [measure(size, work, args, launcher) for size in args.sizes]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = report(rows, args, note, (load_before, os.getloadavg()[0]))
    print(f"machine: {machine()}\n\n{text}")
    if not args.no_record:
        record(args.record, text, SECTION)
    return rows


if __name__ == "__main__":
    sys.exit(run_script(main, None))
