"""Process-group helpers that answer sensibly when no group exists (world size 1, rank 0)."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    """True when a process group with more than one process is initialized."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group, 1 without one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group, 0 without one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank()
    return 0


def is_main() -> bool:
    """True on rank 0 (and always without a process group)."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it; a no-op on one process."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every rank; a no-op on one process."""
    if is_distributed():
        torch_dist.barrier()
