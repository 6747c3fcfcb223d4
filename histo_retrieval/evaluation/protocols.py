"""The evaluation protocols of Kimia Path24, and the files and tables that report them.

    with Evaluator("KIMIA_data", device=device) as evaluator:    # decodes each split once per input steps
        results = evaluator.evaluate(load_model(path, device), ("test", "train"))
        results = evaluator.evaluate(load_encoder("histogram", device), ("test",))   # any encoder, no training
    result = evaluate_checkpoint(path, "KIMIA_data")              # one checkpoint, one protocol

Protocols (every result names the one that produced it):
- test (the reference's): leave-one-out retrieval inside the test set; each test patch is predicted
  by the class of its most similar other test patch.
- train (Kimia Path24's own): each test patch is searched against the training set.
With groups (`Evaluator(groups=read_groups(...))`, multi_test.py --groups: the slide or patient of
each image), no image of the query's group is ever its neighbour: in the test protocol
(`test-groups`), and in the train protocol (`train-groups`) when the groups file covers the training
images too (otherwise the training set is searched whole, as without groups). Every result says what
was excluded (`exclusion`: query, group or none) and records the groups file.

Any encoder (histo_retrieval.encoders: a checkpoint of this project, a timm network, a pathology
foundation model preset, the colour histogram) is scored the same way, through its own input steps
and normalisation; every result names it (spec, kind, weights hash, input steps).

Each split is decoded once per run and input steps into a `histo_retrieval.evaluation.embedder.CropCache` (a temporary
file, deleted when the Evaluator closes) that every checkpoint reads batch by batch, so memory does
not grow with the gallery. Reports: the reference's results line, results.csv rows, the confusion
matrix as CSV and PNG, the validation-selected and ranking tables, and a t-SNE map of the test
embeddings.
"""
from __future__ import annotations

import json
import os
import re
import textwrap
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from histo_retrieval.evaluation.metrics import RECALL_KS, retrieval_metrics
from histo_retrieval.figures import pyplot, save_figure

from histo_retrieval.encoders.base import Encoder
from histo_retrieval.encoders.project import load_model
from histo_retrieval.data.datasets import Groups, InputSteps, KimiaDataset, image_key
from histo_retrieval.evaluation.embedder import CropCache, Embedder, check_settings
from histo_retrieval.errors import UserError
from histo_retrieval.files import append_csv_row, atomic_write_text, natural_sorted, write_csv
from histo_retrieval.runtime import select_device
from histo_retrieval.evaluation.selection import ENCODER, VALIDATION

PROTOCOLS = ("test", "train")
RESULTS_MODES = ("overwrite", "append")
TSNE_FIGURE_INCHES = (9.0, 6.5)
TSNE_DPI = 100


