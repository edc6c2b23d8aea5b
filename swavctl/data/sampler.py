"""A resumable, rank-aware batch sampler.

Epoch ``e`` shuffles the dataset with a generator seeded by ``seed + e`` (as DistributedSampler
does), drops the tail so every rank gets the same number of samples, gives rank ``r`` the indices
``perm[r::world]``, and cuts them into batches of ``batch_size`` with ``drop_last``. So the global
batch ``k`` holds the same images whatever the world size. Resuming mid-epoch starts at batch
``start_batch`` without touching the earlier ones.

Each item is ``(epoch, index)``, so the dataset can seed its augmentation from them and the result
does not depend on which worker process handles it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch (per-rank batches, drop_last)."""
    return (num_samples // world_size) // batch_size


class EpochBatchSampler:
    """Yields lists of ``(epoch, dataset_index)`` for one epoch of one rank."""

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.epoch = epoch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def __len__(self) -> int:
        return max(0, steps_per_epoch(self.num_samples, self.batch_size, self.world_size) - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        per_rank = self.num_samples // self.world_size
        mine = order[: per_rank * self.world_size][self.rank :: self.world_size].tolist()
        total = steps_per_epoch(self.num_samples, self.batch_size, self.world_size)
        for batch in range(self.start_batch, total):
            chunk = mine[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield [(self.epoch, index) for index in chunk]
