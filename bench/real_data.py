"""An honest check on real tissue: the trained model against two baselines, on the same images and protocols.

    python3 -m bench.real_data ROOT [--out DIR] [--model se_resnet50] [--loss MSLoss] [--image-size 300]
        [--resize reference|antialias] [--histogram-bins 8] [--eval-batch-size 32]
        [--encoder SPEC [--encoder-weights FILE] [--encoder-options JSON]]... [--groups CSV] [-- TRAIN.PY OPTIONS ...]

    python3 -m bench.real_data /data/liver --out liver_check -- --epochs 30 --device cuda --pretrained imagenet
    python3 -m bench.real_data /data/liver --encoder uni --encoder-weights pytorch_model.bin -- --epochs 30

ROOT holds ROOT/train/<class>/* and ROOT/test/<class>/* (jpg, jpeg, png, tif, tiff, bmp), the same
classes in both, the test patches cut from other slides than the training ones. Everything after
`--` goes to train.py untouched (any train.py option: --epochs, --crop-size, --device, --lr,
--pretrained, --augment, --stain-normalize, ...); the bench sets only --data-dir and --output-dir,
and --keep-best 1 unless the options say otherwise.

Steps (each prints its progress):
  1. preprocess: KIMIA_data/data_process.py turns ROOT into DIR/data/{train,test}/<class>/, the
     --image-size px RGB PNGs that train.py and multi_test.py read (300 px and the reference's resize
     by default, as for Kimia Path24); ROOT is never written to;
  2. train: train.py's main into DIR/model/; the result is the checkpoint the validation loss
     selects (the run's lowest validation loss, the newest on ties), never one chosen on the test set;
  3. the untrained network: the same architecture and options, initialised with the same seed as
     train.py initialises it (before any --pretrained weights), saved as train.py saves its
     checkpoint (the trained checkpoint's dict with these weights, hence the same crop, classes and
     input preprocessing) in DIR/untrained/, and loaded with histo_retrieval.encoders.project.load_model as the trained one;
  4. evaluate: the colour histogram, both models and each --encoder, every one an encoder
     (histo_retrieval.encoders) through histo_retrieval.evaluation.protocols.Evaluator (the histogram
     and the networks on the very same decoded eval crops); every row scored by
     metrics.retrieval_metrics under both protocols:
       test  (the paper's): leave-one-out inside the test set;
       train (Kimia Path24's own): each test patch searched against the training set.

Colour histogram: the registry's `histogram` encoder (histo_retrieval.encoders.histogram): the joint
RGB histogram of each image's eval crop (the centre crop the networks see, after the checkpoint's
stain normalisation if it has one: the encoder gets the checkpoint's stain step), --histogram-bins
per channel (8: 512 bins), L1-normalised; similarity = the cosine of two histograms (the inner
product of the L2-normalised rows), so that it ranks with the same code as the embeddings.

--groups CSV (columns image,group: the slide or patient of each image, `image` naming a ROOT image
by its path under ROOT, e.g. test/ADI/x.jpg, under its split folder, ADI/x.jpg, or its file name
alone when no other image has it; multi_test.py's rules) evaluates both protocols with the query's group
left out: test-groups (leave-one-out that never returns an image of the query's slide or patient) and,
when the file gives the training images' groups too, train-groups (otherwise train as above). Every
test image needs a group. The file is read, and refused, before any work; the results record it.

--encoder SPEC (repeatable; docs/encoders.md) adds a row per encoder scored with no training:
timm:<architecture>, a pathology foundation model preset, histogram, or a checkpoint file. Each
--encoder-weights FILE and --encoder-options JSON belongs to the --encoder just before it. An encoder
sees the preprocessed images through its own input steps and normalisation (no stain step).

Writes DIR/real_data_results.csv (one row per method: colour histogram, untrained network, trained,
then one per --encoder; columns test_* and train_* per protocol, and the encoder's spec and weights
hash; with --groups also test_protocol and train_protocol, groups, groups_sha256 and num_groups),
DIR/real_data_results.md (the same table, with the command, headed by the protocols' names), and
DIR/real_data_settings.json (the exact command, the train.py command, the seed and every setting). Exit status 2 with one line
for bad input, 1 when some images could not be read.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.real_data")

from histo_retrieval.errors import UserError, run_script  # noqa: E402  (torch-free)
from histo_retrieval.files import atomic_write_text, command_argv, folder_images, natural_sorted, write_csv  # noqa: E402

METHODS = ("colour histogram", "untrained network", "trained")
PROTOCOLS = ("test", "train")
PROTOCOL_NAMES = {"test": "leave-one-out inside the test set (the paper's protocol)",
                  "train": "each test patch searched against the training set (Kimia Path24's own protocol)"}
# (CSV column suffix, heading, key in metrics.retrieval_metrics' result)
METRICS = (("eta_p", "eta_p", "eta_p"), ("eta_W", "eta_W", "eta_w"), ("eta_total", "eta_total", "eta_total"),
           ("recall@1", "Recall@1", "recall@1"), ("map@r", "mAP@R", "map@r"))
# train.py options the bench sets itself (argument destinations).
OWNED_OPTIONS = {"data_dir": "--data-dir", "output_dir": "--output-dir"}
SPLITS = ("train", "test")


# ----------------------------------------------------------------------------- arguments
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m bench.real_data", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", metavar="ROOT", help="folder with train/<class>/ and test/<class>/ image folders")
    parser.add_argument("--out", default="outputs/real_data",
                        help="folder for the preprocessed data, the models and the results (default: %(default)s)")
    parser.add_argument("--model", default="se_resnet50", help="train.py's model (default: %(default)s)")
    parser.add_argument("--loss", default="MSLoss", help="train.py's loss (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=300,
                        help="side of the preprocessed images, data_process.py --size; train.py crops "
                             "--crop-size (224 by default) out of them (default: %(default)s, the paper's)")
    parser.add_argument("--resize", choices=("reference", "antialias"), default="reference",
                        help="data_process.py --resize: reference (the reference's cv2 INTER_CUBIC pixels) or "
                             "antialias (Pillow's antialiased bicubic) (default: %(default)s)")
    parser.add_argument("--histogram-bins", type=int, default=8,
                        help="colour-histogram bins per channel, joint over R, G, B (default: %(default)s, "
                             "512 bins in all)")
    parser.add_argument("--eval-batch-size", type=int, default=32,
                        help="images per forward pass in the evaluation (default: %(default)s, multi_test.py's)")
    parser.add_argument("--groups", default=None, metavar="CSV",
                        help="CSV with columns image,group naming each ROOT image's slide or patient: no image of "
                             "the query's group is its neighbour (protocols test-groups, train-groups; every test "
                             "image needs a group) (default: none, the paper's protocols)")
    from histo_retrieval.encoders.registry import add_encoder_args  # imports torch: a second or two

    add_encoder_args(parser, repeatable=True,
                     spec_help="an encoder to add as a row, scored with no training: timm:<architecture>, a preset, "
                               "histogram, or a checkpoint file (docs/encoders.md; default: none, the three rows "
                               "only).")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The bench's options before `--`; what follows `--` lands untouched in `train_options`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    train_options: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_options = argv[:cut], argv[cut + 1:]
    parser = get_args_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognised arguments: {shlex.join(unknown)} (train.py's options go after `--`, "
                     f"e.g. python3 -m bench.real_data ROOT -- --epochs 30 --device cuda)")
    args.train_options = train_options
    return args


def train_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """train.py's command line: the bench's folders and --keep-best 1 first, so that the user's options win
    where they repeat one (argparse keeps the last)."""
    return [args.model, args.loss, "--data-dir", str(out / "data" / "train"), "--output-dir", str(out / "model"),
            "--keep-best", "1", *args.train_options]


def parse_train_options(argv: list[str], out: Path) -> argparse.Namespace:
    """The train.py namespace of `argv` (train.py's own parser, so every option it has, now or later,
    is accepted); UserError for an option the bench must set itself."""
    import train

    parser = train.get_args_parser()
    parser.prog = "python3 -m bench.real_data ROOT ... -- [train.py options]"

    def one_line_error(message: str) -> None:  # argparse's usage of train.py would bury the message
        raise UserError(f"train.py options after `--`: {message} (python3 train.py --help lists them)")

    parser.error = one_line_error
    targs = parser.parse_args(argv)
    expected = {"data_dir": str(out / "data" / "train"), "output_dir": str(out / "model")}
    for dest, flag in OWNED_OPTIONS.items():
        if str(getattr(targs, dest)) != expected[dest]:
            raise UserError(f"{flag} is set by the bench ({expected[dest]}); use --out DIR to move its outputs")
    for dest, flag in (("save_bare_state_dict", "--save-bare-state-dict"), ("summary", "--summary")):
        if getattr(targs, dest, False):
            raise UserError(f"{flag} does not fit the bench, which evaluates train.py's checkpoint dict; leave it out")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UserError("the bench runs in one process; run train.py under torchrun yourself, then "
                        "multi_test.py --protocol both")
    return targs


# ----------------------------------------------------------------------------- ROOT
def check_root(root: Path, out: Path) -> dict[str, dict[str, int]]:
    """{split: {class: images}} of ROOT; UserError (one line) for a missing folder, a split without
    classes, classes that differ between train/ and test/, an empty class, or --out inside ROOT."""
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; ROOT must hold train/<class>/ and test/<class>/ image folders")
    missing = [f"{split}/" for split in SPLITS if not (root / split).is_dir()]
    if missing:
        raise UserError(f"{root}: no {' and no '.join(missing)} folder; ROOT must hold train/<class>/ and "
                        "test/<class>/ image folders")
    resolved_root, resolved_out = root.resolve(), out.resolve()
    if resolved_out == resolved_root or resolved_root in resolved_out.parents:
        raise UserError(f"--out {out} lies inside ROOT {root}, which must stay untouched; choose another --out")
    classes = {split: natural_sorted(p.name for p in (root / split).iterdir()
                                     if p.is_dir() and not p.name.startswith(".")) for split in SPLITS}
    for split in SPLITS:
        if not classes[split]:
            raise UserError(f"{root / split}: no class folders; put each class's images in {root / split}/<class>/")
    if classes["train"] != classes["test"]:
        only_train = [c for c in classes["train"] if c not in classes["test"]]
        only_test = [c for c in classes["test"] if c not in classes["train"]]
        parts = [f"only in train/: {', '.join(only_train)}" if only_train else "",
                 f"only in test/: {', '.join(only_test)}" if only_test else ""]
        raise UserError(f"{root}: train/ and test/ have different classes ({'; '.join(p for p in parts if p)}); "
                        "both need the same class folders")
    if len(classes["train"]) < 2:
        raise UserError(f"{root}: one class ({classes['train'][0]}); retrieval needs at least 2")
    counts = {split: {c: len(folder_images(root / split / c)) for c in classes[split]} for split in SPLITS}
    for split in SPLITS:
        empty = [c for c, n in counts[split].items() if n == 0]
        if empty:
            raise UserError(f"{root / split}: no images in {', '.join(empty)} (accepted: .bmp .jpeg .jpg .png "
                            ".tif .tiff)")
    return counts


def preprocess(args: argparse.Namespace, root: Path, data: Path, source_counts: dict) -> dict:
    """data_process.py ROOT --out DIR/data: every image to an --image-size px RGB PNG (skipping outputs
    already complete); UserError when DIR/data also holds images that are not from ROOT."""
    from KIMIA_data import data_process

    argv = [str(root), "--out", str(data), "--size", str(args.image_size), "--resize", args.resize]
    print(f"    {shlex.join(['python3', 'KIMIA_data/data_process.py', *argv])}", flush=True)
    record = data_process.main(data_process.get_args_parser().parse_args(argv))
    for split in SPLITS:
        on_disk = sum(len(folder_images(data / split / c)) for c in source_counts[split])
        extra = [p.name for p in (data / split).iterdir() if p.is_dir() and p.name not in source_counts[split]]
        if extra or on_disk != sum(record["counts"][split].values()):
            raise UserError(f"{data / split} holds images that are not from {root} (earlier data?); remove "
                            f"{data} or choose another --out")
    return {"argv": argv, "record": record}


# ----------------------------------------------------------------------------- groups
def read_root_groups(path: str, root: Path, data: Path):
    """The groups of --groups, read against ROOT's images (histo_retrieval.data.datasets.read_groups: the
    one reader, its errors) and renamed to the images data_process.py writes into `data`."""
    from histo_retrieval.data.datasets import read_groups
    from KIMIA_data.data_process import output_path

    groups = read_groups(path, root, SPLITS[::-1])  # test first: every query needs a group
    moved = {}
    for key in groups.by_image:
        split, class_name, name = key.split("/")
        moved[key] = output_path(data, split, class_name, Path(name).stem).relative_to(data).as_posix()
    return groups.moved(moved)


# ----------------------------------------------------------------------------- the untrained network
def untrained_state_dict(model_name: str, model_options: dict, seed: int) -> dict:
    """The weights train.py starts from without --pretrained: seed_everything(seed) then the model built
    with the run's options (train.py builds it right after seeding)."""
    import models
    from histo_retrieval.runtime import seed_everything

    seed_everything(seed)
    model = models.build_model(model_name, **model_options)
    return {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}


