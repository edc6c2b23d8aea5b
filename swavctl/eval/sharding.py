"""Spreading an evaluation over processes so that N ranks compute what one process computes.

``swavctl eval-linear --gpus N`` (or ``--gpus 0 --procs N``) runs N ranks:

- **Features** (knn, fast, and val in linear): rank ``r`` reads the images ``r, r + N, ...``
  (:func:`rank_share`); the features are gathered on every rank and put back in dataset order
  (:func:`gather_in_order`), so the classifier sees exactly the single-process features.
- **Training** (linear, finetune): every epoch has one global order of the images, cut into
  global batches of ``batch_size`` as a single process would; rank ``r`` takes the images
  ``r, r + N, ...`` of each global batch (:class:`GlobalBatchSampler`). With the loss summed
  locally and divided by the global count (:func:`cross_entropy_step`), DDP's gradient average is the
  single process's mean gradient over the same global batch, whatever the split.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from swavctl.distributed import dist


def rank_share(num_items: int, rank: int, world: int) -> list[int]:
    """The items ``rank, rank + world, ...`` of ``range(num_items)``."""
    return list(range(rank, num_items, world))


def chunks(items: list[int], size: int) -> list[list[int]]:
    """``items`` cut into consecutive lists of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


class GlobalBatchSampler:
    """This rank's part of each global batch of one epoch (a ``batch_sampler`` for a DataLoader).

    Epoch ``e`` visits ``randperm(num_items)`` seeded with ``seed + e`` (or ``0..n-1`` without
    ``shuffle``) in global batches of ``batch_size``; the last one may be smaller, and is dropped
    when that leaves it a single image and ``drop_single`` is set (batch norm in train mode cannot use
    it). Rank ``r`` of ``world`` yields ``batch[r::world]`` of every global batch, an empty list
    when a small last batch has nothing for it, so all ranks take the same number of steps.
    """

    def __init__(
        self,
        num_items: int,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_single: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_single = drop_single
        self.rank = rank
        self.world = world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """The epoch's global batches (the same on every rank)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        batches = chunks(order, self.batch_size)
        if self.drop_single and self.batch_size > 1 and self.num_items % self.batch_size == 1:
            batches.pop()
        return batches

    def __len__(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        dropped = self.drop_single and self.batch_size > 1 and rest == 1
        return full + int(rest > 0 and not dropped)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank :: self.world]


def this_rank_sampler(
    num_items: int, *, batch_size: int, seed: int, shuffle: bool = True, drop_single: bool = False
) -> GlobalBatchSampler:
    """A :class:`GlobalBatchSampler` for this process's rank in the current process group."""
    return GlobalBatchSampler(
        num_items,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_single=drop_single,
        rank=dist.rank(),
        world=dist.world_size(),
    )


def global_count(local: int, device: torch.device) -> int:
    """The sum of ``local`` over all ranks (``local`` itself on one process)."""
    if not dist.is_distributed():
        return local
    total = torch.tensor([local], dtype=torch.int64, device=device)
    return int(dist.all_reduce_sum(total).item())


def global_sums(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all ranks, in float64."""
    if not dist.is_distributed():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    return [float(v) for v in dist.all_reduce_sum(total).tolist()]


def cross_entropy_step(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    min_count: int = 1,
) -> float | None:
    """One SGD step on the mean cross-entropy of the global batch (this rank holds a part of it).

    The loss this rank backpropagates is its summed loss divided by the global batch's size and
    multiplied by the world size, so DDP's average of the ranks' gradients is exactly the mean
    gradient one process would compute on the whole batch, however unevenly it is split (an
    empty part still joins the step). Every rank skips the step when the global batch has fewer
    than ``min_count`` images. Returns this rank's summed loss, or None when skipped.
    """
    count = global_count(targets.numel(), targets.device)
    if count < min_count:
        return None
    loss_sum = F.cross_entropy(model(inputs), targets, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    (loss_sum * (dist.world_size() / count)).backward()
    optimizer.step()
    return float(loss_sum.detach())


def gather_in_order(rows: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``rows`` with their dataset ``indices``, sorted by index (on every rank).

    ``indices`` may live on the CPU; they travel on ``rows``' device and come back on the CPU.
    """
    if not dist.is_distributed():
        return rows, indices.cpu()
    all_rows = dist.all_gather_rows(rows)
    all_indices = dist.all_gather_rows(indices.to(rows.device)).cpu()
    order = torch.argsort(all_indices)
    return all_rows[order.to(all_rows.device)], all_indices[order]


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel under a process group, else itself."""
    if not dist.is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)
