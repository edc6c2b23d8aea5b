"""Small pieces shared by the benchmarks: the augmentation spec from settings, device sync, clocks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

from swavctl.config import Settings

T = TypeVar("T")

#: Forward + backward cost of one SwAV sample (ResNet-50, 2x224 + 6x96 crops), in FLOP:
#: 4.1 GMAC per 224-px image, the eight crops are 2 + 6 * (96/224)^2 = 3.1 such images, and
#: forward + backward is three times the forward: 3 * 2 * 4.1e9 * 3.1 = 76e9.
RN50_SWAV_FLOP_PER_SAMPLE = 76e9


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
