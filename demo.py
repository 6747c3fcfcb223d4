"""The whole method in minutes on a laptop, with no download.

Generates the built-in synthetic Kimia-like source, preprocesses it, trains se_resnet50 with the
Multi-Similarity loss, evaluates the best checkpoint with both protocols (with a t-SNE map of its
test embeddings) and draws retrieval grids; then writes a few synthetic whole slides, indexes their
tissue and searches them with a region of one of them.
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
from histo_retrieval.errors import UserError, run_script
from histo_retrieval.files import natural_sorted
from histo_retrieval.runtime import select_device

REAL_DATA_COMMANDS = {
    "data": "python3 KIMIA_data/data_process.py KIMIAPath24_RGB      # or Kimia_Path24.h5",
    "train": "python3 train.py se_resnet50 MSLoss",
    "test": "python3 multi_test.py model/ --protocol both --plot-embeddings",
    "index": "python3 retrieve.py index model/<best>.pth KIMIA_data/train --index kimia_index/",
    "query": "python3 retrieve.py query --index kimia_index/ <your patches> --top-k 5 --out-dir retrieval/",
    "slides": "python3 retrieve.py index model/<best>.pth /archive/*.svs --index slide_index/ --mpp 1.67  # Kimia's scale",
    "slide query": "python3 retrieve.py query --index slide_index/ case.svs --region X,Y,W,H --out-dir slide_search/",
}


# The demo's shrunken settings: (flag, default, what it is, the paper's value or None).
SETTINGS = (
    ("--classes", 8, "synthetic classes", "Kimia Path24 has 24"),
    ("--train-per-class", 40, "synthetic training patches per class", None),
    ("--test-per-class", 15, "synthetic test patches per class", None),
    ("--image-size", 80, "side of the preprocessed images", "the paper uses 300"),
    ("--crop-size", 64, "training and test crop", "the paper uses 224"),
    ("--epochs", 30, "training epochs", "the paper uses 100"),
    ("--batch-size", 32, "training batch", "the paper uses 60"),
    ("--lr", 0.01, "SGD learning rate", "the paper uses 0.001"),
    ("--queries", 3, "test patches to draw retrieval grids for", None),
    ("--slides", 3, "synthetic whole slides to index and search", None),
    ("--seed", 0, "seed of the synthetic data", None),
    ("--workers", 2, "preprocessing and data-loading processes; 0 loads in the main process", None),
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for everything the demo writes (default: demo_output)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    for flag, default, what, paper in SETTINGS:
        parser.add_argument(flag, type=type(default), default=default,
                            help=f"{what} (default: {default}{'; ' + paper if paper else ''})")
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
    shutil.rmtree(model_dir, ignore_errors=True)  # a rerun of the demo trains anew: train.py refuses a folder holding its run
    trained = train.main(train.get_args_parser().parse_args(train_argv))
    best = Path(trained["best_checkpoint"])

    # multi_test sweeps a whole folder; the demo gives it the best checkpoint alone.
    best_dir = out / "best_model"
    best_dir.mkdir(parents=True, exist_ok=True)
    link_or_copy(best, best_dir / best.name)
    test_argv = [str(best_dir), "--data-dir", str(data), "--protocol", "both", "--plot-embeddings", "--device", device]
    announce("test", ["python3", "multi_test.py", *test_argv])
    if multi_test.main(multi_test.get_args_parser().parse_args(test_argv)):
        raise UserError("multi_test.py failed; see the messages above")
    with open(best_dir / "results.csv", newline="") as f:
        result = next(row for row in reversed(list(csv.DictReader(f))) if row["protocol"] == "test")

    index_dir = out / "patch_index"
    shutil.rmtree(index_dir, ignore_errors=True)  # a rerun of the demo indexes its new model
    index_argv = ["index", str(best), str(data / "train"), "--index", str(index_dir), "--device", device,
                  "--workers", str(args.workers)]
    announce("index", ["python3", "retrieve.py", *index_argv])
    if retrieve.main(retrieve.get_args_parser().parse_args(index_argv)):
        raise UserError("retrieve.py index failed; see the messages above")

    test_classes = natural_sorted(p.name for p in (data / "test").iterdir() if p.is_dir())
    queries = [str(sorted((data / "test" / c).iterdir())[0]) for c in test_classes[: args.queries]]
    query_argv = ["query", "--index", str(index_dir), *queries, "--top-k", "5", "--out-dir", str(grids),
                  "--device", device, "--workers", "0"]
    announce("query", ["python3", "retrieve.py", *query_argv])
    if retrieve.main(retrieve.get_args_parser().parse_args(query_argv)):
        raise UserError("retrieve.py query failed; see the messages above")

    search_slides(args, out, best, device)

    eta = {key: float(result[key]) for key in ("eta_p", "eta_w", "eta_total")}
    chance_p = 1.0 / args.classes
    print(f"\n=== result of {best.name} on the synthetic test set (leave-one-out, the paper's protocol)")
    print(f"eta_p     {eta['eta_p']:.4f}   (chance {chance_p:.4f})")
    print(f"eta_W     {eta['eta_w']:.4f}   (chance {chance_p:.4f})")
    print(f"eta_total {eta['eta_total']:.4f}   (chance {chance_p * chance_p:.4f})")
    print(f"Outputs in {out}/: loss curve and checkpoints in model/, results, confusion matrices and the t-SNE map "
          f"of the test embeddings in best_model/, retrieval grids in retrieval/, the slide search in slide_search/. Took {time.time() - started:.0f} s.")
    return {"best_checkpoint": str(best), **eta}


def search_slides(args: argparse.Namespace, out: Path, checkpoint: Path, device: str) -> None:
    """Index synthetic slides of the trained classes and search them with a region of the first.

    The model was trained on 320 px patches drawn at 0.5 um/px and shrunk to --image-size, so it
    saw tissue at 0.5 * 320 / image_size um/px: the slides are tiled at that scale.
    """
    slide_dir, index_dir = out / "slides", out / "slide_index"
    records = synthetic.write_slide_set(slide_dir, count=args.slides, classes=min(3, args.classes), seed=args.seed)
    shutil.rmtree(index_dir, ignore_errors=True)
    mpp = synthetic.PATCH_MPP * synthetic.REFERENCE_PATCH / args.image_size
    index_argv = ["index", str(checkpoint), *(str(slide_dir / r["file"]) for r in records), "--index", str(index_dir),
                  "--mpp", f"{mpp:g}", "--device", device, "--workers", str(args.workers)]
    announce("slides", ["python3", "retrieve.py", *index_argv])
    if retrieve.main(retrieve.get_args_parser().parse_args(index_argv)):
        raise UserError("retrieve.py index failed on the slides; see the messages above")
    box = records[0]["regions"][0]  # a square of 2 x 2 patches in the middle of the first slide's tissue
    side = 2 * round(args.crop_size * mpp / records[0]["mpp"])
    x, y = box["x"] + (box["w"] - side) // 2, box["y"] + (box["h"] - side) // 2
    query_argv = ["query", "--index", str(index_dir), str(slide_dir / records[0]["file"]), "--region",
                  f"{x},{y},{side},{side}", "--top-k", "5", "--heatmap", "--out-dir", str(out / "slide_search"),
                  "--device", device, "--workers", "0"]
    announce("slide query", ["python3", "retrieve.py", *query_argv])
    if retrieve.main(retrieve.get_args_parser().parse_args(query_argv)):
        raise UserError("retrieve.py query failed on the slides; see the messages above")
    print(f"\nTo browse and search these slides in a web page: {shlex.join(['python3', 'retrieve.py', 'serve', '--index', str(index_dir)])}"
          " (once `npm ci --prefix web` has installed its viewer; then open http://localhost:8000/)")


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser().parse_args()))
