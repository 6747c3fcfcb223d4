"""Print a model's layers, output shapes and parameter count: `python3 -m models se_resnet50`."""
from __future__ import annotations

import argparse
import sys

from models import MODEL_NAMES, build_model, summary


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m models", description=__doc__)
    parser.add_argument("model", help=f"model name, one of {', '.join(MODEL_NAMES)} (case-insensitive)")
    parser.add_argument("--embedding-dim", type=int, default=None,
                        help="total embedding size, split over the learners (default: 512)")
    parser.add_argument("--num-learners", type=int, default=None,
                        help="number of learners M (default: 1 for se_resnet50, 4 for resnet50 and ABE_M)")
    parser.add_argument("--no-attention", action="store_true",
                        help="se_resnet50 without its attention branch, the paper's ablation (default: off)")
    parser.add_argument("--crop-size", type=int, default=224, help="input image side in pixels (default: 224)")
    parser.add_argument("--depth", type=int, default=3, help="nesting depth of the table (default: 3)")
    return parser


def main(args: argparse.Namespace) -> str:
    options = {"embedding_dim": args.embedding_dim, "num_learners": args.num_learners}
    if args.no_attention:
        options["attention"] = False
    options = {key: value for key, value in options.items() if value is not None}
    if args.crop_size < 64:
        raise ValueError(f"--crop-size {args.crop_size}: the models need at least 64x64 pixels")
    model = build_model(args.model, **options)  # ValueError names an unknown model or option
    text = summary(model, crop_size=args.crop_size, depth=args.depth)
    print(text)
    return text


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except ValueError as err:  # the project's one-line error and exit status 2 (models/ imports nothing above it)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
