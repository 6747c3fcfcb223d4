"""Timing shared by the benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


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
