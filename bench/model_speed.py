"""Cost of the three models: forward FLOPs per image and images per second for inference and training.

    python3 -m bench.model_speed            # batch 8, 224x224, float32 and bfloat16 autocast, CPU (2 threads) + CUDA,
                                       # channels_last
    python3 -m bench.model_speed --quick    # 1 warm-up and 2 timed steps per figure

For resnet50 and ABE_M the baseline is "reference-style": the same modules, but the attention trunk and
the shared tail run once for every head, as the reference code does (docs/reproduction.md, "Models"), and every 1x1
convolution through nn.Conv2d; se_resnet50 has one head, so the reference runs its trunk once too and
there is no separate baseline. The last rows time PointwiseConv2d against nn.Conv2d alone. A training
step is forward, loss, backward and an SGD step (lr 0.001, momentum 0.9, as the reference trains).
FLOPs come from torch.utils.flop_counter (convolutions and matrix products, 2 per multiply-add).
"""
from __future__ import annotations

import argparse
import sys

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.model_speed")

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.timing import median_seconds  # noqa: E402
from losses import build_loss  # noqa: E402
from models import MODEL_NAMES, build_model, canonical_model_name  # noqa: E402
from models.layers import PointwiseConv2d  # noqa: E402
from models.reference import ReferenceStyle  # noqa: E402

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def forward_gflops(model: nn.Module, crop_size: int) -> float:
    """Forward GFLOP for one crop_size x crop_size image, in eval mode."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, crop_size, crop_size))
    return counter.get_total_flops() / 1e9


def images_per_second(model: nn.Module, args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None,
                      train: bool) -> float:
    """Throughput of inference (eval, no grad) or of a training step, under autocast to `dtype` if given."""
    images = torch.rand(args.batch_size, 3, args.crop_size, args.crop_size, device=device)
    images = images.contiguous(memory_format=MEMORY_FORMATS[args.memory_format])
    # Pairs of images per class, so that every anchor has a positive and the loss always back-propagates.
    labels = torch.arange(args.batch_size, device=device) // 2
    loss_fn = build_loss(args.loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def inference() -> None:
        with torch.no_grad(), autocast:
            model(images)

    def training_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()

    model.train(train)
    seconds = median_seconds(training_step if train else inference, device, args.iterations, args.warmup)
    return args.batch_size / seconds


# resnet50's widest 1x1 convolutions at batch 8: (in, out, side, batch), the tail's at 4 x 8.
POINTWISE_SHAPES = ((1024, 256, 14, 8), (2048, 1024, 14, 8), (1024, 512, 14, 32), (512, 2048, 7, 32),
                    (2048, 512, 7, 32))


def pointwise_rows(args: argparse.Namespace) -> list[dict]:
    """Forward + backward of PointwiseConv2d (a matrix product on CPU) against nn.Conv2d, channels_last float32."""
    rows = []
    for in_channels, out_channels, side, batch in POINTWISE_SHAPES:
        torch.manual_seed(args.seed)
        ours = PointwiseConv2d(in_channels, out_channels).to(memory_format=torch.channels_last)
        conv = nn.Conv2d(in_channels, out_channels, 1, bias=False).to(memory_format=torch.channels_last)
        x = torch.randn(batch, in_channels, side, side).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        grad = torch.randn(batch, out_channels, side, side).contiguous(memory_format=torch.channels_last)
        seconds = {key: median_seconds(lambda: layer(x).backward(grad), torch.device("cpu"), args.iterations,
                                       args.warmup) * 1e3
                   for key, layer in (("ours", ours), ("reference-style", conv))}
        case = (f"1x1 conv {in_channels}->{out_channels} at {batch}x{side}x{side} fwd+bwd, cpu ({args.threads} "
                f"threads), float32: PointwiseConv2d vs nn.Conv2d")
        rows.append(_row(case, seconds, "ms", lower_is_better=True))
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES),
                        help=f"models to measure (default: {' '.join(MODEL_NAMES)})")
    parser.add_argument("--devices", nargs="+", default=None, help="devices (default: cpu, plus cuda when present)")
    parser.add_argument("--precisions", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"],
                        help="float32, or bfloat16 autocast (default: float32 bfloat16)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--crop-size", type=int, default=224, help="image side for the timings (default: 224)")
    parser.add_argument("--flops-size", type=int, default=224, help="image side for the FLOP count (default: 224)")
    parser.add_argument("--loss", default="ContrastiveLoss",
                        help="loss of the training step (default: ContrastiveLoss)")
    parser.add_argument("--iterations", type=int, default=10, help="timed steps per figure, median used (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each figure (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: 2)")
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                        help="layout of weights and images, the same for ours and the baseline; bfloat16 on CPU "
                             "needs channels_last to be fast (default: channels_last)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the reference-style timings (default: run them)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps per figure (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and images (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.iterations, args.warmup = 2, 1
    torch.set_num_threads(args.threads)
    names = [canonical_model_name(name) for name in args.models]
    devices = [torch.device(d) for d in (args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))]
    dtypes = {"float32": None, "bfloat16": torch.bfloat16}

    rows: list[dict] = []
    for name in names:
        torch.manual_seed(args.seed)
        model = build_model(name)
        has_baseline = model.num_learners > 1 and not args.no_baseline
        variants = {"ours": model} | ({"reference-style": ReferenceStyle(model)} if has_baseline else {})
        flops = {key: forward_gflops(variant, args.flops_size) for key, variant in variants.items()}
        rows.append(_row(f"{name} forward @{args.flops_size}", flops, "GFLOP/image", lower_is_better=True))
        for device in devices:
            for variant in variants.values():
                variant.to(device, memory_format=MEMORY_FORMATS[args.memory_format])
            where = (f"{device.type} ({args.threads} threads)" if device.type == "cpu"
                     else torch.cuda.get_device_name(device))
            float32_train = None
            for precision in args.precisions:
                for train in (False, True):
                    speeds = {key: images_per_second(variant, args, device, dtypes[precision], train)
                              for key, variant in variants.items()}
                    task = "train step" if train else "inference"
                    case = f"{name} {task}, {where}, {precision}, batch {args.batch_size}, {args.crop_size}px, " \
                           f"{args.memory_format}"
                    rows.append(_row(case, speeds, "images/s"))
                    if train and precision == "float32":
                        float32_train = speeds["ours"]
                    elif train and float32_train is not None:
                        rows.append({"benchmark": "models",
                                     "case": f"{name} train step, {where}, {precision} vs float32",
                                     "ours": round(speeds["ours"], 2), "baseline": round(float32_train, 2),
                                     "unit": "images/s", "speedup": f"{speeds['ours'] / float32_train:.2f}x"})
            for variant in variants.values():
                variant.to("cpu")
    if any(device.type == "cpu" for device in devices) and "float32" in args.precisions:
        rows += pointwise_rows(args)
    print(_markdown(rows))
    return rows


def _row(case: str, figures: dict[str, float], unit: str, lower_is_better: bool = False) -> dict:
    """A row in bench/run_all.py's schema: ours, the reference-style baseline (if any) and the speed-up."""
    row = {"benchmark": "models", "case": case, "ours": round(figures["ours"], 2), "baseline": "", "unit": unit,
           "speedup": ""}
    if "reference-style" in figures:
        baseline = figures["reference-style"]
        speedup = baseline / figures["ours"] if lower_is_better else figures["ours"] / baseline
        row |= {"baseline": round(baseline, 2), "speedup": f"{speedup:.2f}x"}
    return row


def _markdown(rows: list[dict]) -> str:
    lines = [f"Models (torch {torch.__version__}); baseline = reference-style (trunk once per head) or float32",
             "", "| case | ours | baseline | unit | speed-up |", "| --- | ---: | ---: | --- | ---: |"]
    lines += [f"| {r['case']} | {r['ours']} | {r['baseline'] or '-'} | {r['unit']} | {r['speedup'] or '-'} |"
              for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
