"""Evaluate every checkpoint in a folder with the Kimia Path24 metrics.

    python3 multi_test.py model/ [--data-dir KIMIA_data] [--protocol test|train|both] [--results-mode overwrite|append]

Protocols (every output names the one that produced it):
- test (default, the reference's): leave-one-out retrieval inside the test set; each test patch
  is predicted by the class of its most similar other test patch.
- train (Kimia Path24's own): each test patch is searched against the training set.

Each `.pth` file of the folder, sorted by name, is either a checkpoint written by train.py
(architecture, embedding size, crop size and class names read from it) or a bare state_dict
written by the reference code (architecture from the file-name prefix ABE_M_, se_resnet_,
se_resnet50_ or resnet50_, attention from its keys, crop 224). A file that cannot be evaluated is
reported with the reason and the sweep goes on; the exit status is 1 if any file failed.

Each run's result is the file its validation loss selected (selection.py): per `<model>_<loss>`,
the best-validation file with the lowest validation loss, i.e. the newest best; checkpoint.pth is
the last epoch, not a selection. The console summary shows those first; the ranking of all files
by test score that follows selects on the test set and is no result to report.

Outputs, beside the checkpoints unless --output-dir says otherwise:
- <model>_results.txt: one line per checkpoint and protocol in the reference's format,
  `<file>[(eta_p, 'np'), (eta_W, 'nw'), (eta_total, 'n_total')]`, followed by `# protocol=...`;
- results.csv: every metric, the validation loss, `selected_by` (validation, last_epoch or empty),
  the settings, the class list and the command, one row per checkpoint and protocol;
- both rewritten with this sweep's rows only (--results-mode overwrite, the reference's), or
  with them added after earlier sweeps' (append);
- confusion/<checkpoint>_<protocol>.csv and .png: the confusion matrix (rows true class,
  columns predicted class).
Images are decoded and centre-cropped once per run and crop size, then reused for every
checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from core.checkpoint import CheckpointError, LoadedModel, load_model
from core.errors import one_line
from core.selection import LAST_EPOCH, VALIDATION, describe_checkpoint, select
from core.data import KimiaDataset
from core.errors import UserError, run_script
from core.files import append_csv_row, atomic_write_text, command_line, natural_sorted, write_csv
from core.images import load_rgb
from core.runtime import AMP_DTYPES, select_device
from utils import pyplot, save_figure
from metrics import RECALL_KS, combine_learners, retrieval_metrics

PROTOCOLS = ("test", "train")
RESULTS_MODES = ("overwrite", "append")
# ----------------------------------------------------------------------------- images and embeddings
class _CenterCrops(Dataset):
    """uint8 centre crops (3 x c x c) of image files; an unreadable file yields its error instead."""

    def __init__(self, paths: Sequence[str], crop_size: int) -> None:
        self.paths = list(paths)
        # CenterCrop then PILToTensor, divided by 255 later, equals the reference's eval transform.
        self.transform = transforms.Compose([transforms.CenterCrop(crop_size), transforms.PILToTensor()])
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            return self.transform(load_rgb(self.paths[index])), ""
        except Exception as err:  # PIL raises many types for damaged files
            return torch.zeros(3, self.crop_size, self.crop_size, dtype=torch.uint8), one_line(err)


@dataclass
class ImageSet:
    """Decoded centre crops of a list of images, kept in memory as uint8 (N x 3 x c x c)."""

    images: torch.Tensor
    paths: list[str]
    class_names: list[str | None]  # per image; None where unknown
    failed: list[tuple[str, str]]  # (path, reason) of the files that could not be decoded


def iter_decoded(paths: Sequence[str], crop_size: int, workers: int = 0,
                 batch_size: int = 64) -> Iterator[tuple[torch.Tensor, list[int], list[tuple[str, str]]]]:
    """Decode and centre-crop `paths` in batches: yields (uint8 crops of the readable files, their
    indices in `paths`, (path, reason) of the unreadable ones)."""
    loader = DataLoader(_CenterCrops(paths, crop_size), batch_size=batch_size, num_workers=workers)
    start = 0
    for images, errors in loader:
        keep = [i for i, error in enumerate(errors) if not error]
        yield (images[keep], [start + i for i in keep],
               [(paths[start + i], error) for i, error in enumerate(errors) if error])
        start += len(errors)


def decode_images(paths: Sequence[str], class_names: Sequence[str | None], crop_size: int,
                  workers: int = 0) -> ImageSet:
    """Decode and centre-crop `paths` once; unreadable files are left out and listed in `failed`."""
    batches, kept, failed = [torch.zeros(0, 3, crop_size, crop_size, dtype=torch.uint8)], [], []
    for images, indices, failures in iter_decoded(paths, crop_size, workers):
        batches.append(images)
        kept += indices
        failed += failures
    return ImageSet(torch.cat(batches), [paths[i] for i in kept], [class_names[i] for i in kept], failed)


def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 32, device: torch.device | str = "cpu",
          amp: str = "off", channels_last: bool = False) -> torch.Tensor:
    """Embeddings n x (M*d) of uint8 images (see metrics.combine_learners), float32 on `device`.

    channels_last runs the model in NHWC memory format: the same embeddings to float rounding, and
    faster on CPUs and GPUs at the paper's 224 px (slower for ResNets at small crops on CPU).
    """
    device = torch.device(device)
    dtype = AMP_DTYPES[amp]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    parts = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255)
            batch = batch.contiguous(memory_format=memory_format)
            parts.append(combine_learners(model(batch)))
    if not parts:
        raise UserError("no images to embed")
    return torch.cat(parts)


def list_split(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(paths, class names) of the images of `root/<class>/<image>`, in natural order."""
    dataset = KimiaDataset(root)
    return [path for path, _ in dataset.samples], [dataset.classes[label] for _, label in dataset.samples]