# ----------------------------------------------------------------------------- protocols
class Evaluator:
    """Scores models on a data folder (`<data_dir>/test/<class>/`, and `train/<class>/` for the train
    protocol), decoding each split once per crop size."""

    def __init__(self, data_dir: str | os.PathLike = "KIMIA_data", batch_size: int = 32, amp: str = "off",
                 device: torch.device | str | None = None, workers: int = 0, channels_last: bool = False,
                 cache_dir: str | os.PathLike | None = None, groups: Groups | None = None) -> None:
        """groups: the slide or patient of the images (histo_retrieval.data.datasets.read_groups on the same
        data folder); None: the protocols as published."""
        check_settings(batch_size, amp)
        self.data_dir = Path(data_dir)
        self.batch_size, self.amp, self.workers, self.channels_last = batch_size, amp, workers, channels_last
        self.device = select_device(device)
        self.cache_dir = cache_dir
        self.groups = groups
        self._keys: dict[tuple[str, InputSteps], list[str]] = {}  # image_key of each decoded image
        self._splits: dict[tuple[str, InputSteps], tuple[CropCache, list[str]]] = {}

    def decoded(self, split: str, steps: InputSteps | int) -> tuple[CropCache, list[str]]:
        """The split's crops through the input steps (an int: the reference's centre crop of that size)
        and the class name of each of them (decoded on first use)."""
        steps = InputSteps.of(steps)
        key = (split, steps)
        if key not in self._splits:
            dataset = KimiaDataset(self.data_dir / split)
            started = time.time()
            cache = CropCache([path for path, _ in dataset.samples], steps, self.workers, self.cache_dir)
            names = [dataset.classes[dataset.samples[position][1]] for position in cache.kept]
            self._splits[key] = cache, names
            self._keys[key] = [image_key(split, name, Path(dataset.samples[position][0]).name)
                               for position, name in zip(cache.kept, names)]
            print(f"decoded {len(cache)} {split} images ({steps.describe()}) in {time.time() - started:.1f} s "
                  f"({cache.num_bytes / 2**20:.0f} MiB in a temporary file)", flush=True)
            if not len(cache):
                raise UserError(f"{self.data_dir / split}: none of its images could be decoded")
        return self._splits[key]

    @property
    def failed_images(self) -> list[tuple[str, str]]:
        """(path, reason) of every image left out so far, each once."""
        return sorted({failure for cache, _ in self._splits.values() for failure in cache.failed})

    def evaluate(self, loaded: Encoder, protocols: Sequence[str] = ("test",), name: str | None = None) -> list[dict]:
        """Every metric of `loaded` under each protocol, one dict per protocol.

        The images go through the encoder's own input steps and normalisation. The test images are
        embedded once for all protocols; labels index the class names of the splits used, in natural
        order. Each dict names the encoder (`checkpoint`: `name`, default result_name(loaded);
        `encoder`, `encoder_kind`, `weights_sha256`, `input_steps`) and also holds the test images'
        embeddings (`query_embeddings`, on the device) and labels (`query_labels`).
        """
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown or not protocols:
            raise UserError(f"--protocol {' '.join(unknown)}: choose one of {', '.join(PROTOCOLS)} (or both)")
        started = time.time()
        used = ("test", "train") if "train" in protocols else ("test",)
        splits = {split: self.decoded(split, loaded.input_steps) for split in used}
        class_names = natural_sorted({name for _, names in splits.values() for name in names})
        index = {name: i for i, name in enumerate(class_names)}
        labels = {split: [index[name] for name in names] for split, (_, names) in splits.items()}
        embedder = Embedder(loaded.model, self.device, self.batch_size, self.amp, self.channels_last,
                            loaded.preprocessing)
        embeddings = {split: embedder.embed(cache.batches(self.batch_size)) for split, (cache, _) in splits.items()}
        identity = {"encoder": loaded.spec, "encoder_kind": loaded.kind, "weights_sha256": loaded.weights_sha256(),
                    "input_steps": loaded.input_steps.to_dict(), "normalisation": loaded.preprocessing.describe(),
                    "dim": loaded.dim, "pooling": loaded.pooling}
        keys = {split: self._keys[(split, InputSteps.of(loaded.input_steps))] for split in used}
        results = []
        for protocol in protocols:
            gallery = "train" if protocol == "train" else None
            grouped = self.groups is not None and (gallery is None or self.groups.covers(gallery))
            query_groups = self.groups.codes(keys["test"]) if grouped else None
            gallery_groups = self.groups.codes(keys[gallery]) if grouped and gallery else None
            try:
                result = retrieval_metrics(embeddings["test"], labels["test"], embeddings.get(gallery),
                                           labels.get(gallery), num_classes=len(class_names),
                                           query_groups=query_groups, gallery_groups=gallery_groups)
            except ValueError as err:
                if not grouped:
                    raise
                raise UserError(f"--groups {self.groups.path}: protocol {protocol}: {err}") from err
            groups_record = self.groups.record() if self.groups else {"groups": "", "groups_sha256": "",
                                                                       "num_groups": ""}
            result.update({
                "protocol": protocol, "exclusion": "group" if grouped else "none" if gallery else "query",
                **groups_record, "checkpoint": name or result_name(loaded), "checkpoint_path": loaded.path, **identity,
                "source": loaded.source, "model": loaded.model_name, "loss": loaded.loss_name or "",
                "model_options": loaded.model_options, "crop_size": loaded.crop_size, "seed": loaded.seed,
                "class_names": class_names,
                "checkpoint_classes_match": loaded.class_names is None or loaded.class_names == class_names,
                "data_dir": str(self.data_dir), "amp": self.amp, "channels_last": self.channels_last,
                "device": str(self.device), "batch_size": self.batch_size, "seconds": time.time() - started,
                "query_embeddings": embeddings["test"], "query_labels": labels["test"],
            })
            results.append(result)
        return results

    def close(self) -> None:
        """Delete the decoded crops."""
        for cache, _ in self._splits.values():
            cache.close()
        self._splits.clear()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def evaluate_checkpoint(path: str | os.PathLike, data_dir: str | os.PathLike = "KIMIA_data", protocol: str = "test",
                        batch_size: int = 32, amp: str = "off", device: torch.device | str | None = None,
                        crop_size: int | None = None, workers: int = 0, channels_last: bool = False) -> dict:
    """Metrics of one checkpoint (ours or a bare reference state_dict) under one protocol.

    Returns eta_p, eta_w, eta_total, correct, num_queries, confusion (rows true, columns
    predicted), per_class_recall, recall@1/2/4/8, map@r, class_names, the settings used, ...
    """
    with Evaluator(data_dir, batch_size, amp, device, workers, channels_last) as evaluator:
        return evaluator.evaluate(load_model(path, evaluator.device, crop_size), (protocol,))[0]


