"""Small pieces shared by the benchmarks: the augmentation spec from settings, device sync, clocks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

from swavctl.config import AugmentSettings, Settings
from swavctl.data.augment import AugmentSpec, CropSpec, expand_crops

T = TypeVar("T")

#: Forward + backward cost of one SwAV sample (ResNet-50, 2x224 + 6x96 crops), in FLOP:
#: 4.1 GMAC per 224-px image, the eight crops are 2 + 6 * (96/224)^2 = 3.1 such images, and
#: forward + backward is three times the forward: 3 * 2 * 4.1e9 * 3.1 = 76e9.
RN50_SWAV_FLOP_PER_SAMPLE = 76e9


def augment_spec(aug: AugmentSettings) -> AugmentSpec:
    """The :class:`AugmentSpec` the pretrain loop builds from ``data.augment``."""
    return AugmentSpec(
        flip_prob=aug.flip_prob,
        jitter_prob=aug.jitter_prob,
        brightness=aug.brightness,
        contrast=aug.contrast,
        saturation=aug.saturation,
        hue=aug.hue,
        grayscale_prob=aug.grayscale_prob,
        blur_prob=aug.blur_prob,
        blur_sigma_min=aug.blur_sigma_min,
        blur_sigma_max=aug.blur_sigma_max,
        mean=aug.mean,
        std=aug.std,
    )


def crop_specs(settings: Settings) -> list[CropSpec]:
    data = settings.data
    return expand_crops(data.crop_counts, data.crop_sizes, data.min_scales, data.max_scales)


def crops_label(settings: Settings) -> str:
    """``2x224+6x96`` for the paper's crops."""
    data = settings.data
    return "+".join(f"{c}x{s}" for c, s in zip(data.crop_counts, data.crop_sizes, strict=True))


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall clocks measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run ``fn`` and return (its result, seconds), device work included."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start