class Evaluator:
    """Scores models on a data folder, decoding each split once per crop size."""

    def __init__(self, data_dir: str | os.PathLike = "KIMIA_data", batch_size: int = 32, amp: str = "off",
                 device: torch.device | str | None = None, workers: int = 0, channels_last: bool = False) -> None:
        if amp not in AMP_DTYPES:
            raise UserError(f"--amp {amp}: choose one of {sorted(AMP_DTYPES)}")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        self.data_dir = Path(data_dir)
        self.batch_size, self.amp, self.workers, self.channels_last = batch_size, amp, workers, channels_last
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self._images: dict[tuple[str, int], ImageSet] = {}

    def images(self, split: str, crop_size: int) -> ImageSet:
        key = (split, crop_size)
        if key not in self._images:
            paths, names = list_split(self.data_dir / split)
            started = time.time()
            self._images[key] = decode_images(paths, names, crop_size, self.workers)
            images = self._images[key]
            print(f"decoded {len(images.paths)} {split} images at {crop_size} px in {time.time() - started:.1f} s "
                  f"({images.images.numel() / 2**20:.0f} MiB kept)", flush=True)
            if not images.paths:
                raise UserError(f"{self.data_dir / split}: none of its images could be decoded")
        return self._images[key]

    @property
    def failed_images(self) -> list[tuple[str, str]]:
        return sorted({failure for images in self._images.values() for failure in images.failed})

    def evaluate(self, loaded: LoadedModel, protocols: Sequence[str] = ("test",)) -> list[dict]:
        """Every metric of `loaded` under each protocol ('test': leave-one-out in the test set;
        'train': test images searched against the training set), one dict per protocol.

        The test images are embedded once for all protocols; labels index the class names of the
        splits used, in natural order.
        """
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown or not protocols:
            raise UserError(f"--protocol {' '.join(unknown)}: choose one of {', '.join(PROTOCOLS)} (or both)")
        started = time.time()
        splits = ("test", "train") if "train" in protocols else ("test",)
        image_sets = {split: self.images(split, loaded.crop_size) for split in splits}
        class_names = natural_sorted({name for images in image_sets.values() for name in images.class_names})
        index = {name: i for i, name in enumerate(class_names)}
        labels = {split: [index[name] for name in images.class_names] for split, images in image_sets.items()}
        embeddings = {split: embed(loaded.model, images.images, self.batch_size, self.device, self.amp, self.channels_last)
                      for split, images in image_sets.items()}
        results = []
        for protocol in protocols:
            gallery = "train" if protocol == "train" else None
            result = retrieval_metrics(embeddings["test"], labels["test"], embeddings.get(gallery), labels.get(gallery),
                                       num_classes=len(class_names))
            result.update({
                "protocol": protocol, "checkpoint": os.path.basename(loaded.path), "checkpoint_path": loaded.path,
                "source": loaded.source, "model": loaded.model_name, "loss": loaded.loss_name or "",
                "model_options": loaded.model_options, "crop_size": loaded.crop_size, "seed": loaded.seed,
                "class_names": class_names,
                "checkpoint_classes_match": loaded.class_names is None or loaded.class_names == class_names,
                "data_dir": str(self.data_dir), "amp": self.amp, "channels_last": self.channels_last,
                "device": str(self.device),
                "batch_size": self.batch_size, "seconds": time.time() - started,
            })
            results.append(result)
        return results


