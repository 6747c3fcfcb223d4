"""Where and how models run: the device, mixed precision, memory format, loader processes, seeds.

    add_runtime_args(parser)              # --device, --amp, --amp-force, --channels-last, --workers
    device = check_runtime(args)          # validated once, the same way in every script

Mixed precision on a CPU needs the CPU's own bfloat16 (AVX512-BF16 or AMX) or float16 (AVX512-FP16 or
AMX-FP16) instructions, as oneDNN reports them: without them every product is emulated, and se_resnet50
trains many times slower in bfloat16 than in float32 (bench/results.md, "Measured by hand").
`check_runtime` refuses that unless `--amp-force` is given.
"""
from __future__ import annotations

import argparse
import os
import platform
import random

import numpy as np
import torch

from histo_retrieval.errors import UserError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the --amp choices
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
EMULATED_BF16_COST = ("se_resnet50 trains about 7x slower than in float32 (0.09 against 0.67 images/s, oneDNN "
                      "held to AVX2)")


def add_runtime_args(parser: argparse.ArgumentParser, workers: bool = True,
                     workers_note: str = "") -> argparse.ArgumentParser:
    """The runtime flags, with one set of defaults for every script that runs a model; `workers_note`
    adds what --workers means to this script (its help, before the default)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    group.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                       help="mixed precision: bf16 (CUDA, or a CPU with bfloat16 instructions) or fp16 (CUDA, with "
                            "loss scaling in training); embeddings and losses stay float32 (default: %(default)s)")
    group.add_argument("--amp-force", action="store_true",
                       help="use --amp on a CPU without native instructions for it, where it is emulated and many "
                            "times slower (default: off)")
    group.add_argument("--channels-last", action="store_true",
                       help="NHWC memory format: the same results to float rounding, faster on CPUs and with --amp "
                            "on GPUs (default: off)")
    if workers:
        group.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                           help="image-loading processes; 0 loads in the main process"
                                + (f"; {workers_note}" if workers_note else "") + " (default: %(default)s, min(4, cores))")
    return parser


def cpu_name() -> str:
    """The CPU's model name (for benchmark tables and messages)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_runs_natively(dtype: torch.dtype) -> bool:
    """Whether oneDNN finds this CPU's own instructions for `dtype` (bfloat16 or float16)."""
    query = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, query)())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def select_device(name: str | torch.device | None = None) -> torch.device:
    """`name` if given (cpu, cuda, cuda:1, ..., or a torch.device), else cuda when there is one, else cpu."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_amp(amp: str, device: torch.device, force: bool = False, training: bool = True) -> None:
    """Refuse a precision this device cannot run (fp16 training on a CPU) or runs only emulated."""
    if amp == "fp16" and device.type != "cuda" and training:
        raise UserError(f"--amp fp16 needs CUDA to train (device is {device}); use --amp bf16 or --amp off")
    dtype = AMP_DTYPES[amp]
    if dtype is not None and device.type == "cpu" and not force and not cpu_runs_natively(dtype):
        kind = {"bf16": "bfloat16 (AVX512-BF16 or AMX)", "fp16": "float16 (AVX512-FP16 or AMX-FP16)"}[amp]
        raise UserError(f"--amp {amp}: this CPU ({cpu_name()}) has no {kind} instructions, so it is emulated: "
                        f"{EMULATED_BF16_COST}; use --amp off, or add --amp-force to run it anyway")


def check_runtime(args: argparse.Namespace, training: bool = False) -> torch.device:
    """Validate the runtime flags of `add_runtime_args`; returns the device."""
    if getattr(args, "workers", 0) < 0:
        raise UserError(f"--workers must be at least 0, got {args.workers}")
    device = select_device(args.device)
    check_amp(args.amp, device, args.amp_force, training)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
