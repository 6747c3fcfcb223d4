"""Speed of multi_test's sweep: five checkpoints on one test set, against the reference's way.

    python3 -m bench.evaluate_speed [--quick] [--crop-sizes 32 64 224] [--test-per-class 5] [--batch-size 32]

Baseline (the reference's multi_test): for every checkpoint, the model is built (randomly
initialised) and loaded, a DataLoader decodes every test PNG anew through CenterCrop + ToTensor,
the model embeds it under no_grad the reference's way (resnet50 and ABE_M recompute their attention
trunk for every head: models/reference.py's ReferenceStyle), and every row of the full similarity
matrix is sorted.
Ours (histo_retrieval.evaluation.protocols.Evaluator, multi_test's, by default and with --channels-last): the test images
are decoded and centre-cropped once into a temporary file of uint8 crops; each model is built on
the meta device (no random initialisation) and takes the checkpoint's tensors, embeds the crops
batch by batch under inference_mode and ranks with a top-k.
Both use the same weights (random, drawn with the fixtures' fill rule, models/reference.py), batch size, decoding workers
and device; both times include loading the checkpoints.

The test set is the project's synthetic one (KIMIA_data/synthetic.py, then data_process.py to
300 px PNGs), generated once under bench/results/ and reused. Prints a Markdown table; main()
returns its rows for bench/run_all.py.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.evaluate_speed")

import torch
from torch.utils.data import DataLoader

import models  # noqa: E402
from histo_retrieval.encoders.project import load_model  # noqa: E402
from histo_retrieval.data.datasets import KimiaDataset, eval_transform  # noqa: E402
from histo_retrieval.evaluation.protocols import Evaluator  # noqa: E402
from histo_retrieval.runtime import select_device  # noqa: E402
from KIMIA_data import data_process, synthetic  # noqa: E402
from histo_retrieval.evaluation.metrics import combine_learners, kimia_accuracy  # noqa: E402
from models.reference import ReferenceStyle, filled_state_dict  # noqa: E402

# Five checkpoints: the three architectures, the attention ablation and a second ABE_M.
CHECKPOINTS = (("se_resnet50", {}), ("se_resnet50", {"attention": False}), ("resnet50", {}), ("ABE_M", {}),
               ("ABE_M", {"embedding_dim": 256}))
RESULTS = Path(__file__).resolve().parent / "results"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 classes x 4 test images, crop 32 only: checks that the script works (default: off)")
    parser.add_argument("--classes", type=int, default=24, help="synthetic classes (default: 24)")
    parser.add_argument("--test-per-class", type=int, default=5, help="synthetic test images per class (default: 5)")
    parser.add_argument("--crop-sizes", type=int, nargs="+", default=[32, 64, 224],
                        help="centre crops to time, one row each (default: 32 64 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass, both ways (default: 32)")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding processes, both ways (default: 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")
    return parser


def make_test_set(num_classes: int, per_class: int) -> Path:
    """The synthetic data set processed to 300 px PNGs, generated once per setting."""
    out = RESULTS / f"evaluate_data_{num_classes}x{per_class}"
    if not (out / "test").is_dir():
        source = out / "source"
        synthetic.make_rgb_release(source, num_classes=num_classes, patch_size=300, train_per_class=1,
                                   test_per_class=per_class, seed=0, workers=2)
        data_process.main(data_process.get_args_parser().parse_args([str(source), "--out", str(out), "--workers", "2"]))
    return out


def write_checkpoints(folder: Path, crop_size: int) -> list[Path]:
    paths = []
    for number, (name, options) in enumerate(CHECKPOINTS):
        state_dict = filled_state_dict(models.build_model(name, **options).state_dict(), seed=number + 1)
        path = folder / f"{number}_{name}.pth"
        torch.save({"model": state_dict, "model_name": name,
                    "model_options": {**models.default_model_options(name), **options}, "crop_size": crop_size}, path)
        paths.append(path)
    return paths


def reference_sweep(paths: list[Path], data_dir: Path, batch_size: int, workers: int,
                    device: torch.device) -> list[float]:
    """eta_total per checkpoint, decoding and embedding anew for each like the reference."""
    totals = []
    for path in paths:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = models.build_model(checkpoint["model_name"], **checkpoint["model_options"])
        model.load_state_dict(checkpoint["model"])
        if model.num_learners > 1:  # the reference's forward: the attention trunk once per head
            model = ReferenceStyle(model)
        model.to(device).eval()
        dataset = KimiaDataset(data_dir / "test", eval_transform(checkpoint["crop_size"]))
        parts = []
        with torch.no_grad():
            for images, _, _ in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
                parts.append(combine_learners(model(images.to(device))))
        embeddings = torch.cat(parts)
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(float("-inf"))  # the query itself, by index
        nearest = similarity.argsort(dim=1, descending=True)[:, 0].cpu()
        targets = torch.tensor(dataset.targets)
        totals.append(kimia_accuracy(targets, targets[nearest], len(dataset.classes))["eta_total"])
    return totals


def our_sweep(paths: list[Path], data_dir: Path, batch_size: int, workers: int, device: torch.device,
              channels_last: bool = False) -> list[float]:
    with Evaluator(data_dir, batch_size, "off", device, workers, channels_last) as evaluator:
        return [evaluator.evaluate(load_model(path, device))[0]["eta_total"] for path in paths]


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.classes, args.test_per_class, args.crop_sizes = 3, 4, [32]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    data_dir = make_test_set(args.classes, args.test_per_class)
    num_images = len(KimiaDataset(data_dir / "test"))
    rows = []
    for crop_size in args.crop_sizes:
        with tempfile.TemporaryDirectory() as folder:
            paths = write_checkpoints(Path(folder), crop_size)
            timings, cpu_times, totals = {}, {}, {}
            for name, sweep in (("baseline", reference_sweep), ("ours", our_sweep),
                                ("ours --channels-last", partial(our_sweep, channels_last=True))):
                started, cpu_started = time.perf_counter(), time.process_time()
                totals[name] = sweep(paths, data_dir, args.batch_size, args.workers, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings[name] = time.perf_counter() - started
                cpu_times[name] = time.process_time() - cpu_started
        for name in ("ours", "ours --channels-last"):
            difference = max(abs(a - b) for a, b in zip(totals["baseline"], totals[name]))
            rows.append({
                "benchmark": "evaluate",
                "case": f"{len(paths)} checkpoints x {num_images} test images, crop {crop_size}, batch "
                        f"{args.batch_size}, {args.workers} workers, {device.type}, {name}",
                "ours": f"{timings[name]:.1f}", "baseline": f"{timings['baseline']:.1f}", "unit": "s",
                "speedup": f"{timings['baseline'] / timings[name]:.2f}x",
                "ours_cpu_s": f"{cpu_times[name]:.1f}", "baseline_cpu_s": f"{cpu_times['baseline']:.1f}",
                "cpu_speedup": f"{cpu_times['baseline'] / cpu_times[name]:.2f}x",
                "max_eta_total_difference": f"{difference:.2g}",
            })
    # CPU time (this process only, so without --workers) is steadier than wall time on a shared machine.
    print("| case | ours (s) | baseline (s) | speed-up | CPU s ours / baseline | CPU speed-up | max eta_total difference |\n"
          "|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['ours']} | {row['baseline']} | {row['speedup']} | {row['ours_cpu_s']} / "
              f"{row['baseline_cpu_s']} | {row['cpu_speedup']} | {row['max_eta_total_difference']} |")
    return rows


if __name__ == "__main__":
    main()
