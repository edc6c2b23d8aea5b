"""Embeddings of every image: decode, one centred view, backbone, projection head, L2 norm.

Each image is seen once, as a single view the size of the training's high-resolution crops
(``data.crop_sizes[0]``): the shorter side is resized to that size (antialiased bilinear) and the
centre square is kept, then normalised with the training's mean and std. That is the whole image
for square inputs (the demo digits), and the usual centre crop otherwise.

With several GPUs the model is replicated on each, and every batch is split across the replicas
(CUDA runs them concurrently; the results are gathered on the CPU in order).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from swavctl.data.images import BadImage, decode_file
from swavctl.model.swav import SwAV


@dataclass(frozen=True)
class EvalView:
    """uint8 image (3 x H x W) -> normalised float32 view (3 x size x size)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = TF.resize(image, [self.size], antialias=True)  # shorter side -> size
        image = TF.center_crop(image, [self.size, self.size])
        scaled = image.to(torch.float32) / 255.0
        return TF.normalize(scaled, mean=list(self.mean), std=list(self.std))


class _ImageFiles(Dataset):
    """(index, view) for readable files, (index, reason) for unreadable ones."""

    def __init__(self, paths: Sequence[Path], view: EvalView) -> None:
        self.paths = list(paths)
        self.view = view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        try:
            return index, self.view(decode_file(self.paths[index]))
        except BadImage as exc:
            return index, str(exc) or "cannot decode"


@dataclass
class EmbeddedBatch:
    """Embeddings of one batch (CPU float32, rows in ``indices`` order) and the files it skipped."""

    indices: list[int]
    embeddings: torch.Tensor
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _collate(
    items: list[tuple[int, torch.Tensor | str]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    skipped = [(i, x) for i, x in items if isinstance(x, str)]
    views = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], views, skipped


def pick_devices(gpus: int | None) -> list[torch.device]:
    """The devices to embed on: ``gpus`` CUDA devices, or the CPU for 0 (None = 1 GPU if available)."""
    from swavctl.errors import UserError
    from swavctl.errors.messages import not_enough_gpus

    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    if gpus < 0:
        raise UserError(f"--gpus must be 0 or more, got {gpus}")
    if gpus == 0:
        return [torch.device("cpu")]
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > available:
        raise UserError(not_enough_gpus(gpus, available))
    return [torch.device("cuda", i) for i in range(gpus)]


class Embedder:
    """``z = normalize(head(backbone(x)))`` of view batches, split over one or more devices."""

    def __init__(self, model: SwAV, devices: Sequence[torch.device]) -> None:
        # channels_last (NHWC): faster convolutions and pooling on GPUs and CPUs alike.
        model = model.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.devices = list(devices)
        self.replicas = [model.to(self.devices[0])] + [
            copy.deepcopy(model).to(device) for device in self.devices[1:]
        ]

    @torch.no_grad()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        shards = views.chunk(len(self.replicas)) if len(self.replicas) > 1 else (views,)
        outputs = []
        for replica, device, shard in zip(self.replicas, self.devices, shards, strict=False):
            x = shard.to(device, non_blocking=True)
            outputs.append(replica.embed(replica.features([x])))  # launched on every device first
        return torch.cat([z.float().cpu() for z in outputs])


def iter_embeddings(
    embedder: Embedder, paths: Sequence[Path], view: EvalView, *, batch_size: int, workers: int
) -> Iterator[EmbeddedBatch]:
    """Embed ``paths`` in order, ``batch_size`` files at a time; unreadable files are reported, not raised."""
    loader = DataLoader(
        _ImageFiles(paths, view),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=embedder.devices[0].type == "cuda",
    )
    for indices, views, skipped in loader:
        if views is None:
            yield EmbeddedBatch([], torch.empty(0, 0), skipped)
            continue
        yield EmbeddedBatch(indices, embedder(views), skipped)
