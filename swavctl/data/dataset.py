"""The pretraining dataset: decoded images, optionally multi-cropped in the loader workers.

Items are addressed by ``(epoch, index)`` from :class:`~swavctl.data.sampler.EpochBatchSampler`.
The per-image augmentation is seeded from ``(seed, epoch, index)``, so a sample's crops do not
depend on the worker that made them, and a resumed run sees exactly the crops it would have seen.
Unreadable files come back as :class:`Skipped` records and are counted, not raised, unless
``on_bad_image="error"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from swavctl.data.images import BadImage, decode_file

_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that mixes (seed, epoch, index) with a splitmix64-style hash."""
    value = (seed * _MIX + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    value ^= value >> 31
    value = (value * 0xD6E8FEB86659FD93) & (2**64 - 1)
    value ^= value >> 32
    return value & (2**63 - 1)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Batch:
    """One collated batch: either crops (worker augmentation) or raw images (device augmentation)."""

    crops: list[torch.Tensor] | None
    images: list[torch.Tensor] | None
    indices: list[int]
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.indices)


class PretrainDataset(Dataset):
    """Images under a folder; ``transform`` (if given) maps a uint8 image to a list of crops."""

    def __init__(self, paths: Sequence[Path], *, seed: int, transform: Any | None = None, strict: bool) -> None:
        self.paths = [str(p) for p in paths]
        self.seed = seed
        self.transform = transform
        self.strict = strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        epoch, index = key
        path = self.paths[index]
        try:
            image = decode_file(Path(path))
        except BadImage as exc:
            if self.strict:
                raise BadImage(f"{path}: {exc}") from None
            return index, Skipped(path, str(exc))
        if self.transform is None:
            return index, image
        state = torch.random.get_rng_state()
        torch.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return index, self.transform(image)
        finally:
            torch.random.set_rng_state(state)


def collate(items: list[tuple[int, Any]]) -> Batch:
    """Stack crops per crop position (or keep raw images as a list); set skipped files aside."""
    good = [(i, x) for i, x in items if not isinstance(x, Skipped)]
    skipped = [x for _, x in items if isinstance(x, Skipped)]
    indices = [i for i, _ in good]
    if not good:
        return Batch(crops=None, images=None, indices=[], skipped=skipped)
    first = good[0][1]
    if isinstance(first, torch.Tensor):
        return Batch(crops=None, images=[x for _, x in good], indices=indices, skipped=skipped)
    crops = [torch.stack([x[v] for _, x in good]) for v in range(len(first))]
    return Batch(crops=crops, images=None, indices=indices, skipped=skipped)
