"""Batch samplers: P x K class-balanced training batches and the validation batches.

Both deal their batches round-robin to the processes of a distributed run and draw their order from
(seed, epoch) only, so every process agrees on it and a resumed run repeats it (call set_epoch).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from histo_retrieval.errors import UserError


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P = batch_size / K classes with K images each (Wang et al., Multi-Similarity, CVPR 2019).

    Each batch draws P distinct classes among those with at least K images, and K images of each
    without replacement until a class's shuffled pool runs out. An epoch has as many batches as
    the random sampler would give; batches are dealt round-robin to the processes, and the order
    depends only on (seed, epoch), so every process agrees on it (call set_epoch each epoch).
    """

    def __init__(self, labels: Sequence[int], batch_size: int, samples_per_class: int,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if samples_per_class < 2 or batch_size % samples_per_class:
            raise UserError(f"--batch-size {batch_size} must be a multiple of --samples-per-class {samples_per_class} (>= 2)")
        self.k = samples_per_class
        self.p = batch_size // samples_per_class
        by_class: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            by_class.setdefault(int(label), []).append(index)
        self.pools = [indices for indices in by_class.values() if len(indices) >= self.k]
        if self.p < 2 or self.p > len(self.pools):
            raise UserError(f"--sampler pk needs 2 <= P <= {len(self.pools)} (the classes with at least "
                            f"{self.k} training images), got P = {batch_size} / {self.k} = {self.p}; "
                            "change --batch-size or --samples-per-class")
        self.num_batches = len(labels) // (batch_size * num_replicas)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        pools: list[list[int]] = [[] for _ in self.pools]
        for batch_index in range(self.num_batches * self.num_replicas):
            batch = []
            for c in torch.randperm(len(self.pools), generator=generator)[: self.p].tolist():
                if len(pools[c]) < self.k:
                    pools[c] = [self.pools[c][i] for i in torch.randperm(len(self.pools[c]), generator=generator)]
                batch += pools[c][: self.k]
                del pools[c][: self.k]
            if batch_index % self.num_replicas == self.rank:
                yield batch


class ValidationBatches(Sampler[list[int]]):
    """Batches of positions 0 .. size-1 of the validation set, dealt round-robin to the processes, so
    that the mean validation loss does not depend on the process count.

    mode "reference": a new shuffle every epoch, drawn from (seed, epoch), and the last partial batch
    dropped, as the reference's shuffled drop_last loader (which drew from the global RNG instead).
    mode "fixed": consecutive chunks, the last one partial, the same every epoch.
    """

    def __init__(self, size: int, batch_size: int, mode: str, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        self.size, self.batch_size, self.mode, self.seed = size, batch_size, mode, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.stop = size - size % batch_size if mode == "reference" else size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, math.ceil(self.stop / self.batch_size), self.num_replicas))

    def __iter__(self) -> Iterator[list[int]]:
        if self.mode == "reference":
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        batches = [order[i:i + self.batch_size] for i in range(0, self.stop, self.batch_size)]
        yield from batches[self.rank::self.num_replicas]
