"""Peak memory of multi_test's sweep: crops streamed from a temporary file against one in-memory tensor.

    python3 -m bench.evaluate_memory [--quick] [--classes 20] [--test-per-class 50 250] [--image-size 80]
        [--crop-size 64] [--checkpoints 2] [--baseline-rev c0eaa87]

Baseline: multi_test.py as of --baseline-rev, run in that revision's own tree (`git archive`, so
with the library it was written against), which decodes the whole split into one uint8 tensor kept in memory.
Ours: the working tree's multi_test.py, which decodes it once into a temporary file that each
checkpoint reads batch by batch. Both sweep the same checkpoints over the same test set, with
--workers 0 so that the decoding happens in the measured process, each in a fresh process whose
peak resident set size (getrusage ru_maxrss, VmHWM) is printed when it ends. Their results must
agree: the largest eta_total difference is reported. Each test-set size gives one row; the last row
is the growth from the smallest set to the largest, which is what the decoded crops add (the
fixed part differs: ours also imports scikit-learn).

The test set is KIMIA_data/synthetic.py's, resized by data_process.py to --image-size, generated
once under bench/results/ and reused. main() returns the rows for bench/run_all.py.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.evaluate_memory")

import torch

import models  # noqa: E402
from KIMIA_data import data_process, synthetic  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BASELINE_REV = "c0eaa87"  # the last commit whose multi_test.py kept the decoded split in memory
# Runs a script as `python3 script ...` would, then prints this process's peak resident memory.
PEAK_RSS_RUNNER = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(f"peak_rss_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 classes x 20 test images, one checkpoint: checks that the script works (default: off)")
    parser.add_argument("--classes", type=int, default=20, help="synthetic classes (default: 20)")
    parser.add_argument("--test-per-class", type=int, nargs="+", default=[50, 250],
                        help="synthetic test images per class, one test set each (default: 50 250: 1,000 and "
                             "5,000 images)")
    parser.add_argument("--image-size", type=int, default=80, help="side of the processed images (default: 80)")
    parser.add_argument("--crop-size", type=int, default=64, help="centre crop (default: 64)")
    parser.add_argument("--model", default="se_resnet50", choices=("ABE_M", "resnet50", "se_resnet50"),
                        help="architecture of the checkpoints, randomly initialised (default: se_resnet50, the "
                             "fastest at small crops on CPU)")
    parser.add_argument("--checkpoints", type=int, default=2, help="checkpoints in the swept folder (default: 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--baseline-rev", default=BASELINE_REV,
                        help=f"git revision whose multi_test.py is the baseline (default: {BASELINE_REV})")
    return parser


def make_test_set(num_classes: int, per_class: int, image_size: int) -> Path:
    """The synthetic data set processed to `image_size` px PNGs, generated once per setting."""
    out = RESULTS / f"evaluate_memory_data_{num_classes}x{per_class}_{image_size}px"
    if not (out / "test").is_dir():
        source = out / "source"
        synthetic.make_rgb_release(source, num_classes=num_classes, patch_size=image_size, train_per_class=1,
                                   test_per_class=per_class, seed=0, workers=2)
        data_process.main(data_process.get_args_parser().parse_args(
            [str(source), "--out", str(out), "--size", str(image_size), "--workers", "2"]))
    return out


def peak_rss_run(script: Path, argv: list[str]) -> tuple[float, float]:
    """(peak resident MiB, wall seconds) of `python3 script argv` in a fresh process, run from the
    script's own tree (whose packages come before any installed ones)."""
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_RUNNER, str(script), *argv], cwd=script.parent,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"{script.name} failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    peak = [line for line in run.stderr.splitlines() if line.startswith("peak_rss_kib ")][-1]
    return int(peak.split()[1]) / 1024, seconds


def eta_totals(results_csv: Path) -> dict[str, float]:
    with open(results_csv, newline="") as f:
        return {row["checkpoint"]: float(row["eta_total"]) for row in csv.DictReader(f)}


def sweep(args: argparse.Namespace, per_class: int, folder: Path, baseline: Path) -> dict:
    """One test set: both sweeps' peak memory and time, as a row."""
    data_dir = make_test_set(args.classes, per_class, args.image_size)
    num_images = sum(1 for _ in (data_dir / "test").rglob("*.png"))
    weights = folder / "model"
    measured, totals = {}, {}
    for name, script in (("baseline", baseline), ("ours", REPO / "multi_test.py")):
        output = folder / f"{name}_{per_class}"
        measured[name] = peak_rss_run(script, [str(weights), "--data-dir", str(data_dir), "--device", "cpu",
                                               "--workers", "0", "--batch-size", str(args.batch_size),
                                               "--output-dir", str(output)])
        totals[name] = eta_totals(output / "results.csv")
    crops_mib = num_images * 3 * args.crop_size ** 2 / 2**20
    difference = max(abs(totals["baseline"][k] - totals["ours"][k]) for k in totals["ours"])
    return {
        "benchmark": "evaluate_memory", "num_images": num_images,
        "case": f"multi_test peak RSS, {args.checkpoints} {args.model} checkpoints x {num_images} test images "
                f"({args.image_size} px, crop {args.crop_size}: {crops_mib:.0f} MiB of uint8 crops), cpu, 0 workers",
        "ours": f"{measured['ours'][0]:.0f}", "baseline": f"{measured['baseline'][0]:.0f}", "unit": "MiB",
        "speedup": "", "ours_s": f"{measured['ours'][1]:.0f}", "baseline_s": f"{measured['baseline'][1]:.0f}",
        "max_eta_total_difference": f"{difference:.2g}",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.classes, args.test_per_class, args.checkpoints = 3, [5, 20], 1
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tree = folder / "baseline"
        tree.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline_rev], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        baseline = tree / "multi_test.py"
        (folder / "model").mkdir()
        for number in range(args.checkpoints):
            torch.manual_seed(number)
            torch.save({"model": models.build_model(args.model).state_dict(), "model_name": args.model,
                        "model_options": models.default_model_options(args.model), "crop_size": args.crop_size},
                       folder / "model" / f"{args.model}_{number}.pth")
        rows = [sweep(args, per_class, folder, baseline) for per_class in sorted(args.test_per_class)]
    if len(rows) > 1:
        growth = {key: float(rows[-1][key]) - float(rows[0][key]) for key in ("ours", "baseline")}
        rows.append({"benchmark": "evaluate_memory", "unit": "MiB", "ours_s": "", "baseline_s": "",
                     "case": f"growth of the peak from {rows[0]['num_images']} to {rows[-1]['num_images']} test images",
                     "ours": f"{growth['ours']:+.0f}", "baseline": f"{growth['baseline']:+.0f}", "speedup": "",
                     "max_eta_total_difference": ""})
    print("| case | peak RSS ours (MiB) | baseline (MiB) | wall s ours / baseline | max eta_total difference |\n"
          "|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['ours']} | {row['baseline']} | {row['ours_s']} / {row['baseline_s']} | "
              f"{row['max_eta_total_difference']} |")
    return rows


if __name__ == "__main__":
    main()