# ----------------------------------------------------------------------------- result files
def file_safe(text: str) -> str:
    """`text` with every character but letters, digits and . _ + - replaced by '-' (a file name part)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text).strip(".") or "-"


def result_name(encoder: Encoder) -> str:
    """What names an encoder's results (the results line, the confusion and embedding-map files): a
    checkpoint's file name, as the reference; for another encoder its spec made file-safe, followed by
    the stem of its weights file ('timm-resnet18_r18' for timm:resnet18 with r18.pth; 'histogram')."""
    if encoder.kind == "checkpoint":
        return os.path.basename(encoder.path)
    weights = os.path.basename(encoder.path)
    return file_safe(encoder.spec) + (f"_{file_safe(weights.split('.')[0])}" if weights else "")


def result_stem(result: dict) -> str:
    """The file stem of a result's outputs: a checkpoint's file name without .pth, another encoder's name."""
    name = result["checkpoint"]
    if result.get("encoder_kind", "checkpoint") == "checkpoint" and name.endswith((".pth", ".pt")):
        return os.path.splitext(name)[0]
    return name


def results_text_name(result: dict) -> str:
    """<model>_results.txt for a checkpoint, as the reference; <spec made file-safe>_results.txt for another
    encoder (timm-resnet50_results.txt stays apart from the paper's resnet50_results.txt)."""
    if result.get("encoder_kind", "checkpoint") == "checkpoint":
        return f"{result['model']}_results.txt"
    return f"{file_safe(result['encoder'])}_results.txt"


def protocol_label(result: dict) -> str:
    """The protocol a report names: `test` or `train`, as published, or `test-groups` / `train-groups`
    when no image of the query's group could be its neighbour."""
    return f"{result['protocol']}-groups" if result.get("exclusion") == "group" else result["protocol"]


def reference_line(result: dict) -> str:
    """The reference's results.txt line, followed by the protocol that produced it."""
    scores = [(result["eta_p"], "np"), (result["eta_w"], "nw"), (result["eta_total"], "n_total")]
    return f"{result['checkpoint']}{scores}  # protocol={protocol_label(result)}\n"


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
        old = "" if self._fresh(path) or not path.exists() else path.read_text(encoding="utf-8")
        atomic_write_text(path, old + line)  # the whole file rewritten: never a torn line

    def add_row(self, name: str, row: dict) -> None:
        path = self.output_dir / name
        if self._fresh(path):
            write_csv([row], path)
        else:
            append_csv_row(path, row)


