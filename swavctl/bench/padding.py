"""Batched augmentation of a batch of mixed image sizes: padding in size groups against one stack.

:func:`swavctl.data.multicrop.apply_draws` cuts every crop from zero-padded stacks of the
batch's decoded images. The baseline pads the whole batch into one ``[N, 3, H_max, W_max]``
stack (``pad_slack=inf``, what it did before size groups); ours pads each group of
:func:`~swavctl.data.multicrop.size_groups` separately. Both apply the same draws
to the same images, so their outputs must agree up to float rounding, which is checked in the
same run. Only the sizes matter for the cost, so the images are random pixels.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch

from swavctl.bench.common import timed
from swavctl.bench.jpegs import is_portrait
from swavctl.data.multicrop import PAD_SLACK, AugmentSpec, CropSpec, apply_draws, draw_batch, size_groups

Size = tuple[int, int]

#: A 12-megapixel camera photo (4288 x 2848, landscape).
LARGE_PHOTO: Size = (2848, 4288)


def jpeg_folder_sizes(n: int) -> list[Size]:
    """The sizes (h, w) of :func:`swavctl.bench.jpegs.write_jpeg_folder`'s default folder:
    500 x 375, a quarter of them portrait."""
    return [(500, 375) if is_portrait(i, 0.25) else (375, 500) for i in range(n)]


def mixed_photo_sizes(n: int, *, seed: int = 0, large_photo: bool = False) -> list[Size]:
    """A stated mix (not a measured dataset's): long side 500 (70%), 300 to 499 (20%) or
    800 to 1600 (10%), short side 0.6 to 0.85 of it, a quarter portrait; with ``large_photo`` the
    first image is :data:`LARGE_PHOTO`."""
    rng = random.Random(seed)
    sizes: list[Size] = []
    for _ in range(n):
        u = rng.random()
        long = rng.randint(800, 1600) if u < 0.1 else 500 if u < 0.8 else rng.randint(300, 499)
        short = int(long * rng.uniform(0.6, 0.85))
        sizes.append((long, short) if rng.random() < 0.25 else (short, long))
    if large_photo and sizes:
        sizes[0] = LARGE_PHOTO
    return sizes


@dataclass
class PaddingBenchResult:
    mix: str
    batch: int
    groups: int  # padding groups of ours; the baseline always has 1
    baseline_ms: float  # one padded stack, median per batch
    ours_ms: float  # size groups, median per batch
    baseline_padded_mpx: float  # pixels (per channel) of the padded stacks, in millions
    ours_padded_mpx: float
    max_abs_diff: float  # largest difference of any output value between the two
    baseline_runs_ms: list[float]
    ours_runs_ms: list[float]

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.ours_ms

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "speedup": self.speedup}


def padded_pixels(sizes: Sequence[Size], groups: Sequence[Sequence[int]]) -> int:
    """Pixels per channel of the zero-padded stacks of ``groups``: sum of ``n * max(h) * max(w)``."""
    return sum(len(g) * max(sizes[i][0] for i in g) * max(sizes[i][1] for i in g) for g in groups)


def bench_padding(
    mix: str,
    sizes: Sequence[Size],
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    *,
    device: torch.device,
    rounds: int = 3,
    seed: int = 0,
) -> PaddingBenchResult:
    """Time ``apply_draws`` on one batch of ``sizes``: one padded stack against size groups.

    One warm-up call each, then ``rounds`` alternating timed calls; medians.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(device) for h, w in sizes]
    draws = draw_batch(list(sizes), crops, augment, generator=g)

    def run(slack: float) -> list[torch.Tensor]:
        return apply_draws(images, crops, augment, draws, pad_slack=slack)

    baseline, ours = run(math.inf), run(PAD_SLACK)
    diff = max(float((a - b).abs().max()) for a, b in zip(baseline, ours, strict=True))
    del baseline, ours
    times: dict[float, list[float]] = {math.inf: [], PAD_SLACK: []}
    for _ in range(rounds):
        for slack, runs in times.items():
            runs.append(1000 * timed(partial(run, slack), device)[1])
    groups = size_groups(list(sizes), PAD_SLACK)
    return PaddingBenchResult(
        mix=mix,
        batch=len(sizes),
        groups=len(groups),
        baseline_ms=statistics.median(times[math.inf]),
        ours_ms=statistics.median(times[PAD_SLACK]),
        baseline_padded_mpx=padded_pixels(sizes, [range(len(sizes))]) / 1e6,
        ours_padded_mpx=padded_pixels(sizes, groups) / 1e6,
        max_abs_diff=diff,
        baseline_runs_ms=times[math.inf],
        ours_runs_ms=times[PAD_SLACK],
    )
