"""The baseline loader: the official SwAV data pipeline, reproduced for side-by-side timing.

facebookresearch/swav ``src/multicropdataset.py``: an ``ImageFolder`` whose loader opens each file
with PIL and converts it to RGB, then for every crop a torchvision (v1, PIL-based) ``Compose`` of
RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.8),
RandomGrayscale(0.2), ``PILRandomGaussianBlur`` (PIL's ``ImageFilter.GaussianBlur``, p=0.5,
radius ~ U(0.1, 2.0)), ToTensor and Normalize; PyTorch's default collate. The loader is timed the
way :mod:`swavctl.bench.data` times ours: same batch size, worker count, warm-up and batches, and
a new DataLoader per epoch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset

from swavctl.bench.data import WorkerFigure


class PILRandomGaussianBlur:
    """The official blur: PIL's GaussianBlur with radius ~ U(min, max), applied with probability p."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if np.random.rand() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


def color_distortion(s: float = 1.0) -> T.Compose:
    jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    return T.Compose([T.RandomApply([jitter], p=0.8), T.RandomGrayscale(p=0.2)])


class OfficialMultiCropDataset(Dataset):
    """The official ``MultiCropDataset`` over a list of files."""

    def __init__(
        self,
        paths: Sequence[Path],
        size_crops: Sequence[int],
        nmb_crops: Sequence[int],
        min_scale_crops: Sequence[float],
        max_scale_crops: Sequence[float],
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.228, 0.224, 0.225),
    ) -> None:
        self.paths = [str(p) for p in paths]
        color_transform = [color_distortion(), PILRandomGaussianBlur()]
        trans: list[Any] = []
        for i in range(len(size_crops)):
            rrc = T.RandomResizedCrop(size_crops[i], scale=(min_scale_crops[i], max_scale_crops[i]))
            trans.extend(
                [
                    T.Compose(
                        [
                            rrc,
                            T.RandomHorizontalFlip(p=0.5),
                            T.Compose(color_transform),
                            T.ToTensor(),
                            T.Normalize(mean=list(mean), std=list(std)),
                        ]
                    )
                ]
                * nmb_crops[i]
            )
        self.trans = trans

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        with open(self.paths[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        return [t(image) for t in self.trans]


def bench_official_loader(
    dataset: OfficialMultiCropDataset,
    *,
    batch_size: int,
    workers: int,
    batches: int,
    warmup: int,
    seed: int = 0,
) -> WorkerFigure:
    """Time the official-style loader like :func:`swavctl.bench.data.bench_data` times ours."""
    done = samples = 0
    started = time.perf_counter()
    measure_start, startup, epoch = started, 0.0, 0
    while done < warmup + batches:
        g = torch.Generator().manual_seed(seed + epoch)
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, generator=g, num_workers=workers, drop_last=True
        )
        for batch in loader:
            done += 1
            if done == warmup:
                measure_start = time.perf_counter()
                startup = measure_start - started
            elif done > warmup:
                samples += int(batch[0].shape[0])
            if done >= warmup + batches:
                break
        del loader
        epoch += 1
    seconds = time.perf_counter() - measure_start
    return WorkerFigure(
        workers=workers,
        samples_per_s=samples / seconds if seconds > 0 else 0.0,
        batches=batches,
        seconds=seconds,
        startup_s=startup,
        skipped_images=0,
    )