def write_outputs(result: dict, files: ResultFiles, command: str) -> dict:
    """Add the result to the text and CSV files and write its confusion matrix; returns the CSV row."""
    output_dir = files.output_dir
    stem = f"{result_stem(result)}_{protocol_label(result)}"
    confusion_csv = output_dir / "confusion" / f"{stem}.csv"
    note = (f"{result['checkpoint']}, protocol {protocol_label(result)}, rows true class, columns predicted class; "
            f"eta_p {result['eta_p']:.4f} eta_W {result['eta_w']:.4f} eta_total {result['eta_total']:.4f}")
    write_confusion_csv(confusion_csv, result["confusion"], result["class_names"], note)
    plot_confusion(confusion_csv.with_suffix(".png"), result["confusion"], result["class_names"], note)
    files.add_line(results_text_name(result), reference_line(result))
    row = {key: result.get(key, "") for key in ("protocol", "checkpoint", "selected_by", "val_loss", "run", "model",
                                                "loss", "source", "encoder", "encoder_kind", "weights_sha256",
                                                "crop_size", "eta_p", "eta_w", "eta_total", "correct", "num_queries",
                                                "num_gallery")}
    row.update({f"recall@{k}": result[f"recall@{k}"] for k in RECALL_KS})
    row.update({
        "map@r": result["map@r"], "num_lone_queries": result["num_lone_queries"],
        "model_options": json.dumps(result["model_options"], sort_keys=True, default=str),
        "input_steps": json.dumps(result.get("input_steps") or "", sort_keys=True),
        "normalisation": result.get("normalisation", ""), "seed": result["seed"],
        "amp": result["amp"], "channels_last": result["channels_last"], "device": result["device"],
        "batch_size": result["batch_size"], "data_dir": result["data_dir"], "classes": " ".join(result["class_names"]),
        "checkpoint_classes_match": result["checkpoint_classes_match"],
        "confusion_csv": os.path.relpath(confusion_csv, output_dir), "seconds": round(result["seconds"], 2),
        "command": command, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    if result.get("groups"):  # only then: without --groups the file keeps the columns it always had
        row.update({key: result[key] for key in ("exclusion", "groups", "groups_sha256", "num_groups")})
    files.add_row("results.csv", row)
    return row


# ----------------------------------------------------------------------------- tables
def _scores(row: dict) -> str:
    return (f"{row['eta_p']:.4f} | {row['eta_w']:.4f} | {row['eta_total']:.4f} | {row['recall@1']:.4f} | "
            f"{row['map@r']:.4f} |")


def selected_table(rows: Sequence[dict]) -> str:
    """Markdown table of the validation-selected rows, one per run and protocol, by run name."""
    lines = ["| run | checkpoint | val_loss | protocol | eta_p | eta_W | eta_total | R@1 | mAP@R |",
             "|---|---|---|---|---|---|---|---|---|"]
    chosen = sorted((r for r in rows if r["selected_by"] == VALIDATION), key=lambda r: (r["run"], protocol_label(r)))
    for row in chosen:
        lines.append(f"| {row['run']} | {row['checkpoint']} | {row['val_loss']:.4f} | {protocol_label(row)} | "
                     f"{_scores(row)}")
    return "\n".join(lines)


def encoder_table(rows: Sequence[dict]) -> str:
    """Markdown table of the rows of encoders named by --encoder (no training run: nothing to select),
    one per encoder and protocol, in the order evaluated."""
    lines = ["| encoder | name | kind | weights_sha256 | protocol | eta_p | eta_W | eta_total | R@1 | mAP@R |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in (r for r in rows if r["selected_by"] == ENCODER):
        lines.append(f"| {row['encoder']} | {row['checkpoint']} | {row['encoder_kind']} | {row['weights_sha256'][:12]} | "
                     f"{protocol_label(row)} | {_scores(row)}")
    return "\n".join(lines)


def ranking_table(rows: Sequence[dict]) -> str:
    """Markdown table of all the results, best eta_total first (a selection on the test set)."""
    lines = ["| rank | checkpoint | selected_by | model | protocol | eta_p | eta_W | eta_total | R@1 | mAP@R |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rank, row in enumerate(sorted(rows, key=lambda r: -r["eta_total"]), 1):
        lines.append(f"| {rank} | {row['checkpoint']} | {row['selected_by']} | {row['model']} | {protocol_label(row)} | "
                     f"{_scores(row)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- embedding map
def tsne_coordinates(embeddings: torch.Tensor | np.ndarray, seed: int = 0) -> np.ndarray:
    """n x 2 t-SNE coordinates (scikit-learn, seeded) of embedding rows.

    The rows are metrics.combine_learners' (unit length, inner product the mean cosine over the
    learners), so their Euclidean distances order pairs as the retrieval does. The perplexity is
    scikit-learn's 30, lowered to a third of the other points for small sets (it must stay below n).
    """
    from sklearn.manifold import TSNE  # imported here: seconds of start-up that only this figure needs

    points = embeddings.float().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    if points.shape[0] < 3:
        raise UserError(f"a t-SNE map needs at least 3 images, got {points.shape[0]}")
    perplexity = min(30.0, (points.shape[0] - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(points)


def plot_embeddings(path: str | os.PathLike, coordinates: np.ndarray, labels: Sequence[int],
                    class_names: Sequence[str], title: str) -> None:
    """The 2-D map as a scatter plot, one colour and marker per class, class names in the legend;
    TSNE_FIGURE_INCHES at TSNE_DPI, whatever the number of classes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=TSNE_FIGURE_INCHES)
    labels = np.asarray(labels)
    # tab20 has 20 colours; Kimia Path24 has 24 classes, so markers change too, in a different cycle.
    colours, markers = plt.get_cmap("tab20").colors, "os^Dv<>p"
    for number, name in enumerate(class_names):
        points = coordinates[labels == number]
        if len(points):
            ax.scatter(points[:, 0], points[:, 1], s=14, color=colours[number % len(colours)],
                       marker=markers[number % len(markers)], label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(textwrap.fill(title, width=100), fontsize=9)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, ncol=1 + len(class_names) // 25,
              title="class", frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=TSNE_DPI)