def write_untrained_checkpoint(trained_path: str | os.PathLike, path: Path) -> Path:
    """train.py's checkpoint dict of `trained_path` with the untrained weights of its architecture,
    options and seed (the crop, classes and input preprocessing stay the trained model's)."""
    from histo_retrieval.evaluation.checkpoint import save_torch_file
    from histo_retrieval.encoders.weights import read_torch_file

    content = read_torch_file(trained_path)
    if not isinstance(content, dict) or "model_name" not in content:
        raise UserError(f"{trained_path}: not train.py's checkpoint dict; cannot build the untrained network")
    untrained = dict(content)
    untrained.update({
        "model": untrained_state_dict(content["model_name"], dict(content["model_options"]), int(content["seed"])),
        "optimizer": None, "lr_scheduler": None, "scaler": None, "epoch": -1, "history": [],
        "val_loss": None, "best_val_loss": None, "pretrained": None,
        "untrained_from": os.fspath(trained_path),  # beyond train.py's keys: what this file stands beside
    })
    save_torch_file(untrained, path)
    return path


# ----------------------------------------------------------------------------- the encoders
def histogram_encoder(bins: int, crop_size: int, preprocessing, device):
    """The registry's colour histogram at the checkpoint's crop, with the checkpoint's stain step
    (`preprocessing`: histo_retrieval.data.preprocessing.Preprocessing, or None) and no mean and std
    (the histogram counts the uint8 colours)."""
    from dataclasses import replace

    from histo_retrieval.data.preprocessing import Preprocessing
    from histo_retrieval.encoders import load_encoder

    encoder = load_encoder("histogram", device, options={"bins": bins, "crop_size": crop_size})
    stain = getattr(preprocessing, "stain", None)
    return replace(encoder, preprocessing=Preprocessing(stain=stain)) if stain else encoder