def evaluate_checkpoint(path: str | os.PathLike, data_dir: str | os.PathLike = "KIMIA_data", protocol: str = "test",
                        batch_size: int = 32, amp: str = "off", device: torch.device | str | None = None,
                        crop_size: int | None = None, workers: int = 0, channels_last: bool = False) -> dict:
    """Metrics of one checkpoint (ours or a bare reference state_dict) under one protocol.

    Returns eta_p, eta_w, eta_total, correct, num_queries, confusion (rows true, columns
    predicted), per_class_recall, recall@1/2/4/8, map@r, class_names, the settings used, ...
    """
    evaluator = Evaluator(data_dir, batch_size, amp, device, workers, channels_last)
    return evaluator.evaluate(load_model(path, evaluator.device, crop_size), (protocol,))[0]


# ----------------------------------------------------------------------------- outputs
def reference_line(result: dict) -> str:
    """The reference's results.txt line, followed by the protocol that produced it."""
    scores = [(result["eta_p"], "np"), (result["eta_w"], "nw"), (result["eta_total"], "n_total")]
    return f"{result['checkpoint']}{scores}  # protocol={result['protocol']}\n"


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append a line to a text file through a temp file and a rename (never a torn line)."""
    old = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    atomic_write_text(path, old + line)


def write_confusion_csv(path: str | os.PathLike, confusion: np.ndarray, class_names: Sequence[str], note: str) -> None:
    lines = [f"# {note}", "true \\ predicted," + ",".join(class_names)]
    lines += [f"{name}," + ",".join(str(int(v)) for v in row) for name, row in zip(class_names, confusion)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_confusion(path: str | os.PathLike, confusion: np.ndarray, class_names: Sequence[str], title: str) -> None:
    """The confusion matrix as in the paper's figure: counts in the cells, class names on both axes."""
    size = max(4.0, 0.42 * len(class_names) + 2.0)
    fig, ax = pyplot().subplots(figsize=(size + 1.0, size))
    ax.imshow(confusion, cmap="Blues")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=90)
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(textwrap.fill(title, width=int(12 * size)), fontsize=9)
    threshold = confusion.max() / 2 if confusion.size else 0
    for (row, col), count in np.ndenumerate(confusion):
        if count:
            ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > threshold else "black")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


class ResultFiles:
    """The sweep's <model>_results.txt and results.csv, written atomically after every checkpoint.

    overwrite (the reference's): a file's first row of this sweep replaces it, so it ends holding
    this sweep's rows only; append: rows go after those of earlier sweeps.
    """

    def __init__(self, output_dir: str | os.PathLike, mode: str = "overwrite") -> None:
        if mode not in RESULTS_MODES:
            raise UserError(f"--results-mode {mode}: choose one of {', '.join(RESULTS_MODES)}")
        self.output_dir, self.mode = Path(output_dir), mode
        self._written: set[Path] = set()

    def _fresh(self, path: Path) -> bool:
        fresh = self.mode == "overwrite" and path not in self._written
        self._written.add(path)
        return fresh

    def add_line(self, name: str, line: str) -> None:
        path = self.output_dir / name
        if self._fresh(path):
            atomic_write_text(path, line)
        else:
            append_line(path, line)

    def add_row(self, name: str, row: dict) -> None:
        path = self.output_dir / name
        if self._fresh(path):
            write_csv([row], path)
        else:
            append_csv_row(path, row)


