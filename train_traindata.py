"""The paper's training-set-size experiment: train on a share r of each class, evaluate on the test set.

    python3 train_traindata.py                                   # se_resnet50 + MSLoss, batch 20, r = 0.2 ... 1.0
    python3 train_traindata.py --ratios 0.2 1.0 --epochs 30 --amp bf16
    python3 train_traindata.py ABE_M ABELoss --ratios 0.5        # any model and loss, any train.py option

For each ratio r, every class of --data-dir is cut to int(n_c * r) images (drawn with --seed), then
train.py's split and training run with checkpoints in `<output-dir>/ratio_<r>/`, and the best
checkpoint is evaluated by multi_test.py's code on `<eval-data-dir>/test` (the reference's protocol:
leave-one-out retrieval inside the test set). Results go to `<output-dir>/traindata_results.csv`
(ratio, images used, eta_p, eta_W, eta_total, ...) and the paper's bar chart to
`<output-dir>/traindata_results.png`, both refreshed after each ratio.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Sequence

import torch.distributed as dist

import train
from multi_test import evaluate_checkpoint
from utils import UserError, command_line, exit_on_user_error, pyplot, save_figure, write_csv

DEFAULT_RATIOS = (0.2, 0.4, 0.6, 0.8, 1.0)
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
    train.add_training_arguments(parser)
    parser.set_defaults(batch_size=20, output_dir="model/traindata")
    return parser


def plot_results(rows: Sequence[dict], path: Path, title: str) -> None:
    """Grouped bars of eta_p, eta_W and eta_total per ratio (ours), with the paper's values as ticks."""
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
    ax.set_xticks(range(len(rows)), [str(row["ratio"]) for row in rows])
    ax.set(xlabel="share of the training set", ylabel="percent", ylim=(0, 118), title=title)
    ax.legend(loc="upper center", ncol=4, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train and evaluate each ratio; returns one row per ratio (the CSV's)."""
    if args.resume:
        raise UserError("--resume: train_traindata.py trains each ratio from scratch; resume one ratio with "
                        "train.py --data-ratio R --output-dir <output-dir>/ratio_R --resume .../checkpoint.pth")
    model_name, loss_name, _, _ = train.resolve_names(args)
    bad = [r for r in args.ratios if not 0.0 < r <= 1.0]
    if bad:
        raise UserError(f"--ratios must lie in (0, 1], got {bad}")
    eval_dir = Path(args.eval_data_dir) if args.eval_data_dir else Path(args.data_dir).parent
    if not (eval_dir / "test").is_dir():
        raise UserError(f"{eval_dir / 'test'}: no such folder to evaluate on; run KIMIA_data/data_process.py "
                        "or pass --eval-data-dir")
    output_dir = Path(args.output_dir)
    rows: list[dict[str, Any]] = []
    for ratio in args.ratios:
        run_args = copy.copy(args)
        run_args.data_ratio = ratio
        run_args.output_dir = str(output_dir / f"ratio_{ratio}")
        result = train.main(run_args)
        if dist.is_initialized() and dist.get_rank() != 0:
            dist.barrier()  # rank 0 evaluates and writes
            continue
        metrics = evaluate_checkpoint(result["best_checkpoint"], data_dir=eval_dir, protocol="test",
                                      amp=args.amp, device=result["device"], workers=args.workers)
        rows.append({"ratio": ratio, "images_used": result["num_images"],
                     **{column: metrics[key] for column, key in METRICS},
                     "protocol": "test", "best_val_loss": result["best_val_loss"],
                     "checkpoint": result["best_checkpoint"], "seed": args.seed,
                     "class_names": " ".join(result["class_names"]), "command": command_line()})
        write_csv(rows, output_dir / "traindata_results.csv")
        plot_results(rows, output_dir / "traindata_results.png", f"{model_name} + {loss_name}: training-set size (test protocol)")
        print(f"ratio {ratio}: {result['num_images']} images, eta_p {rows[-1]['eta_p']:.4f} "
              f"eta_W {rows[-1]['eta_W']:.4f} eta_total {rows[-1]['eta_total']:.4f}", flush=True)
        if dist.is_initialized():
            dist.barrier()
    if rows:
        print(f"results: {output_dir / 'traindata_results.csv'}, {output_dir / 'traindata_results.png'}")
    return rows


if __name__ == "__main__":
    try:
        exit_on_user_error(main)(get_args_parser().parse_args())
    finally:
        train.cleanup_distributed()
