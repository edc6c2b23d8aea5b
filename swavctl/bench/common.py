"""Small pieces shared by the benchmarks: the augmentation spec from settings, device sync, clocks,
and the least number of alternating rounds a script reports a median over."""

from __future__ import annotations

import argparse
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

#: The fewest alternating rounds (baseline, ours, baseline, ...) a script in ``bench/`` takes the
#: medians of, for a ratio it writes into docs/benchmarks.md (issue 19).
MIN_ROUNDS = 3


def rounds_arg(text: str) -> int:
    """An ``argparse`` type for a script's rounds (repeats, steps): an integer >= :data:`MIN_ROUNDS`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < MIN_ROUNDS:
        raise argparse.ArgumentTypeError(
            f"at least {MIN_ROUNDS} alternating rounds, so the figures are medians (got {value})"
        )
    return value


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