def method_name(request, taken: set[str]) -> str:
    """A table row's name for an --encoder: its spec, with its weights file's name when it has one
    (`timm:resnet18 (r18.pth)`), numbered when an earlier row has the same name."""
    name = request.spec + (f" ({os.path.basename(request.weights)})" if request.weights else "")
    if request.options:
        name += f" {json.dumps(request.options, sort_keys=True)}"
    chosen = next(candidate for candidate in [name] + [f"{name} #{n}" for n in range(2, len(taken) + 3)]
                  if candidate not in taken)
    taken.add(chosen)
    return chosen


# ----------------------------------------------------------------------------- the table
def table_rows(results: dict[str, dict[str, dict]], extra: dict[str, Any]) -> list[dict]:
    """One row per method, in the order of `results`: its metrics per protocol, then `extra`, then the
    encoder that made it (crop size, spec, kind, weights hash, input steps), then with groups the
    protocols' names (test-groups, train-groups) and the groups file."""
    from histo_retrieval.evaluation.protocols import protocol_label

    rows = []
    for method in results:
        row: dict[str, Any] = {"method": method}
        for protocol in PROTOCOLS:
            result = results[method][protocol]
            row.update({f"{protocol}_{column}": float(result[key]) for column, _, key in METRICS})
        for protocol in PROTOCOLS:
            result = results[method][protocol]
            row[f"{protocol}_queries"] = result["num_queries"]
            row[f"{protocol}_gallery"] = result["num_gallery"]
        test = results[method]["test"]
        rows.append({**row, **extra, "crop_size": test["crop_size"], "encoder": test["encoder"],
                     "encoder_kind": test["encoder_kind"], "weights_sha256": test["weights_sha256"],
                     "input_steps": json.dumps(test["input_steps"], sort_keys=True)})
        if test.get("groups"):  # only then: without --groups the columns stay as they were
            rows[-1].update({f"{protocol}_protocol": protocol_label(results[method][protocol]) for protocol in PROTOCOLS})
            rows[-1].update({key: test[key] for key in ("groups", "groups_sha256", "num_groups")})
    return rows


