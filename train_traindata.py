"""The paper's training-set-size experiment: train on a share r of each class, evaluate on the test set.

    python3 train_traindata.py                                   # se_resnet50 + MSLoss, batch 20, r = 0.2 ... 0.8,
                                                                 # and the main experiment (batch 60) as the 100% bar
    python3 train_traindata.py --main-weights model/             # the 100% bar from a main run already trained
    python3 train_traindata.py ABE_M ABELoss --ratios 0.5 --skip-main   # any model and loss, any train.py option

As the reference, the ratios 0.2, 0.4, 0.6 and 0.8 train at batch 20: every class of --data-dir is cut
to int(n_c * r) images (drawn with --seed), then train.py's split and training run with checkpoints in
`<output-dir>/ratio_<r>/`. The paper's 100% bar is its main experiment: taken from --main-weights (the
checkpoint that the validation loss selected among the folder's files of this command's run identity,
e.g. se_resnet50_MSLoss, never an ablation beside it), otherwise trained here with the main recipe
(--main-batch-size 60, every image) into `<output-dir>/main/`. Each run's validation-selected checkpoint
is evaluated by multi_test's protocol (histo_retrieval.evaluation.protocols) on `<eval-data-dir>/test` (the reference's protocol: leave-one-out
retrieval inside the test set). Results go to `<output-dir>/traindata_results.csv` (ratio, images used,
eta_p, eta_W, eta_total, the run each bar comes from, ...) and the paper's bar chart to
`<output-dir>/traindata_results.png`, both refreshed after each run.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Sequence

import torch.distributed as dist

import train
from histo_retrieval.distributed import run_distributed_script
from histo_retrieval.errors import UserError
from histo_retrieval.encoders.project import load_model
from histo_retrieval.evaluation.protocols import Evaluator
from histo_retrieval.files import command_line, write_csv
from histo_retrieval.runtime import select_device
from histo_retrieval.evaluation.selection import VALIDATION, describe_checkpoint, select, validation_loss
from histo_retrieval.training.loop import add_training_arguments, resolve_names
from utils import pyplot, save_figure

DEFAULT_RATIOS = (0.2, 0.4, 0.6, 0.8)  # the reference's; its 100% bar is the main experiment
# The paper's figure (se_resnet50 + MSLoss), read off its bars, in percent: (eta_p, eta_W, eta_total).
PAPER_FIGURE = {0.2: (87.2, 85.6, 74.7), 0.4: (92.1, 89.4, 82.5), 0.6: (94.9, 93.0, 88.4),
                0.8: (95.8, 94.6, 90.7), 1.0: (97.8, 96.9, 94.8)}
METRICS = (("eta_p", "eta_p"), ("eta_W", "eta_w"), ("eta_total", "eta_total"))  # CSV column, multi_test key


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Training-set-size experiment (the paper's figure)", add_help=add_help)
    parser.add_argument("model", nargs="?", default="se_resnet50", help="model name (default: %(default)s)")
    parser.add_argument("loss", nargs="?", default="MSLoss", help="loss name (default: %(default)s)")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS),
                        help="shares of each class to train on; each replaces --data-ratio (default: %(default)s)")
    parser.add_argument("--eval-data-dir", default=None,
                        help="folder holding the test/ split to evaluate on (default: the parent of --data-dir)")
    main_run = parser.add_mutually_exclusive_group()
    main_run.add_argument("--main-weights", default=None, metavar="DIR",
                          help="the main experiment's weight folder (train.py's --output-dir): its validation-selected "
                               "checkpoint is the 100%% bar (default: train the main experiment here)")
    main_run.add_argument("--skip-main", action="store_true", help="no 100%% bar (default: off)")
    parser.add_argument("--main-batch-size", type=int, default=60,
                        help="batch size of the main experiment when it is trained here (default: %(default)s)")
    add_training_arguments(parser)
    parser.set_defaults(batch_size=20, output_dir="model/traindata")
    return parser


def plot_results(rows: Sequence[dict], path: Path, title: str) -> None:
    """Grouped bars of eta_p, eta_W and eta_total per run (ours), with the paper's values as ticks; the
    main experiment's bar is labelled as such."""
    width = 0.27
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    for k, (column, _) in enumerate(METRICS):
        positions = [i + (k - 1) * width for i in range(len(rows))]
        ours = [100 * row[column] for row in rows]
        bars = ax.bar(positions, ours, width, label=column.replace("eta_", "η_"))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        paper = [(p, PAPER_FIGURE[row["ratio"]][k]) for p, row in zip(positions, rows) if row["ratio"] in PAPER_FIGURE]
        if paper:
            ax.scatter(*zip(*paper), marker="_", s=300, color="black", zorder=3,
                       label="paper (se_resnet50 + MSLoss)" if k == 0 else None)
    ax.set_xticks(range(len(rows)), [f"{row['ratio']}\n(main)" if row["run"].startswith("main") else str(row["ratio"])
                                     for row in rows])
    ax.set(xlabel="share of the training set", ylabel="percent", ylim=(0, 118), title=title)
    ax.legend(loc="upper center", ncol=4, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def selected_checkpoint(folder: Path, identity: str) -> Path:
    """The checkpoint that the validation loss of the `identity` run in `folder` selected (its recorded
    settings say which run a file belongs to, so an ablation in the same folder is never taken)."""
    if not folder.is_dir():
        raise UserError(f"--main-weights {folder}: no such folder; pass the --output-dir of the main train.py run")
    runs = {path: describe_checkpoint(path) for path in sorted(folder.glob("*.pth"))}
    chosen = [path for path, label in select(runs.values()).items() if label == VALIDATION and runs[path].run == identity]
    if len(chosen) != 1:
        found = "none" if not chosen else ", ".join(p.name for p in chosen)
        raise UserError(f"--main-weights {folder}: expected one {identity}_<val_loss>.pth run, found "
                        f"{found}; pass the folder of the main run")
    return chosen[0]


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train and evaluate each ratio, then the main experiment; returns one row per bar (the CSV's)."""
    if args.resume:
        raise UserError("--resume: train_traindata.py trains each ratio from scratch; resume one ratio with "
                        "train.py --data-ratio R --output-dir <output-dir>/ratio_R --resume .../<run>_checkpoint.pth")
    names = resolve_names(args)
    model_name, loss_name = names.model_name, names.loss_name
    bad = [r for r in args.ratios if not 0.0 < r <= 1.0]
    if bad:
        raise UserError(f"--ratios must lie in (0, 1], got {bad}")
    eval_dir = Path(args.eval_data_dir) if args.eval_data_dir else Path(args.data_dir).parent
    if not (eval_dir / "test").is_dir():
        raise UserError(f"{eval_dir / 'test'}: no such folder to evaluate on; run KIMIA_data/data_process.py "
                        "or pass --eval-data-dir")
    output_dir = Path(args.output_dir)
    main_weights = selected_checkpoint(Path(args.main_weights), names.identity) if args.main_weights else None
    runs = [(ratio, args.batch_size, f"ratio_{ratio}") for ratio in args.ratios]
    if not args.skip_main and main_weights is None:
        runs.append((1.0, args.main_batch_size, "main"))
    rows: list[dict[str, Any]] = []
    # One evaluator for every bar: the test split is decoded once, not once per run (rank 0 only decodes).
    evaluator = Evaluator(eval_dir, amp=args.amp, device=select_device(args.device), workers=args.workers)

    def add_row(ratio: float, checkpoint: str, run: str, images_used: int | str, unreadable: int | str = "") -> None:
        metrics = evaluator.evaluate(load_model(checkpoint, evaluator.device), ("test",))[0]
        rows.append({"ratio": ratio, "images_used": images_used, **{column: metrics[key] for column, key in METRICS},
                     "run": run, "protocol": "test", "selected_by": VALIDATION,
                     "val_loss": validation_loss(checkpoint), "checkpoint": checkpoint, "seed": args.seed,
                     "unreadable_images": unreadable, "class_names": " ".join(metrics["class_names"]),
                     "command": command_line()})
        write_csv(rows, output_dir / "traindata_results.csv")
        plot_results(rows, output_dir / "traindata_results.png",
                     f"{model_name} + {loss_name}: training-set size (test protocol)")
        print(f"{run}: {images_used} images, eta_p {rows[-1]['eta_p']:.4f} eta_W {rows[-1]['eta_W']:.4f} "
              f"eta_total {rows[-1]['eta_total']:.4f}", flush=True)

    with evaluator:
        for ratio, batch_size, folder in runs:
            run_args = copy.copy(args)
            run_args.data_ratio, run_args.batch_size, run_args.output_dir = ratio, batch_size, str(output_dir / folder)
            result = train.main(run_args)
            if dist.is_initialized() and dist.get_rank() != 0:
                dist.barrier()  # rank 0 evaluates and writes
                continue
            run = (f"main experiment, batch {batch_size}, trained in {run_args.output_dir}" if folder == "main"
                   else f"ratio {ratio}, batch {batch_size}")
            add_row(ratio, result["best_checkpoint"], run, result["num_images"], len(result["unreadable"]))
            if dist.is_initialized():
                dist.barrier()
        if main_weights is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            add_row(1.0, str(main_weights), f"main experiment, given as --main-weights {args.main_weights}", "")
    if rows:
        print(f"results: {output_dir / 'traindata_results.csv'}, {output_dir / 'traindata_results.png'}")
    return rows


def command(args: argparse.Namespace) -> int:
    """The script: main, then exit status 1 when a training run left unreadable images out."""
    return 1 if any(row["unreadable_images"] for row in main(args)) else 0


if __name__ == "__main__":
    sys.exit(run_distributed_script(command, get_args_parser().parse_args()))
