"""torchrun's process group for training: joining it, the collectives train.py needs, leaving it.

    device, rank, world_size = setup_distributed(device)   # (device, 0, 1) without torchrun
    embeddings, labels = gather_with_grad(embeddings, labels)   # the global batch, differentiable
    sys.exit(run_distributed_script(main, args))   # a script's end: run_script, then leave the group

Every helper also works in a single process (no process group): it then does nothing, or returns its
input, so the training code has one path for both.
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as differentiable

from histo_retrieval.errors import run_script


def setup_distributed(device: torch.device) -> tuple[torch.device, int, int]:
    """(device, rank, world size), joining the torchrun process group when launched by torchrun.

    Under torchrun a CUDA device becomes this process's own GPU (cuda:LOCAL_RANK), and the group
    runs NCCL; on the CPU it runs gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return device, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, rank, world_size


def cleanup_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed_script(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """`histo_retrieval.errors.run_script` for a script that may run under torchrun: the process group is left
    however main ends, so that no process hangs waiting for the others."""
    try:
        return run_script(main, args)
    finally:
        cleanup_distributed()


def barrier() -> None:
    """Wait for every process (nothing in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all processes, in place (unchanged in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_gather_lists(items: list[Any]) -> list[Any]:
    """Every process's `items` (picklable), concatenated in rank order; `items` in a single process."""
    if not dist.is_initialized():
        return list(items)
    parts: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def gather_with_grad(embeddings: list[torch.Tensor], labels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All processes' embeddings and labels, so that each computes the loss of the whole global batch.

    The gather is torch's differentiable all_gather: its backward pass sums every process's gradient
    of the gathered tensor and hands each process its own rows. Every process back-propagates the
    same loss, so its own embeddings receive world_size times their gradient; DDP's averaging over
    processes then leaves exactly the single-batch gradient. All processes' batches must have the
    same size.
    """
    all_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(all_labels, labels)
    with warnings.catch_warnings():
        # torch 2.x marks torch.distributed.nn.functional deprecated in favour of the private
        # _functional_collectives; it is still the public differentiable all_gather, and the warning
        # would otherwise print once per run on every process.
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                                category=FutureWarning)
        gathered = [torch.cat(differentiable.all_gather(x)) for x in embeddings]
    return gathered, torch.cat(all_labels)
