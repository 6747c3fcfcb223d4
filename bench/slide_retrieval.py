"""Whole-slide retrieval on a synthetic labelled archive, as the field measures it, for three encoders.

    python3 -m bench.slide_retrieval                     # 4 diagnoses x 10 patients x 2 slides, slides up to
                                                         # 4096 x 3072 px at 1.0 um/px, se_resnet50 at 64 px
    python3 -m bench.slide_retrieval --quick             # a tiny archive and a one-epoch model (about a minute)
    python3 -m bench.slide_retrieval --slide-size 1024x768 --train-epochs 5   # smaller and shorter

Steps (each prints its progress), all under --out-dir:
  1. archive/: KIMIA_data/synthetic.py's labelled archive (write_archive): --diagnoses diagnoses, each a
     mixture of tissue classes, --patients patients dealt to them in turn, --slides-per-patient slides
     each, at 1.0 um/px, and archive/labels.csv;
  2. patches/: the synthetic patch set (make_rgb_release) of the tissue classes the archive's slides are
     drawn from (s0 ... s{diagnoses + 1}: each diagnosis's own class and the two shared ones), rendered at
     the archive's scale (160 px patches spanning 160 um, as 160 px at 1.0 um/px), --train-per-class per
     class; the archive's slides are not seen in training;
  3. model/: train.py --model --loss on patches/Training for --train-epochs epochs at --crop-size; the
     checkpoint the validation loss selects (--keep-best 1);
  4. untrained/: the same architecture, options and seed with its initial weights, in the trained
     checkpoint's dict (bench.real_data.write_untrained_checkpoint);
  5. per encoder (the colour histogram at the same crop, the untrained network, the trained checkpoint)
     and tiling (full: every tissue patch of --crop-size px at 1.0 um/px; mosaic: only each slide's
     Yottixel mosaic, when `retrieve.py index` has --mosaic), `retrieve.py index`, `label` with
     archive/labels.csv and `evaluate --exclude patient slide` once per --slide-scores, into indexes/ and
     evaluations/.

Writes --out-dir/slide_retrieval_results.csv (one row per encoder, tiling and exclusion: every column of
retrieve.py evaluate's slide_retrieval.csv, with method and tiling first), slide_retrieval_results.md (the
main columns, with the command) and slide_retrieval_settings.json (the command, the seed, the machine
and every setting). Timings (query_ms_*) are this machine's, shared with whatever else runs on it.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.slide_retrieval")

from histo_retrieval.errors import UserError, run_script  # noqa: E402  (torch-free)
from histo_retrieval.files import atomic_write_text, command_line, write_csv  # noqa: E402

METHODS = ("colour histogram", "untrained network", "trained")
EXCLUSIONS = ("patient", "slide")
ARCHIVE_MPP = 1.0  # the archive's level-0 scale and the tiling's; the patch set is rendered to match it
PATCH_SET_SIZE = 160  # patch-set side in px: make_rgb_release's unit 160/320 = slide_unit(1.0), the same scale
MAIN_COLUMNS = ("top1_acc", "mv5_acc", "mmv5", "map5_sish", "map5_hits", "query_ms_median",
                "query_patches_per_slide", "index_patches_per_slide", "index_bytes_per_slide")
QUICK = {"diagnoses": 2, "patients": 4, "slides_per_patient": 2, "slide_size": "512x384", "train_per_class": 6,
         "train_epochs": 1, "train_batch_size": 10}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m bench.slide_retrieval", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="outputs/slide_retrieval",
                        help="folder for the archive, the models, the indexes and the results (default: %(default)s)")
    parser.add_argument("--diagnoses", type=int, default=4, help="diagnoses in the archive (default: %(default)s)")
    parser.add_argument("--patients", type=int, default=40,
                        help="patients in all, dealt to the diagnoses in turn (default: %(default)s, 10 per diagnosis)")
    parser.add_argument("--slides-per-patient", type=int, default=2, help="slides per patient (default: %(default)s)")
    parser.add_argument("--slide-size", default="4096x3072", metavar="WxH",
                        help="largest level-0 slide size at 1.0 um/px, each side drawn from half to all of it "
                             "(default: %(default)s)")
    parser.add_argument("--model", default="se_resnet50", help="train.py's model (default: %(default)s)")
    parser.add_argument("--loss", default="MSLoss", help="train.py's loss (default: %(default)s)")
    parser.add_argument("--crop-size", type=int, default=64,
                        help="network input and slide patch side in px at 1.0 um/px (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=100,
                        help="synthetic training patches per tissue class (default: %(default)s)")
    parser.add_argument("--train-epochs", type=int, default=20, help="training epochs (default: %(default)s)")
    parser.add_argument("--train-batch-size", type=int, default=30, help="training batch size (default: %(default)s)")
    parser.add_argument("--train-augment", default="stain", choices=("reference", "stain"),
                        help="train.py's --augment: the paper's flips and crop, or those with stain, brightness and "
                             "contrast variation (default: %(default)s)")
    parser.add_argument("--slide-scores", nargs="+", default=["votes", "median-of-best"],
                        choices=("votes", "median-of-best"),
                        help="retrieve.py evaluate's --slide-score, one evaluation each (default: %(default)s)")
    parser.add_argument("--histogram-bins", type=int, default=8,
                        help="colour-histogram bins per channel, joint over R, G, B (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the archive, the patch set and training (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device for training and indexing (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0,
                        help="reader processes for training and indexing (default: %(default)s, in the main process)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 2 diagnoses x 2 patients each x 2 slides of at most 512 x 384 px, 6 "
                             "training patches per class, one epoch, batch 10 (default: off)")
    return parser


def mosaic_available() -> bool:
    """Whether `retrieve.py index` has --mosaic (an index of each slide's Yottixel mosaic only)."""
    import retrieve

    for action in retrieve.get_args_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return any("--mosaic" in a.option_strings for a in action.choices["index"]._actions)
    return False


def retrieve_run(argv: list[str]) -> int:
    """retrieve.py's main on `argv`, in this process; UserError when it reports a failure."""
    import retrieve

    print(f"    {shlex.join(['python3', 'retrieve.py', *argv])}", flush=True)
    status = retrieve.main(retrieve.get_args_parser().parse_args(argv))
    if status:
        raise UserError(f"retrieve.py {argv[0]} exited with status {status} (messages above)")
    return status


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ["method", "tiling", "slide_score", "exclude", *MAIN_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [row["method"], row["tiling"], row["slide_score"], row["exclude"]]
        for column in MAIN_COLUMNS:
            value = float(row[column])
            cells.append(f"{value:.0f}" if column.endswith(("per_slide",)) else
                         f"{value:.1f}" if column.startswith("query_ms") else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    import train
    from bench.real_data import write_untrained_checkpoint
    from histo_retrieval.runtime import cpu_name
    from KIMIA_data import synthetic

    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    started = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    archive, patches = out / "archive", out / "patches"
    tilings = ["full", "mosaic"] if mosaic_available() else ["full"]

    print(f"[1/5] archive: {args.diagnoses} diagnoses, {args.patients} patients, {args.slides_per_patient} slides "
          f"each, at most {args.slide_size} px at {ARCHIVE_MPP} um/px -> {archive}", flush=True)
    record = synthetic.write_archive(archive, args.diagnoses, args.patients, args.slides_per_patient,
                                     size=synthetic.parse_slide_size(args.slide_size), mpp=ARCHIVE_MPP, seed=args.seed)
    classes = args.diagnoses + synthetic.SHARED_CLASSES

    print(f"[2/5] patch set: {classes} tissue classes x {args.train_per_class} patches of {PATCH_SET_SIZE} px "
          f"-> {patches}", flush=True)
    synthetic.make_rgb_release(patches, num_classes=classes, patch_size=PATCH_SET_SIZE,
                               train_per_class=args.train_per_class, test_per_class=1, seed=args.seed,
                               workers=1)

    train_argv = [args.model, args.loss, "--data-dir", str(patches / "Training"), "--output-dir", str(out / "model"),
                  "--epochs", str(args.train_epochs), "--crop-size", str(args.crop_size), "--batch-size",
                  str(args.train_batch_size), "--keep-best", "1", "--val-batches", "fixed", "--seed", str(args.seed),
                  "--augment", args.train_augment, "--device", args.device, "--workers", str(args.workers)]
    train_command = shlex.join(["python3", "train.py", *train_argv])
    print(f"[3/5] training: {train_command}", flush=True)
    trained = train.main(train.get_args_parser().parse_args(train_argv))
    best = trained.get("best_checkpoint")
    if not best or not Path(best).is_file():
        raise UserError(f"train.py left no best-validation checkpoint in {out / 'model'}")

    untrained = out / "untrained" / f"{args.model}_untrained.pth"
    print(f"[4/5] untrained network -> {untrained}", flush=True)
    write_untrained_checkpoint(best, untrained)

    encoders = {"colour histogram": ["--encoder", "histogram", "--encoder-options",
                                     json.dumps({"bins": args.histogram_bins, "crop_size": args.crop_size})],
                "untrained network": ["--encoder", str(untrained)],
                "trained": ["--encoder", str(best)]}
    slides = sorted(str(p) for p in archive.glob("*.tiff"))
    print(f"[5/5] indexing and evaluating {len(slides)} slides: {len(encoders)} encoders x tilings {tilings}",
          flush=True)
    rows: list[dict[str, Any]] = []
    for method, spec in encoders.items():
        slug = method.replace(" ", "_")
        for tiling in tilings:
            index_dir, eval_dir = out / "indexes" / f"{slug}_{tiling}", out / "evaluations" / f"{slug}_{tiling}"
            if index_dir.exists():  # a fresh index each run: `index` adds to an existing one
                import shutil

                shutil.rmtree(index_dir)
            retrieve_run(["index", *spec, *slides, "--index", str(index_dir), "--mpp", str(ARCHIVE_MPP),
                          "--device", args.device, "--workers", str(args.workers),
                          *(["--mosaic"] if tiling == "mosaic" else [])])
            retrieve_run(["label", "--index", str(index_dir), str(archive / synthetic.ARCHIVE_LABELS_NAME)])
            for score in args.slide_scores:
                score_dir = eval_dir if score == "votes" else eval_dir.with_name(f"{eval_dir.name}_{score}")
                retrieve_run(["evaluate", "--index", str(index_dir), "--out-dir", str(score_dir),
                              "--exclude", *EXCLUSIONS, "--slide-score", score])
                for row in read_rows(score_dir / "slide_retrieval.csv"):
                    rows.append({"method": method, "tiling": tiling, **row})

    command = command_line()
    csv_path, md_path, settings_path = (out / "slide_retrieval_results.csv", out / "slide_retrieval_results.md",
                                        out / "slide_retrieval_settings.json")
    write_csv(rows, csv_path)
    table = markdown_table(rows)
    machine = cpu_name() + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "")
    notes = (f"Archive: {args.diagnoses} diagnoses x {args.patients} patients ({args.slides_per_patient} slides each, "
             f"{len(slides)} slides, at most {args.slide_size} px at {ARCHIVE_MPP} um/px), seed {args.seed}. "
             f"Encoders: colour histogram = {args.histogram_bins}^3-bin joint RGB histogram of each {args.crop_size} px "
             f"patch, cosine; untrained network = {args.model} with its initial weights (seed {args.seed}); trained = "
             f"{args.model} + {args.loss}, {args.train_epochs} epoch(s) on the synthetic patch set's {classes} tissue "
             f"classes ({args.train_per_class} patches each, not the archive's slides), checkpoint {Path(best).name} "
             f"selected by validation loss. Tiling: full = every tissue patch of {args.crop_size} px"
             + ("; mosaic = each slide's Yottixel mosaic" if "mosaic" in tilings else
                "; no mosaic rows: this retrieve.py has no `index --mosaic`")
             + f". Slide scores: {', '.join(args.slide_scores)}. Training augmentation: {args.train_augment}. "
             f"Machine: {machine}.")
    atomic_write_text(md_path, f"# Slide retrieval on a synthetic archive\n\nCommand: `{command}`\n\n"
                               f"train.py: `{train_command}`\n\n{table}\n\n{notes}\n")
    settings = {"command": command, "train_command": train_command, "seed": args.seed, "machine": machine,
                "device": args.device, "options": vars(args), "tilings": tilings, "slides": len(slides),
                "archive_mpp": ARCHIVE_MPP, "patch_set_size": PATCH_SET_SIZE, "classes": classes,
                "mixtures": record["mixtures"], "trained_checkpoint": str(best),
                "best_val_loss": trained.get("best_val_loss"), "untrained_checkpoint": str(untrained),
                "torch": torch.__version__, "seconds": round(time.time() - started, 1),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results_csv": csv_path.name, "results_md": md_path.name}
    atomic_write_text(settings_path, json.dumps(settings, indent=1, default=str) + "\n")
    print(f"\n{table}\n\n{notes}\n\nWritten: {csv_path}, {md_path}, {settings_path}. "
          f"Took {time.time() - started:.0f} s.")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_script(main, parse_args()))
