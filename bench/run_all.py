"""Run every benchmark and print one Markdown table for the README.

    python3 -m bench.run_all [--quick] [--out bench/results.md]

Each bench/<name>.py has `main(argv) -> list[dict]` whose rows hold `benchmark`, `case`, `ours`,
`baseline`, `unit` and `speedup` (plus anything else); this script runs them in turn on this
machine and writes the table with the machine's CPU and GPU names.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.run_all")

import torch

from histo_retrieval.files import atomic_write_text, command_line  # noqa: E402
from histo_retrieval.runtime import cpu_name, cpu_runs_natively  # noqa: E402

# --only name -> the module under bench/
BENCHMARKS = {"data_process": "data_process_speed", "losses": "loss_speed", "models": "model_speed", "evaluate": "evaluate_speed",
              "evaluate_memory": "evaluate_memory", "index": "index_speed", "vector_search": "search_speed",
              "serve": "serve"}


def machine_description() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    native = "with" if cpu_runs_natively(torch.bfloat16) else "without"
    return f"{cpu_name()} ({native} native bfloat16), {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def format_table(rows: list[dict]) -> str:
    header = "| benchmark | case | ours | baseline | unit | speed-up |\n|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['benchmark']} | {r['case']} | {r['ours']} | {r.get('baseline', '')} | {r['unit']} | {r.get('speedup', '')} |\n"
        for r in rows)
    return header + body


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smallest settings of every benchmark (default: off)")
    parser.add_argument("--only", nargs="+", choices=tuple(BENCHMARKS), default=list(BENCHMARKS),
                        help="benchmarks to run (default: all)")
    parser.add_argument("--out", default="bench/results.md", help="Markdown file to write (default: bench/results.md)")
    args = parser.parse_args(argv)

    rows: list[dict] = []
    for name in args.only:
        started = time.time()
        module = BENCHMARKS[name]
        print(f"--- python3 -m bench.{module}", flush=True)
        rows += importlib.import_module(f"bench.{module}").main(["--quick"] if args.quick else [])
        print(f"--- bench.{module} took {time.time() - started:.0f} s", flush=True)
    text = f"Machine: {machine_description()}\n\nCommand: `{command_line()}`\n\n{format_table(rows)}"
    # Keep the "## ..." sections that benchmarks record below the table (index_speed, search_speed, serve).
    old = Path(args.out).read_text(encoding="utf-8") if Path(args.out).exists() else ""
    sections = old[old.index("\n## "):] if "\n## " in old else ""
    atomic_write_text(args.out, text + sections)
    print(text)
    return text


if __name__ == "__main__":
    main()
