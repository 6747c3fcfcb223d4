"""Speed of KIMIA_data/data_process.py against the reference's preprocessing script, as whole commands.

Builds 1000x1000 JPEG patches (the synthetic generator's RGB release, laid out like Kimia Path24's)
in a temporary folder, or takes --source, then times on the same images, each as its own process
with its start-up (Python, imports, threads) included:
  (a) the reference script (REFERENCE_SCRIPT below, run with python3 -c): os.walk, cv2.imread,
      cv2.resize(300x300, INTER_CUBIC), cv2.imwrite, one process;
  (b) python3 KIMIA_data/data_process.py with its defaults (--resize reference, a thread per CPU);
  (c) the same with --workers 1, and with --resize antialias, for the record.
Every command runs --repeats times, interleaved, into emptied output folders; (b) must write the
same files, byte for byte, as (a). Prints a Markdown table: median seconds, the speed-up over (a)
per repeat (median, min-max), CPU seconds, and the load average: other processes sharing the CPUs
slow the threads of (b) more than the single process of (a), while CPU seconds hardly change.

    python3 -m bench.data_process_speed [--count 600] [--patch-size 1000] [--repeats 3] [--source DIR] [--quick]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.data_process_speed")

from KIMIA_data import synthetic  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "KIMIA_data" / "data_process.py"
IMAGES_PER_CLASS = 25
SPLIT_FOLDERS = (("train", "Training"), ("test", "RGBPatches-test"))

# The reference's KIMIA_data/data_process.py: argv is SOURCE OUT SIZE.
REFERENCE_SCRIPT = """
import os, sys
import cv2
source, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
for split, folder in (("train", "Training"), ("test", "RGBPatches-test")):
    for root, dirs, files in os.walk(os.path.join(source, folder)):
        class_name = os.path.basename(root)
        target = os.path.join(out, split, class_name)
        if files:
            os.makedirs(target, exist_ok=True)
        for name in files:
            img = cv2.imread(os.path.join(root, name))
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(os.path.join(target, class_name + "_" + os.path.splitext(name)[0] + ".png"), img)
"""


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of `command` as a new process; raises with its error output when it fails.

    CPU seconds hardly change with the load of other processes; wall seconds do."""
    cpu, start = _children_cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, _children_cpu_seconds() - cpu


def images_under(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for split, _ in SPLIT_FOLDERS
            for p in sorted((out / split).glob("*/*.png"))}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time data_process.py against the reference script, as whole "
                                                 "commands.")
    parser.add_argument("--count", type=int, default=600,
                        help="number of JPEG inputs to generate, about (default: 600)")
    parser.add_argument("--patch-size", type=int, default=1000,
                        help="side of the generated inputs in px (default: 1000)")
    parser.add_argument("--size", type=int, default=300, help="output side in px (default: 300)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every command (default: 3)")
    parser.add_argument("--source", default=None,
                        help="an RGB folder release (Training/, RGBPatches-test/) to time on instead of generated "
                             "images (default: generate them)")
    parser.add_argument("--quick", action="store_true",
                        help="24 images of 200 px, one repeat, to check that it runs (default: off)")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    count, patch_size, repeats = (24, 200, 1) if args.quick else (args.count, args.patch_size, args.repeats)
    if repeats < 1 or count < 1:
        parser.error("--repeats and --count must be at least 1")
    if args.source and not all((Path(args.source) / folder).is_dir() for _, folder in SPLIT_FOLDERS):
        parser.error(f"--source {args.source}: no Training/ and RGBPatches-test/ folders; pass an RGB folder "
                     "release or leave --source out")
    with tempfile.TemporaryDirectory(prefix="bench_data_process_") as tmp:
        if args.source:
            source = Path(args.source).resolve()
        else:
            source = Path(tmp) / "source"
            classes = max(1, min(synthetic.MAX_CLASSES, round(count / IMAGES_PER_CLASS)))
            per_class = max(2, round(count / classes))
            synthetic.make_rgb_release(source, num_classes=classes, patch_size=patch_size,
                                       train_per_class=per_class - 1, test_per_class=1, seed=0)
        ours = [sys.executable, str(SCRIPT), str(source), "--size", str(args.size), "--out"]
        commands = {  # name: command without its output folder
            "reference script (cv2, 1 process)": [sys.executable, "-c", REFERENCE_SCRIPT, str(source), "OUT",
                                                  str(args.size)],
            "data_process.py (defaults)": ours + ["OUT"],
            "data_process.py --workers 1": ours + ["OUT", "--workers", "1"],
            "data_process.py --resize antialias": ours + ["OUT", "--resize", "antialias"],
        }
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in commands}
        load_before = os.getloadavg()[0]
        for _ in range(repeats):
            for k, (name, command) in enumerate(commands.items()):
                out = Path(tmp) / f"out{k}"
                shutil.rmtree(out, ignore_errors=True)  # every run writes every image
                wall, cpu = timed([str(out) if part == "OUT" else part for part in command])
                seconds[name].append(wall)
                cpu_seconds[name].append(cpu)
        load_after = os.getloadavg()[0]
        reference = images_under(Path(tmp) / "out0")
        if images_under(Path(tmp) / "out1") != reference:
            raise RuntimeError("data_process.py (defaults) did not write the reference script's files")

    images = len(reference)
    names = list(commands)
    base = seconds[names[0]]
    print(f"\n{images} JPEGs of {patch_size}x{patch_size} -> {args.size}x{args.size} PNG, whole commands, "
          f"{os.cpu_count()} CPUs, {repeats} repeat(s); load average (1 min) {load_before:.2f} before, "
          f"{load_after:.2f} after; the defaults wrote the reference's files, byte for byte\n")
    print("| command | median s | min-max s | ms/image | speed-up (median, min-max) | CPU s (median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for name in names:
        times = seconds[name]
        ratios = [b / t for b, t in zip(base, times)]
        speedup = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)"
        print(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f}-{max(times):.2f} "
              f"| {1000 * statistics.median(times) / images:.2f} | {speedup} "
              f"| {statistics.median(cpu_seconds[name]):.2f} |")
        if name != names[0]:
            rows.append({"benchmark": "data_process",
                         "case": f"{images} JPEGs {patch_size} px -> {args.size} px PNG, whole command, {name}, "
                                 f"{repeats} run(s), load {load_before:.1f}-{load_after:.1f}",
                         "ours": round(statistics.median(times), 2), "baseline": round(statistics.median(base), 2),
                         "unit": "s", "speedup": speedup, "images": images})
    return rows


if __name__ == "__main__":
    main()
