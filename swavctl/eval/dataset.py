"""Labelled images for evaluation: decoding (cached in memory when small), views and loaders.

Items are ``(index, uint8 view or None)``; unreadable files come back as ``None`` and are dropped
by :func:`collate`, which keeps the indices, so features and labels stay aligned.
Training views are seeded from ``(seed, epoch, index)`` (the pretraining loader's hash), so they
do not depend on the number of loader workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from swavctl.data.dataset import sample_seed
from swavctl.data.images import BadImage, decode_file
from swavctl.eval.splits import Sample
from swavctl.eval.views import Geometry, center_view, train_view

#: Folders whose encoded files total at most this many bytes are decoded once and kept in memory.
CACHE_LIMIT_BYTES = 64 * 2**20


class ImageCache:
    """Decoded uint8 images by path, filled on first use (only for small data)."""

    def __init__(self) -> None:
        self._images: dict[Path, torch.Tensor | None] = {}
        self.bad: dict[Path, str] = {}

    def get(self, path: Path) -> torch.Tensor | None:
        if path not in self._images:
            self._images[path] = _decode(path, self.bad)
        return self._images[path]


def _decode(path: Path, bad: dict[Path, str]) -> torch.Tensor | None:
    try:
        return decode_file(path)
    except BadImage as exc:
        bad[path] = str(exc)
        return None


def should_cache(samples: Sequence[Sample]) -> bool:
    """True when the encoded files total at most :data:`CACHE_LIMIT_BYTES`."""
    total = 0
    for sample in samples:
        try:
            total += sample.path.stat().st_size
        except OSError:
            continue
        if total > CACHE_LIMIT_BYTES:
            return False
    return True


class LabelledImages(Dataset):
    """``samples`` as training views (``augment=True``) or centre views, per ``geometry``."""

    def __init__(
        self,
        samples: Sequence[Sample],
        geometry: Geometry,
        *,
        augment: bool,
        seed: int,
        cache: ImageCache | None = None,
    ) -> None:
        self.samples = list(samples)
        self.geometry = geometry
        self.augment = augment
        self.seed = seed
        self.cache = cache
        self.epoch = 0
        self.bad: dict[Path, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.samples], dtype=torch.int64)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the training views (call before iterating)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        path = self.samples[index].path
        image = self.cache.get(path) if self.cache is not None else _decode(path, self.bad)
        if image is None:
            return index, None
        if self.augment:
            rng = random.Random(sample_seed(self.seed, self.epoch, index))
            return index, train_view(image, self.geometry, rng)
        return index, center_view(image, self.geometry)


@dataclass
class Batch:
    indices: torch.Tensor  # int64 (B,)
    images: torch.Tensor | None  # uint8 (B, 3, crop, crop), None when every file was unreadable


def collate(items: list[tuple[int, torch.Tensor | None]]) -> Batch:
    """Stack the readable views; keep their dataset indices."""
    good = [(i, x) for i, x in items if x is not None]
    indices = torch.tensor([i for i, _ in good], dtype=torch.int64)
    return Batch(indices, torch.stack([x for _, x in good]) if good else None)


def make_loader(
    dataset: LabelledImages,
    *,
    batch_sampler: Iterable[list[int]],
    workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader of :class:`Batch` es over the index lists of ``batch_sampler``.

    The sampler decides the order and this rank's share (see :mod:`swavctl.eval.sharding`); an
    empty index list gives an empty batch. Small data is cached in memory and read in-process.
    """
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,  # type: ignore[arg-type]
        num_workers=workers if dataset.cache is None else 0,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
