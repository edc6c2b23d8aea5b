"""The embedding queue of SwAV for small batches (Caron et al. 2020, arXiv 2006.09882, App. A.1).

Each process keeps its own queue of past embeddings of the assignment crops. Once full, the queue
is scored with the current prototypes and those rows are prepended to the batch scores for the
Sinkhorn solve, so the equal-partition constraint sees more samples than one batch holds. Only the
batch's own rows of the codes are used for the loss. Then the queue shifts and takes the batch in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from swavctl.config import Settings
from swavctl.errors import UserError


class EmbeddingQueue:
    """A FIFO of ``length`` past embeddings for each of ``num_assignment_crops`` crops.

    ``buffer`` has shape (num_assignment_crops, length, dim); the newest rows come first, as in
    the official code. ``filled`` counts the valid rows, so a queue whose last row happens to be
    zero is not mistaken for an empty one.
    """

    def __init__(self, num_assignment_crops: int, length: int, dim: int) -> None:
        if length <= 0:
            raise ValueError(f"queue length must be positive, got {length}")
        self.buffer = torch.zeros(num_assignment_crops, length, dim)
        self.filled = 0

    @property
    def length(self) -> int:
        return self.buffer.shape[1]

    @property
    def is_full(self) -> bool:
        return self.filled >= self.length

    def to(self, device: torch.device | str) -> EmbeddingQueue:
        self.buffer = self.buffer.to(device)
        return self

    def scores(self, crop_slot: int, prototypes: torch.Tensor) -> torch.Tensor:
        """Scores (length x K) of the queued embeddings of one assignment crop."""
        return self.buffer[crop_slot] @ prototypes.t()

    @torch.no_grad()
    def push(self, crop_slot: int, embeddings: torch.Tensor) -> None:
        """Shift the queue of one assignment crop and put ``embeddings`` (B x dim) first."""
        batch = embeddings.shape[0]
        if batch > self.length:
            raise ValueError(f"a batch of {batch} does not fit a queue of length {self.length}")
        row = self.buffer[crop_slot]
        row[batch:] = row[:-batch].clone()
        row[:batch] = embeddings.detach().to(row.dtype)
        if crop_slot == self.buffer.shape[0] - 1:
            self.filled = min(self.length, self.filled + batch)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.detach().cpu().clone(), "filled": self.filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffer = state["buffer"]
        if buffer.shape != self.buffer.shape:
            raise ValueError(
                f"saved queue has shape {tuple(buffer.shape)}, expected {tuple(self.buffer.shape)}"
            )
        self.buffer = buffer.to(self.buffer.device, self.buffer.dtype).clone()
        self.filled = int(state["filled"])


def queue_length_per_rank(settings: Settings, world: int, warn: Callable[[str], None]) -> int:
    """Official rule: the global length is rounded down to a multiple of the global batch."""
    requested = settings.swav.queue_length
    if requested == 0:
        return 0
    global_batch = settings.train.batch_size * world
    rounded = requested - requested % global_batch
    if rounded == 0:
        raise UserError(
            f"swav.queue_length {requested} is smaller than the global batch {global_batch}; "
            "make it a multiple of the global batch"
        )
    if rounded != requested:
        warn(
            f"swav.queue_length {requested} rounded down to {rounded}, "
            f"a multiple of the global batch {global_batch}"
        )
    return rounded // world
