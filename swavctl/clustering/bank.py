"""The per-rank memory bank of DeepCluster-v2 and SeLa-v2: last epoch's assignment-crop embeddings.

Official semantics (``facebookresearch/swav@06b1b7c:main_deepclusterv2.py``): each rank keeps
``local_memory_index[L]`` and ``local_memory_embeddings[n_crops, L, D]`` with
``L = len(loader) * batch_size`` (DC:318-320). Step t of epoch e writes its batch's dataset
indices and the detached, normalised embeddings of the assignment crops (crops 0 and 1) to rows
``t * B .. t * B + B - 1`` (DC:288-293); the bank is clustered at the start of epoch e + 1
("swapping across epochs", P §5.1). Before epoch 0 an ``init_memory`` pass fills it (DC:317-342).
Head h clusters crop slot ``h mod n_crops`` (crop 0 for heads 0 and 2, crop 1 for head 1;
DC:346, 410-411). After clustering, every rank's labels and indices are all-gathered into one
dataset-sized label vector per head, -100 where an image is in no bank (DC:391-408).

Memory: ``n_crops * L * D * 4`` bytes of float32 embeddings plus ``8 * L`` bytes of indices per
rank. ImageNet (1.28M images, 2 assignment crops, D = 128) holds 2 x 1.28M x 128 x 4 B = 1.31 GB
in all, sharded: about 20.4 MB per rank at 64 ranks x 64 images (L = 19,968), 164 MB per rank
at 8 ranks. The bank is a module with registered buffers, so ``.to()`` and ``state_dict()``
carry it; ``load_state_dict`` refuses another shape, i.e. another ``L`` (world size or batch).

Deviation: an unwritten row has index -1 (the official bank starts at index 0); it is never
gathered, and :meth:`MemoryBank.filled` tells the clustering which rows to use. Where two rows
carry the same index (the sampler's padding repeats indices), the official surviving write is
unspecified; here it is the last row in (rank, row) order, deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from swavctl.distributed import dist

EMPTY_INDEX = -1
IGNORE_INDEX = -100


class MemoryBank(nn.Module):
    """``embeddings`` (n_crops x L x D, float32) and ``indices`` (L, int64, -1 = unwritten), L = steps x B."""

    embeddings: torch.Tensor
    indices: torch.Tensor

    def __init__(self, num_crops: int, steps_per_epoch: int, batch_size: int, dim: int) -> None:
        super().__init__()
        if min(num_crops, steps_per_epoch, batch_size, dim) <= 0:
            raise ValueError(
                f"a memory bank needs positive sizes, got crops {num_crops}, steps {steps_per_epoch}, "
                f"batch {batch_size}, dim {dim}"
            )
        self.batch_size = batch_size
        length = steps_per_epoch * batch_size
        self.register_buffer("embeddings", torch.zeros(num_crops, length, dim))
        self.register_buffer("indices", torch.full((length,), EMPTY_INDEX, dtype=torch.int64))

    @property
    def length(self) -> int:
        return self.indices.shape[0]

    def filled(self) -> torch.Tensor:
        """Boolean mask of the written rows (all of them once an epoch with full batches has run)."""
        return self.indices != EMPTY_INDEX

    @torch.no_grad()
    def write(
        self,
        step_in_epoch: int,
        indices: torch.Tensor,
        embeddings_per_crop: Sequence[torch.Tensor] | torch.Tensor,
    ) -> None:
        """Store one step's batch at rows ``step * B ..``: its dataset ``indices`` (b) and, per crop, b x D.

        ``embeddings_per_crop[i]`` is assignment crop i's slice of the crop-major embeddings
        (``emb[crop * b : (crop + 1) * b]``); it is detached and stored in float32. A batch
        smaller than B marks the rest of its rows unwritten.
        """
        batch = indices.shape[0]
        if len(embeddings_per_crop) != self.embeddings.shape[0]:
            raise ValueError(f"expected {self.embeddings.shape[0]} crops, got {len(embeddings_per_crop)}")
        start = step_in_epoch * self.batch_size
        if step_in_epoch < 0 or start >= self.length or batch > self.batch_size:
            raise ValueError(
                f"step {step_in_epoch} with {batch} rows does not fit a bank of {self.length} rows "
                f"written {self.batch_size} per step"
            )
        self.indices[start : start + self.batch_size] = EMPTY_INDEX
        self.indices[start : start + batch] = indices.to(self.indices.device, torch.int64)
        dim = self.embeddings.shape[2]
        for slot, crop in enumerate(embeddings_per_crop):
            if crop.shape != (batch, dim):
                raise ValueError(f"crop {slot}: expected {batch} x {dim}, got {tuple(crop.shape)}")
            rows = crop.detach().to(self.embeddings.device, torch.float32)
            self.embeddings[slot, start : start + batch] = rows

    def gather_labels(self, local_labels: torch.Tensor, dataset_size: int) -> torch.Tensor:
        """Dataset-sized labels from every rank's bank rows: see :func:`gather_dataset_labels`."""
        return gather_dataset_labels(self.indices, local_labels, dataset_size)


@torch.no_grad()
def gather_dataset_labels(
    local_indices: torch.Tensor, local_labels: torch.Tensor, dataset_size: int
) -> torch.Tensor:
    """``out[..., idx] = label`` for every bank row of every rank; -100 for images in no bank.

    ``local_indices`` (L): this rank's dataset indices, -1 for unwritten rows (skipped).
    ``local_labels``: (L,) or (H, L), one label per row (per head). Returns (dataset_size,) or
    (H, dataset_size), int64, on the labels' device. Rows are all-gathered in rank order (a no-op
    without a process group); an index that occurs several times takes the label of its last
    occurrence in (rank, row) order.
    """
    one_head = local_labels.dim() == 1
    per_row = local_labels.reshape(1, -1) if one_head else local_labels
    if per_row.shape[1] != local_indices.shape[0]:
        raise ValueError(f"{per_row.shape[1]} labels for {local_indices.shape[0]} bank rows")
    all_indices = dist.all_gather_rows(local_indices.to(per_row.device, torch.int64))
    all_labels = dist.all_gather_rows(per_row.t().contiguous().to(torch.int64))  # rows x H
    written = all_indices != EMPTY_INDEX
    if bool(((all_indices < 0) & written).any()) or bool((all_indices >= dataset_size).any()):
        raise ValueError(f"bank indices must lie in 0..{dataset_size - 1} (or be -1 for unwritten rows)")
    position = torch.arange(all_indices.shape[0], device=all_indices.device)
    last = torch.full((dataset_size,), -1, dtype=torch.int64, device=all_indices.device)
    last.scatter_reduce_(0, all_indices[written], position[written], reduce="amax")
    out = torch.full((dataset_size, per_row.shape[0]), IGNORE_INDEX, dtype=torch.int64, device=per_row.device)
    present = last >= 0
    out[present] = all_labels[last[present]]
    return out[:, 0].clone() if one_head else out.t().contiguous()
