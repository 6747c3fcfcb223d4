"""An epoch of train.py --freeze-trunk's head on cached vectors: what each epoch costs once the trunk has run.

    python3 -m bench.frozen_head                     # 5,000 vectors of 1024 (UNI's size), linear and MLP heads
    python3 -m bench.frozen_head --dim 1536 --heads linear --epochs 5

The vectors are random (24 classes around their own centres, unit rows, seeded): the head's epoch does
not depend on what made them. Everything else is train.py's: its default settings (batch 60, SGD,
MSLoss, --val-ratio 0.1), the loaders over cached vectors (histo_retrieval.training.frozen.vector_loaders),
train_one_epoch and validate. An epoch here is the training pass and the validation pass; the figure is
the median over --epochs, after one untimed epoch.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.frozen_head")

import torch
import torch.nn.functional as F

import losses  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from histo_retrieval.data.datasets import split_train_val  # noqa: E402
from histo_retrieval.files import command_line  # noqa: E402
from histo_retrieval.training.frozen import CachedVectors, vector_loaders  # noqa: E402
from histo_retrieval.training.loop import resolve_loss, seed_epoch, train_one_epoch, validate  # noqa: E402


class _Images:
    """The two attributes of a data set that CachedVectors reads: its samples and classes."""

    def __init__(self, labels: list[int], num_classes: int) -> None:
        self.samples = [(f"image_{i}.png", label) for i, label in enumerate(labels)]
        self.classes = [f"c{c}" for c in range(num_classes)]


def random_vectors(count: int, dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Unit rows around one random centre per class, and their labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    centres = torch.randn(num_classes, dim, generator=generator)
    return F.normalize(centres[labels] + 2 * torch.randn(count, dim, generator=generator), dim=1), labels.tolist()


def time_head(head_kind: str, vectors: torch.Tensor, labels: list[int], num_classes: int, epochs: int,
              loss: str, extra: list[str]) -> dict:
    """Seconds per epoch (training and validation) of one head, train.py's settings otherwise."""
    args = train.get_args_parser().parse_args(["bench", loss, "--freeze-trunk", "--head", head_kind, "--device", "cpu",
                                               "--epochs", str(epochs + 1), *extra])
    device = torch.device("cpu")
    train_part, val_part = split_train_val(len(labels), args.val_ratio, args.seed)
    cached = CachedVectors(_Images(labels, num_classes), vectors, {i: i for i in range(len(labels))}, {})
    train_loader, val_loader = vector_loaders(args, cached, train_part, val_part, device)
    torch.manual_seed(args.seed)
    head = models.build_head(head_kind, vectors.shape[1], args.head_dim)
    loss_name, loss_options = resolve_loss(args)
    criterion = losses.build_loss(loss_name, **loss_options)
    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    times, train_times = [], []
    for epoch in range(epochs + 1):
        seed_epoch(train_loader, val_loader, args.seed, epoch, 0, 1)
        started = time.perf_counter()
        train_one_epoch(head, criterion, optimizer, train_loader, device, args, None, epoch, False)
        trained = time.perf_counter()
        validate(head, criterion, val_loader, device, args)
        if epoch:  # the first epoch warms up
            times.append(time.perf_counter() - started)
            train_times.append(trained - started)
    return {"head": head_kind, "train_images": len(train_part), "val_images": len(val_part),
            "steps": len(train_loader), "batch_size": args.batch_size, "loss": loss_name,
            "epoch_s": statistics.median(times), "train_s": statistics.median(train_times),
            "params": sum(p.numel() for p in head.parameters())}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=5000, help="cached vectors, split as train.py does (default: 5000)")
    parser.add_argument("--dim", type=int, default=1024, help="their size, the trunk's (default: 1024, UNI's)")
    parser.add_argument("--classes", type=int, default=24, help="classes, as Kimia Path24 (default: 24)")
    parser.add_argument("--heads", nargs="+", choices=models.HEADS, default=list(models.HEADS),
                        help=f"heads to time (default: {' '.join(models.HEADS)})")
    parser.add_argument("--loss", default="MSLoss", help="the loss (default: MSLoss, the paper's)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs, median reported (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random vectors (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args, extra = get_args_parser().parse_known_args(argv)  # the rest goes to train.py's parser
    if args.threads:
        torch.set_num_threads(args.threads)
    vectors, labels = random_vectors(args.vectors, args.dim, args.classes, args.seed)
    load_before = os.getloadavg()[0]
    rows = [time_head(kind, vectors, labels, args.classes, args.epochs, args.loss, extra) for kind in args.heads]
    print(f"command: {command_line()}")
    print(f"{args.vectors} vectors of {args.dim}, {args.classes} classes; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("\n| head | parameters | training / validation vectors | steps of batch | epoch (train + validation) s "
          "| training pass s | vectors/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['head']} | {row['params']:,} | {row['train_images']:,} / {row['val_images']:,} | "
              f"{row['steps']} of {row['batch_size']} | {row['epoch_s']:.2f} | {row['train_s']:.2f} | "
              f"{(row['train_images'] + row['val_images']) / row['epoch_s']:,.0f} |")
    return rows


if __name__ == "__main__":
    main()
