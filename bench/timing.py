"""Timing, the machine's load during a measurement, where a table is recorded, and the random
checkpoint, shared by the benchmarks."""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Self

import torch

RESULTS = Path(__file__).resolve().parent / "results.md"


def median_seconds(step: Callable[[], None], device: torch.device, iterations: int, warmup: int) -> float:
    """Median wall time of one call of `step`, after `warmup` calls, synchronising CUDA around each."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_checkpoint(path: Path, model_name: str, crop_size: int, seed: int) -> None:
    """A randomly initialised model (its default options) in train.py's checkpoint dict
    (histo_retrieval.evaluation.checkpoint.training_checkpoint), for benchmarks that need a model but not a trained one."""
    import models
    from histo_retrieval.evaluation.checkpoint import save_torch_file, training_checkpoint

    torch.manual_seed(seed)
    model = models.build_model(model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    run = {"model_name": models.canonical_model_name(model_name), "loss_name": "MSLoss",
           "model_options": models.default_model_options(model_name), "loss_options": {},
           "class_names": ["s0", "s1", "s2"], "history": [{"val_loss": 0.5}], "best_val_loss": 0.5,
           "train_files": [], "command": "python3 train.py"}
    save_torch_file(training_checkpoint(model, optimizer, scheduler, None, 0,
                                        {"model": model_name, "crop_size": crop_size, "seed": seed}, run), path)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def system_busy() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal) since boot."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def load_note(load: tuple[float, float]) -> str:
    """The load average at a measurement's start and end, and whether other jobs shared the cores."""
    busy = "other jobs shared the machine" if max(load) > (os.cpu_count() or 1) else "a quiet machine"
    return f"Load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, on {os.cpu_count()} cores: {busy}."


def apply_quick_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser, quick: dict) -> None:
    """With --quick, give each option of `quick` left at its default the smaller value there; an
    option given explicitly stays."""
    if args.quick:
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)


def results_file(args: argparse.Namespace) -> str | None:
    """Where a bench records its table: --record, else bench/results.md unless --quick; with
    --no-record nowhere."""
    if args.no_record:
        return None
    return args.record or (None if args.quick else str(RESULTS))


def print_and_record(args: argparse.Namespace, text: str, section: str) -> None:
    """Print a bench's table and put it under `section` of its results file (results_file)."""
    print("\n" + text, flush=True)
    path = results_file(args)
    if path:
        from bench.serve import record  # bench.serve imports this module

        record(path, text, section)


class Meter:
    """Wall time, this process's CPU, its joined children's CPU (the DataLoader's readers) and the
    CPU of everything else on the machine (other programs, the hypervisor's steal) over a block."""

    def __enter__(self) -> Self:
        self.start = (time.perf_counter(), self_cpu(), children_cpu(), system_busy())
        return self

    def __exit__(self, *exc: object) -> None:
        end = (time.perf_counter(), self_cpu(), children_cpu(), system_busy())
        self.wall, self.main_cpu, self.worker_cpu, busy = (b - a for a, b in zip(self.start, end))
        self.other_cores = max(0.0, busy - self.main_cpu - self.worker_cpu) / self.wall

    def result(self, patches: int) -> dict:
        return {"patches": patches, "wall": self.wall, "main_cpu": self.main_cpu, "worker_cpu": self.worker_cpu,
                "other_cores": self.other_cores}