def markdown_table(rows: list[dict]) -> str:
    names = {protocol: rows[0].get(f"{protocol}_protocol", protocol) if rows else protocol for protocol in PROTOCOLS}
    headings = [f"{names[protocol]}: {heading}" for protocol in PROTOCOLS for _, heading, _ in METRICS]
    lines = ["| method | " + " | ".join(headings) + " |", "|---" * (1 + len(headings)) + "|"]
    for row in rows:
        cells = [f"{row[f'{protocol}_{column}']:.4f}" for protocol in PROTOCOLS for column, _, _ in METRICS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chance_note(counts: dict[str, int]) -> str:
    """What a random neighbour would give on these test classes."""
    total = sum(counts.values())
    eta_p = sum((n / total) ** 2 for n in counts.values())
    return (f"chance (a random neighbour): eta_p about {eta_p:.4f}, eta_W about {1 / len(counts):.4f}, "
            f"eta_total about {eta_p / len(counts):.4f}")


# ----------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    started = time.time()
    root, out = Path(args.root).expanduser(), Path(args.out).expanduser()
    if args.histogram_bins < 1 or args.histogram_bins > 256:
        raise UserError(f"--histogram-bins must be 1 to 256, got {args.histogram_bins}")
    if args.eval_batch_size < 1:
        raise UserError(f"--eval-batch-size must be at least 1, got {args.eval_batch_size}")
    if args.image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    source_counts = check_root(root, out)
    classes = list(source_counts["train"])
    print(f"ROOT {root}: {len(classes)} classes, {sum(source_counts['train'].values())} training and "
          f"{sum(source_counts['test'].values())} test images", flush=True)
    argv = train_argv(args, out)
    targs = parse_train_options(argv, out)  # before any work: a bad option fails at once
    if targs.crop_size > args.image_size:
        raise UserError(f"--crop-size {targs.crop_size} is larger than --image-size {args.image_size}; lower the "
                        "crop (after --) or raise --image-size")
    import torch

    import train
    from histo_retrieval.encoders.project import load_model
    from histo_retrieval.encoders.registry import check_encoder_spec, encoder_requests, load_encoder
    from histo_retrieval.evaluation.protocols import Evaluator

    requests = encoder_requests(args)
    for request in requests:  # before any work: a bad --encoder fails at once
        check_encoder_spec(request.spec, request.weights, request.options)
    data = out / "data"
    groups = read_root_groups(args.groups, root, data) if args.groups else None  # before any work too
    if groups:
        print(f"groups: {groups.path} ({len(groups.names)} groups, sha256 {groups.sha256[:12]})", flush=True)
    step = time.time()
    print(f"\n[1/4] preprocessing {root} -> {data} ({args.image_size} px, --resize {args.resize})", flush=True)
    prepared = preprocess(args, root, data, source_counts)
    print(f"[1/4] done in {time.time() - step:.0f} s", flush=True)

    step = time.time()
    print(f"\n[2/4] training: {shlex.join(['python3', 'train.py', *argv])}", flush=True)
    trained = train.main(targs)
    best = trained.get("best_checkpoint")
    if not best or not Path(best).is_file():
        raise UserError(f"train.py left no best-validation checkpoint in {out / 'model'}")
    best_epoch = next((h["epoch"] + 1 for h in reversed(trained["history"])  # counted from 1, as train.py prints
                       if h["val_loss"] == trained["best_val_loss"]), None)
    print(f"[2/4] done in {time.time() - step:.0f} s; validation-selected checkpoint: {best} "
          f"(validation loss {trained['best_val_loss']:.4f}, epoch {best_epoch or '?'})",
          flush=True)

    step = time.time()
    untrained_path = out / "untrained" / f"{Path(best).name.rsplit('_', 1)[0]}_untrained.pth"
    print(f"\n[3/4] untrained network: {targs.model} initialised with seed {targs.seed} -> {untrained_path}", flush=True)
    write_untrained_checkpoint(best, untrained_path)
    print(f"[3/4] done in {time.time() - step:.0f} s", flush=True)

    step = time.time()
    device = trained.get("device") or targs.device
    print(f"\n[4/4] evaluating the {len(METHODS) + len(requests)} methods under both protocols on {device}", flush=True)
    results: dict[str, dict[str, dict]] = {}
    names = set(METHODS)
    with Evaluator(data, batch_size=args.eval_batch_size, amp=targs.amp, device=device, workers=targs.workers,
                   channels_last=targs.channels_last, groups=groups) as evaluator:
        trained_encoder = load_model(best, evaluator.device)
        crop_size = trained_encoder.crop_size
        stain = trained_encoder.preprocessing.stain
        # Each encoder is loaded when its turn comes, so that one model at a time holds memory.
        encoders = {"colour histogram": lambda: histogram_encoder(args.histogram_bins, crop_size,
                                                                  trained_encoder.preprocessing, evaluator.device),
                    "untrained network": lambda: load_model(untrained_path, evaluator.device),
                    "trained": lambda: trained_encoder}
        for request in requests:
            encoders[method_name(request, names)] = (
                lambda request=request: load_encoder(request.spec, evaluator.device, request.weights, request.options))
        for method, load in encoders.items():
            encoder = load()
            print(f"    {method}: {encoder.describe()}", flush=True)
            results[method] = {r["protocol"]: r for r in evaluator.evaluate(encoder, PROTOCOLS)}
            del encoder
            if method == "trained":
                del trained_encoder
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        failed = evaluator.failed_images
    print(f"[4/4] done in {time.time() - step:.0f} s", flush=True)

    command = shlex.join(command_argv()) if sys.argv and sys.argv[0] else ""
    train_command = shlex.join(["python3", "train.py", *argv])
    extra = {"crop_size": crop_size, "seed": targs.seed, "command": command}
    rows = table_rows(results, extra)
    csv_path, md_path, settings_path = (out / "real_data_results.csv", out / "real_data_results.md",
                                        out / "real_data_settings.json")
    write_csv(rows, csv_path)
    table = markdown_table(rows)
    class_counts = {name: int((results["trained"]["test"]["confusion"][i]).sum())
                    for i, name in enumerate(results["trained"]["test"]["class_names"])}
    encoder_notes = [f"{method} = {result['test']['encoder']} ({result['test']['encoder_kind']}, weights "
                     f"{result['test']['weights_sha256'][:12]}) with no training, through its own input steps "
                     f"({result['test']['input_steps']}) and normalisation ({result['test']['normalisation']})"
                     for method, result in results.items() if method not in METHODS]
    labels = {protocol: rows[0].get(f"{protocol}_protocol", protocol) for protocol in PROTOCOLS}
    notes = [
        f"Protocols: test = {PROTOCOL_NAMES['test']}; train = {PROTOCOL_NAMES['train']}."
        + (f" With --groups {groups.path} ({len(groups.names)} groups, sha256 {groups.sha256}): "
           + "; ".join(f"{labels[p]} = {p}, never an image of the query's group" if labels[p] != p
                       else f"{p} = as without groups (the file gives no training image a group)" for p in PROTOCOLS)
           + "." if groups else ""),
        f"Rows: colour histogram = nearest neighbour by the cosine of {args.histogram_bins}^3-bin joint RGB histograms "
        f"of the {crop_size} px eval crops (L1-normalised{', after the checkpoint stain normalisation' if stain else ''}); "
        f"untrained network = {targs.model} initialised with seed "
        f"{targs.seed}, embedded as the trained one; trained = the validation-selected checkpoint {Path(best).name}"
        + "".join(f"; {note}" for note in encoder_notes) + ".",
        chance_note(class_counts) + ".",
    ]
    markdown = (f"# Real-data check\n\nCommand: `{command}`\n\ntrain.py: `{train_command}`\n\n"
                f"Seed {targs.seed}; {len(classes)} classes; {results['trained']['test']['num_queries']} test and "
                f"{results['trained']['train']['num_gallery']} training images; {args.image_size} px images, "
                f"{crop_size} px crops.\n\n{table}\n\n" + "\n\n".join(notes) + "\n")
    atomic_write_text(md_path, markdown)
    settings = {
        "command": command, "train_command": train_command, "seed": targs.seed, "root": str(root.resolve()),
        "out": str(out.resolve()), "bench_options": {k: v for k, v in vars(args).items() if k != "train_options"},
        "train_options": args.train_options, "train_settings": {k: _jsonable(v) for k, v in vars(targs).items()},
        "data_process": {"command": shlex.join(["python3", "KIMIA_data/data_process.py", *prepared["argv"]]),
                         "size": prepared["record"]["size"], "resize": prepared["record"]["resize"],
                         "counts": prepared["record"]["counts"], "failed": prepared["record"]["failed"]},
        "trained_checkpoint": str(best), "best_val_loss": trained["best_val_loss"], "best_epoch": best_epoch,
        "epochs_run": len(trained["history"]), "untrained_checkpoint": str(untrained_path),
        "colour_histogram": {"bins_per_channel": args.histogram_bins, "bins": args.histogram_bins ** 3,
                             "normalisation": "L1", "similarity": "cosine", "encoder": "histogram",
                             "encoder_options": {"bins": args.histogram_bins, "crop_size": crop_size},
                             "input": f"the {crop_size} px eval crop (CenterCrop of the preprocessed image)"
                                      + (", stain-normalised as the checkpoint" if stain else "")},
        "encoders": [{"method": method, "spec": request.spec, "weights": request.weights, "options": request.options,
                      **{key: results[method]["test"][key] for key in ("encoder_kind", "weights_sha256", "input_steps",
                                                                        "normalisation", "model", "dim", "pooling")}}
                     for method, request in zip([m for m in results if m not in METHODS], requests)],
        "evaluation": {"device": str(device), "batch_size": args.eval_batch_size, "amp": targs.amp,
                       "channels_last": targs.channels_last, "workers": targs.workers, "crop_size": crop_size,
                       "protocols": PROTOCOL_NAMES, "class_names": results["trained"]["test"]["class_names"]},
        "unreadable": {"training": [list(f) for f in trained.get("unreadable") or []],
                       "evaluation": [list(f) for f in failed]},
        "torch": torch.__version__, "seconds": round(time.time() - started, 1),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results_csv": csv_path.name, "results_md": md_path.name,
    }
    if groups:
        settings["groups"] = {**groups.record(), "protocols": labels, "rows_naming_no_image": groups.unmatched_rows}
    atomic_write_text(settings_path, json.dumps(settings, indent=1) + "\n")

    print(f"\n=== {len(classes)} classes, seed {targs.seed}, {crop_size} px crops; columns per protocol "
          f"(test: leave-one-out in the test set, the paper's; train: test against the training set"
          f"{'; -groups: never an image of the query' + chr(39) + 's group' if groups else ''})\n")
    print(table)
    print("\n" + "\n".join(notes))
    print(f"\nWritten: {csv_path}, {md_path}, {settings_path}. Took {time.time() - started:.0f} s.")
    unreadable = bool(trained.get("unreadable") or failed or prepared["record"]["failed"])
    if unreadable:
        print("warning: some images could not be read (listed above and in the settings file); exit status 1",
              file=sys.stderr)
    bad = [m for m in results for p in PROTOCOLS for _, _, k in METRICS if not math.isfinite(results[m][p][k])]
    if bad:
        print(f"warning: non-finite metrics for {sorted(set(bad))} (a class with a single test image has no "
              "leave-one-out match)", file=sys.stderr)
    return 1 if unreadable else 0


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str, list, dict)) else str(value)


if __name__ == "__main__":
    sys.exit(run_script(main, parse_args()))
