"""The whole method in minutes on a laptop, with no download.

Generates the built-in synthetic Kimia-like source, preprocesses it, trains se_resnet50 with the
Multi-Similarity loss, evaluates the best checkpoint with both protocols and draws retrieval grids.
Before each step it prints the command that runs the same step on the real Kimia Path24.

To fit in minutes on 2 CPU cores the demo shrinks the problem (fewer classes and patches, smaller
images and crops, fewer epochs, a larger learning rate): every one of those is a flag, and the
paper's setting is what train.py and multi_test.py do without flags.
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import multi_test
import retrieve
import train
from KIMIA_data import data_process, synthetic
from core.errors import UserError, run_script
from core.files import natural_sorted
from core.runtime import select_device

REAL_DATA_COMMANDS = {
    "data": "python3 KIMIA_data/data_process.py KIMIAPath24_RGB      # or Kimia_Path24.h5",
    "train": "python3 train.py se_resnet50 MSLoss",
    "test": "python3 multi_test.py model/ --protocol both",
    "index": "python3 retrieve.py index model/<best>.pth KIMIA_data/train --out kimia_index.pt",
    "query": "python3 retrieve.py query kimia_index.pt <your patches> --top-k 5 --out-dir retrieval/",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for everything the demo writes (default: demo_output)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    parser.add_argument("--classes", type=int, default=8, help="synthetic classes (default: 8; Kimia Path24 has 24)")
    parser.add_argument("--train-per-class", type=int, default=40, help="synthetic training patches per class (default: 40)")
    parser.add_argument("--test-per-class", type=int, default=15, help="synthetic test patches per class (default: 15)")
    parser.add_argument("--image-size", type=int, default=80,
                        help="side of the preprocessed images (default: 80; the paper uses 300)")
    parser.add_argument("--crop-size", type=int, default=64, help="training and test crop (default: 64; the paper uses 224)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30; the paper uses 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch (default: 32; the paper uses 60)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01; the paper uses 0.001)")
    parser.add_argument("--queries", type=int, default=3, help="test patches to draw retrieval grids for (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: 0)")
    parser.add_argument("--workers", type=int, default=2,
                        help="preprocessing and data-loading processes; 0 loads in the main process (default: 2)")
    return parser


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows it: a checkpoint is hundreds of MB."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def announce(step: str, ours: list[str]) -> None:
    print(f"\n=== {step}")
    print(f"    on the real dataset:  {REAL_DATA_COMMANDS[step]}")
    print(f"    here (demo setting):  {shlex.join(ours)}", flush=True)


def main(args: argparse.Namespace) -> dict:
    started = time.time()
    out = Path(args.output)
    source, data, model_dir, grids = out / "synthetic_source", out / "KIMIA_data", out / "model", out / "retrieval"
    device = str(select_device(args.device))

    print(f"Demo setting: {args.classes} classes, {args.train_per_class} training and {args.test_per_class} test "
          f"patches per class, {args.image_size} px images, {args.crop_size} px crops, {args.epochs} epochs, "
          f"lr {args.lr}, on {device}. The paper's setting: 24 classes, 300 px images, 224 px crops, 100 epochs, lr 0.001.")

    synthetic_argv = ["--out", str(source), "--classes", str(args.classes), "--train-per-class", str(args.train_per_class),
                      "--test-per-class", str(args.test_per_class), "--seed", str(args.seed)]
    print("\n=== synthetic source (stands in for the Kimia Path24 download)")
    print(f"    here:  {shlex.join(['python3', 'KIMIA_data/synthetic.py', *synthetic_argv])}", flush=True)
    synthetic.main(synthetic.get_args_parser().parse_args(synthetic_argv))

    data_argv = [str(source), "--out", str(data), "--size", str(args.image_size), "--workers", str(max(1, args.workers))]
    announce("data", ["python3", "KIMIA_data/data_process.py", *data_argv])
    data_process.main(data_process.get_args_parser().parse_args(data_argv))

    train_argv = ["se_resnet50", "MSLoss", "--data-dir", str(data / "train"), "--output-dir", str(model_dir),
                  "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                  "--crop-size", str(args.crop_size), "--workers", str(args.workers), "--device", device,
                  "--keep-best", "1", "--val-batches", "fixed"]  # a small validation set: let every image count
    announce("train", ["python3", "train.py", *train_argv])
    trained = train.main(train.get_args_parser().parse_args(train_argv))
    best = Path(trained["best_checkpoint"])

    # multi_test sweeps a whole folder; the demo gives it the best checkpoint alone.
    best_dir = out / "best_model"
    best_dir.mkdir(parents=True, exist_ok=True)
    link_or_copy(best, best_dir / best.name)
    test_argv = [str(best_dir), "--data-dir", str(data), "--protocol", "both", "--device", device]
    announce("test", ["python3", "multi_test.py", *test_argv])
    if multi_test.main(multi_test.get_args_parser().parse_args(test_argv)):
        raise UserError("multi_test.py failed; see the messages above")
    with open(best_dir / "results.csv", newline="") as f:
        result = next(row for row in reversed(list(csv.DictReader(f))) if row["protocol"] == "test")

    index_path = out / "synthetic_index.pt"
    index_argv = ["index", str(best), str(data / "train"), "--out", str(index_path), "--device", device]
    announce("index", ["python3", "retrieve.py", *index_argv])
    if retrieve.main(retrieve.get_args_parser().parse_args(index_argv)):
        raise UserError("retrieve.py index failed; see the messages above")

    test_classes = natural_sorted(p.name for p in (data / "test").iterdir() if p.is_dir())
    queries = [str(sorted((data / "test" / c).iterdir())[0]) for c in test_classes[: args.queries]]
    query_argv = ["query", str(index_path), *queries, "--top-k", "5", "--out-dir", str(grids), "--device", device]
    announce("query", ["python3", "retrieve.py", *query_argv])
    if retrieve.main(retrieve.get_args_parser().parse_args(query_argv)):
        raise UserError("retrieve.py query failed; see the messages above")

    eta = {key: float(result[key]) for key in ("eta_p", "eta_w", "eta_total")}
    chance_p = 1.0 / args.classes
    print(f"\n=== result of {best.name} on the synthetic test set (leave-one-out, the paper's protocol)")
    print(f"eta_p     {eta['eta_p']:.4f}   (chance {chance_p:.4f})")
    print(f"eta_W     {eta['eta_w']:.4f}   (chance {chance_p:.4f})")
    print(f"eta_total {eta['eta_total']:.4f}   (chance {chance_p * chance_p:.4f})")
    print(f"Outputs in {out}/: loss curve and checkpoints in model/, results and confusion matrices in "
          f"best_model/, retrieval grids in retrieval/. Took {time.time() - started:.0f} s.")
    return {"best_checkpoint": str(best), **eta}


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser().parse_args()))
