"""Forward + backward time of the three losses against a per-anchor Python loop like the reference's.

    python3 -m bench.loss_speed            # n = 60, 240; M = 1, 4; CPU and, when present, CUDA
    python3 -m bench.loss_speed --quick    # n = 60, M = 1, CPU only, few repeats

The baseline is written as the reference code is (docs/reproduction.md, "Losses"): a Python loop over
anchors and learners, each anchor's positives and negatives picked with boolean masks, the positives
by the reference's `s < 1` test, as our default `self_pair="reference"` does. Embeddings are unit vectors of total size 512 split over the M learners, labels
drawn from 24 classes, as in training with batch 60.
"""
from __future__ import annotations

import argparse
import sys

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.loss_speed")

import torch
import torch.nn.functional as F

from bench.timing import median_seconds  # noqa: E402
from losses import LOSS_NAMES, build_loss, canonical_loss_name  # noqa: E402
from losses.reference import per_anchor_loss  # noqa: E402


# ----------------------------------------------------------------------------- timing
def _batch(n: int, num_learners: int, embedding_dim: int, num_classes: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(num_learners, n, embedding_dim // num_learners, generator=g), dim=-1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return x.to(device).requires_grad_(), labels.to(device)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=list(LOSS_NAMES), help=f"losses to time (default: {' '.join(LOSS_NAMES)})")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[60, 240], help="batch sizes n (default: 60 240)")
    parser.add_argument("--learners", nargs="+", type=int, default=[1, 4], help="numbers of learners M (default: 1 4)")
    parser.add_argument("--embedding-dim", type=int, default=512, help="total embedding size, split over the learners (default: 512)")
    parser.add_argument("--classes", type=int, default=24, help="number of classes labels are drawn from (default: 24)")
    parser.add_argument("--devices", nargs="+", default=None, help="devices to time on (default: cpu, plus cuda when present)")
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per measurement, median reported (default: 50)")
    parser.add_argument("--baseline-repeats", type=int, default=10, help="timed steps of the per-anchor baseline (default: 10)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the slow per-anchor baseline (default: run it)")
    parser.add_argument("--quick", action="store_true", help="n = 60, M = 1, CPU only, 20 repeats: a smoke run (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random batches (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.learners, args.devices = [60], [1], ["cpu"]
        args.repeats, args.baseline_repeats, args.warmup = 20, 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        names = [canonical_loss_name(name) for name in args.losses]
    except ValueError as err:
        parser.error(f"--losses: {err}")
    devices = [torch.device(d) for d in (args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        parser.error("--devices: cuda was asked for but torch sees no CUDA device")

    rows = []
    for device in devices:
        for num_learners in args.learners:
            for n in args.batch_sizes:
                x, labels = _batch(n, num_learners, args.embedding_dim, args.classes, device, args.seed)
                for name in names:
                    loss_fn = build_loss(name)

                    def vectorised() -> None:
                        loss_fn(list(x.unbind(0)), labels).backward()

                    def baseline() -> None:
                        per_anchor_loss(name, x, labels)[0].backward()

                    ours = 1e3 * median_seconds(vectorised, device, args.repeats, args.warmup)
                    row = {
                        "benchmark": "losses",
                        "case": f"{name} fwd+bwd, {device.type}, M={num_learners}, n={n}",
                        "ours": round(ours, 3),
                        "unit": "ms",
                        "loss": name,
                        "device": device.type,
                        "M": num_learners,
                        "n": n,
                    }
                    if not args.no_baseline:
                        reference = 1e3 * median_seconds(baseline, device, args.baseline_repeats, min(args.warmup, 2))
                        row |= {"baseline": round(reference, 3), "speedup": f"{reference / ours:.1f}x"}
                    rows.append(row)
    print(_markdown(rows, threads=torch.get_num_threads()))
    return rows


def _markdown(rows: list[dict], threads: int) -> str:
    lines = [
        f"Forward + backward, median ms per call (torch {torch.__version__}, {threads} CPU threads)",
        "",
        "| loss | device | M | n | ours (ms) | per-anchor loop (ms) | speed-up |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        reference = f"{r['baseline']:.3f}" if "baseline" in r else "-"
        speedup = r.get("speedup", "-")
        lines.append(f"| {r['loss']} | {r['device']} | {r['M']} | {r['n']} | {r['ours']:.3f} | {reference} | {speedup} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
