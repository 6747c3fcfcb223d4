"""faiss's k-means and flat search on the BLAS kernels its own OpenBLAS picks, and on the ones
histo_retrieval.search.openblas chooses from the CPU's flags.

    python3 -m bench.blas_kernels            # about a minute on 2 cores
    python3 -m bench.blas_kernels --quick    # a few seconds

Two fresh processes, alike but for the order of two imports:
- "OpenBLAS's own": imports faiss first, with OPENBLAS_CORETYPE unset, so OpenBLAS picks by the CPU's
  model name (a virtual machine's CPU it does not know gets the generic Prescott kernels);
- "histo_retrieval's": imports histo_retrieval.search first, which sets OPENBLAS_CORETYPE from the
  CPU's flags (unless already set), as every script of the project does.

Each prints the kernels OpenBLAS loaded (OPENBLAS_VERBOSE=2), then times, on random vectors of --dim
dimensions: a flat inner-product search of --queries vectors against --lists centroids for the best
one (the assignment step of k-means and of adding to an IVF index), and an IVF index of --vectors
vectors built as the index builds one: its k-means (vector_index.new_vector_index on the training
sample of train_sample_size), then add_vectors. IVF-PQ's coarse k-means and adding are the same; its
sub-quantizers' k-means, on 8 dimensions at a time, gain little from BLAS. The best of --repeats runs
is kept.

Writes the table (command, machine, date, load) to bench/results.md's "faiss's BLAS kernels" section
(--record PATH elsewhere; --no-record or --quick without --record: never); main() returns the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.blas_kernels")

from bench.timing import apply_quick_defaults, load_note, print_and_record
from histo_retrieval.errors import UserError, run_script

REPO = Path(__file__).resolve().parent.parent
SECTION = "## faiss's BLAS kernels (bench/blas_kernels.py)"
ORDERS = {"OpenBLAS's own": "import faiss\nimport histo_retrieval.search\n",
          "histo_retrieval's": "import histo_retrieval.search\nimport faiss\n"}
WORK = """
import json, time
import numpy as np
from histo_retrieval.search import vector_index
spec = json.loads({spec!r})
rng = np.random.default_rng(0)
def unit(n):
    rows = rng.standard_normal((n, spec["dim"]), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)
queries, centroids, vectors = unit(spec["queries"]), unit(spec["lists"]), unit(spec["vectors"])
flat = faiss.IndexFlatIP(spec["dim"])
flat.add(centroids)
times = {{"search": [], "train": [], "add": []}}
for _ in range(spec["repeats"]):
    started = time.perf_counter()
    flat.search(queries, 1)
    times["search"].append(time.perf_counter() - started)
    started = time.perf_counter()
    lists = vector_index.default_ivf_lists(len(vectors))
    sample = vectors[:vector_index.train_sample_size(len(vectors), lists)]
    index = vector_index.new_vector_index("ivf", spec["dim"], sample, lists)
    times["train"].append(time.perf_counter() - started)
    started = time.perf_counter()
    vector_index.add_vectors(index, vectors, np.arange(len(vectors)))
    times["add"].append(time.perf_counter() - started)
print("RESULT " + json.dumps({{"lists": lists, "times": times}}))
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512, help="vector dimension (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=50_000, help="vectors searched in the flat search (default: %(default)s)")
    parser.add_argument("--lists", type=int, default=4000, help="centroids of the flat search (default: %(default)s)")
    parser.add_argument("--vectors", type=int, default=100_000, help="vectors of the IVF index (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, the best kept (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="--queries 5000 --lists 500 --vectors 20000 --repeats 1 unless given (default: off)")
    parser.add_argument("--record", default=None, help="Markdown file for the table (default: bench/results.md)")
    parser.add_argument("--no-record", action="store_true", help="write the table nowhere (default: off)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    apply_quick_defaults(args, get_args_parser(), {"queries": 5000, "lists": 500, "vectors": 20_000, "repeats": 1})
    for name in ("dim", "queries", "lists", "vectors", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")


def measure(order: str, args: argparse.Namespace) -> dict:
    """One child process: the kernels its faiss loaded and its timings."""
    spec = json.dumps({name: getattr(args, name) for name in ("dim", "queries", "lists", "vectors", "repeats")})
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_CORETYPE"}
    env["OPENBLAS_VERBOSE"] = "2"
    result = subprocess.run([sys.executable, "-c", ORDERS[order] + WORK.format(spec=spec)], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {order} process failed:\n{result.stderr[-3000:]}")
    printed = (result.stdout + result.stderr).splitlines()
    cores = [line.split(":", 1)[1].strip() for line in printed if line.startswith("Core:")]
    found = json.loads(next(line for line in printed if line.startswith("RESULT "))[len("RESULT "):])
    return {"order": order, "kernels": cores[-1] if cores else "not printed", "lists": found["lists"],
            **{name: min(times) for name, times in found["times"].items()}}


def report(rows: list[dict], args: argparse.Namespace, load: tuple[float, float]) -> str:
    from bench.search_speed import machine  # imports faiss: only after the children have run

    lines = ["| kernels chosen by | faiss's OpenBLAS kernels | flat search, best centroid: s | IVF k-means: s | "
             "IVF add: s |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['order']} | {row['kernels']} | {row['search']:.2f} | {row['train']:.1f} | {row['add']:.1f} |")
    own, chosen = rows
    return "\n".join(lines) + "\n\n" + (
        f"Speed-up: {own['search'] / chosen['search']:.1f}x on the flat search, {own['train'] / chosen['train']:.1f}x "
        f"on the k-means, {own['add'] / chosen['add']:.1f}x on adding. Flat search: {args.queries:,} random unit vectors of "
        f"{args.dim} dimensions against {args.lists:,} centroids, k=1. IVF: {args.vectors:,} vectors, "
        f"{chosen['lists']:,} lists, k-means on vector_index's training sample. Best of {args.repeats}. "
        f"{machine()}. {load_note(load)}\n")


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    load_before = os.getloadavg()[0]
    rows = []
    for order in ORDERS:
        print(f"{order} kernels ...", flush=True)
        rows.append(measure(order, args))
    text = report(rows, args, (load_before, os.getloadavg()[0]))
    print_and_record(args, text, SECTION)
    return rows


if __name__ == "__main__":
    sys.exit(run_script(main, None))