def write_outputs(result: dict, files: ResultFiles, command: str) -> dict:
    """Add the result to the text and CSV files and write its confusion matrix; returns the CSV row."""
    output_dir = files.output_dir
    stem = f"{Path(result['checkpoint']).stem}_{result['protocol']}"
    confusion_csv = output_dir / "confusion" / f"{stem}.csv"
    note = (f"{result['checkpoint']}, protocol {result['protocol']}, rows true class, columns predicted class; "
            f"eta_p {result['eta_p']:.4f} eta_W {result['eta_w']:.4f} eta_total {result['eta_total']:.4f}")
    write_confusion_csv(confusion_csv, result["confusion"], result["class_names"], note)
    plot_confusion(confusion_csv.with_suffix(".png"), result["confusion"], result["class_names"], note)
    files.add_line(f"{result['model']}_results.txt", reference_line(result))
    row = {key: result.get(key, "") for key in ("protocol", "checkpoint", "selected_by", "val_loss", "run", "model",
                                                "loss", "source", "crop_size", "eta_p", "eta_w", "eta_total",
                                                "correct", "num_queries", "num_gallery")}
    row.update({f"recall@{k}": result[f"recall@{k}"] for k in RECALL_KS})
    row.update({
        "map@r": result["map@r"], "num_lone_queries": result["num_lone_queries"],
        "model_options": json.dumps(result["model_options"], sort_keys=True), "seed": result["seed"],
        "amp": result["amp"], "channels_last": result["channels_last"], "device": result["device"], "batch_size": result["batch_size"],
        "data_dir": result["data_dir"], "classes": " ".join(result["class_names"]),
        "checkpoint_classes_match": result["checkpoint_classes_match"],
        "confusion_csv": os.path.relpath(confusion_csv, output_dir), "seconds": round(result["seconds"], 2),
        "command": command, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    files.add_row("results.csv", row)
    return row


def _scores(row: dict) -> str:
    return (f"{row['eta_p']:.4f} | {row['eta_w']:.4f} | {row['eta_total']:.4f} | {row['recall@1']:.4f} | "
            f"{row['map@r']:.4f} |")


def selected_table(rows: Sequence[dict]) -> str:
    """Markdown table of the validation-selected rows, one per run and protocol, by run name."""
    lines = ["| run | checkpoint | val_loss | protocol | eta_p | eta_W | eta_total | R@1 | mAP@R |",
             "|---|---|---|---|---|---|---|---|---|"]
    chosen = sorted((r for r in rows if r["selected_by"] == VALIDATION), key=lambda r: (r["run"], r["protocol"]))
    for row in chosen:
        lines.append(f"| {row['run']} | {row['checkpoint']} | {row['val_loss']:.4f} | {row['protocol']} | "
                     f"{_scores(row)}")
    return "\n".join(lines)


def ranking_table(rows: Sequence[dict]) -> str:
    """Markdown table of all the results, best eta_total first (a selection on the test set)."""
    lines = ["| rank | checkpoint | selected_by | model | protocol | eta_p | eta_W | eta_total | R@1 | mAP@R |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rank, row in enumerate(sorted(rows, key=lambda r: -r["eta_total"]), 1):
        lines.append(f"| {rank} | {row['checkpoint']} | {row['selected_by']} | {row['model']} | {row['protocol']} | "
                     f"{_scores(row)}")
    return "\n".join(lines)


def print_summary(rows: Sequence[dict], unevaluated: Sequence[str]) -> None:
    """The validation-selected results first, then every file ranked by its test score.

    `unevaluated`: validation-selected files that failed, whose run therefore has no result.
    """
    print("\nselected by validation (per run, the newest best-validation file: the result to report)")
    if any(r["selected_by"] == VALIDATION for r in rows):
        print(selected_table(rows))
    else:
        print("none: no best-validation file with a readable validation loss was evaluated")
    for name in unevaluated:
        print(f"{name}: selected by validation but could not be evaluated, so its run has no result")
    print("\nall files, best on the test set first (selection on the test set: not a result to report)")
    print(ranking_table(rows))


# ----------------------------------------------------------------------------- script
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weight_folder", help="folder whose .pth files are evaluated")
    parser.add_argument("--data-dir", default="KIMIA_data",
                        help="folder holding test/<class>/ and, for protocol train, train/<class>/ (default: KIMIA_data)")
    parser.add_argument("--protocol", choices=("test", "train", "both"), default="test",
                        help="test: leave-one-out in the test set (the reference's); train: test patches searched "
                             "against the training set (Kimia Path24's); both (default: test)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                        help="autocast dtype of the forward pass; embeddings stay float32 (default: off)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC memory format: the same results to float rounding, faster at 224 px on CPUs and "
                             "GPUs (default: off)")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="centre crop for every checkpoint (default: each checkpoint's own; 224 for bare "
                             "reference state_dicts)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help=f"image-decoding processes (default: {min(4, os.cpu_count() or 1)})")
    parser.add_argument("--output-dir", default=None, help="where results go (default: the weight folder)")
    parser.add_argument("--results-mode", choices=RESULTS_MODES, default="overwrite",
                        help="overwrite: <model>_results.txt and results.csv hold this sweep's rows only, as the "
                             "reference's; append: add them after earlier sweeps' (default: overwrite)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Evaluate every .pth of args.weight_folder; returns the exit status (1 if any file failed)."""
    folder = Path(args.weight_folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; pass the folder holding the .pth checkpoints")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".pth" and p.is_file())
    if not files:
        raise UserError(f"{folder}: no .pth files in it; pass the folder train.py wrote (default model/)")
    if args.crop_size is not None and args.crop_size < 1:
        raise UserError(f"--crop-size must be positive, got {args.crop_size}")
    output_dir = Path(args.output_dir) if args.output_dir else folder
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    evaluator = Evaluator(args.data_dir, args.batch_size, args.amp, args.device, args.workers, args.channels_last)
    result_files = ResultFiles(output_dir, args.results_mode)
    described = {path: describe_checkpoint(path) for path in files}
    selection = select(described.values())
    command = command_line()
    rows, failures, unevaluated = [], [], []
    for path in files:
        try:
            loaded = load_model(path, evaluator.device, args.crop_size)
            results = evaluator.evaluate(loaded, protocols)
        except (CheckpointError, RuntimeError) as err:  # RuntimeError: e.g. a crop too small, out of GPU memory
            failures.append(str(err) if isinstance(err, CheckpointError)
                            else f"{path.name}: evaluation failed ({one_line(err)})")
            print(f"FAILED {failures[-1]}", flush=True)
            if selection[path] == VALIDATION:
                unevaluated.append(path.name)
            continue
        tag = {VALIDATION: ", selected by validation", LAST_EPOCH: ", last epoch"}.get(selection[path], "")
        for result in results:
            result.update(selected_by=selection[path], val_loss=described[path].val_loss, run=described[path].run)
            rows.append(write_outputs(result, result_files, command))
            warning = "" if result["checkpoint_classes_match"] else "  (its class list differs from the data's)"
            print(f"{path.name} [{loaded.model_name}, protocol {result['protocol']}{tag}]: eta_p {result['eta_p']:.4f} "
                  f"eta_W {result['eta_w']:.4f} eta_total {result['eta_total']:.4f} "
                  f"({result['correct']}/{result['num_queries']}) in {result['seconds']:.1f} s{warning}", flush=True)
        del loaded
    if rows:
        print_summary(rows, unevaluated)
        print(f"\nresults: {output_dir / 'results.csv'}, {output_dir}/<model>_results.txt, {output_dir / 'confusion'}/")
    for path, reason in evaluator.failed_images:
        print(f"unreadable image skipped: {path} ({reason})", file=sys.stderr)
    if failures:
        print(f"\n{len(failures)} of {len(files)} files failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser().parse_args()))
