"""Why multi-crop keeps two execution paths: each one's cost per image where the other would run.

Both paths share the draws and the photometric ops; they differ in how they resize and in how
many images one call handles. The worker path (:class:`~swavctl.data.multicrop.MultiCrop`) makes
one image's crops with torchvision's uint8 resize, whose cost follows the crop; the device path
(:func:`~swavctl.data.multicrop.batch_multicrop`) makes a batch's crops with float weight
matrices, whose cost follows the whole image (``O(size * H * W)`` per crop) but which needs a
few dozen tensor calls per batch rather than per image. Both run here on the CPU with one torch
thread, on the same decoded images with the same per-image seeds, alternating; figures are CPU
milliseconds per image, medians over rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from swavctl.data.multicrop import AugmentSpec, CropSpec, MultiCrop, batch_multicrop


@dataclass
class PathsResult:
    case: str
    images: int
    batch: int
    worker_ms: float  # per image, worker path
    device_ms: float  # per image, device path (batches of ``batch``)
    worker_rounds: list[float] = field(default_factory=list)
    device_rounds: list[float] = field(default_factory=list)

    @property
    def device_over_worker(self) -> float:
        return self.device_ms / self.worker_ms

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "device_over_worker": self.device_over_worker}


def _cpu_ms(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return 1000 * (time.process_time() - start)


def bench_paths(
    case: str,
    images: Sequence[torch.Tensor],
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    *,
    batch: int,
    rounds: int = 3,
) -> PathsResult:
    """Time both paths over ``images`` (uint8, decoded): one warm-up each, then ``rounds``
    alternating timed passes. Image i is seeded with i in both paths, so they make the same crops."""
    if rounds < 1 or batch < 1:
        raise ValueError("rounds and batch must be at least 1")
    worker = MultiCrop(crops, augment)
    seeds = list(range(len(images)))

    def worker_pass() -> None:
        for seed, image in zip(seeds, images, strict=True):
            worker(image, generator=torch.Generator().manual_seed(seed))

    def device_pass() -> None:
        for start in range(0, len(images), batch):
            batch_multicrop(images[start : start + batch], crops, augment, seeds=seeds[start : start + batch])

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker_pass()  # warm-up
        device_pass()
        result = PathsResult(case=case, images=len(images), batch=batch, worker_ms=0.0, device_ms=0.0)
        for _ in range(rounds):
            result.worker_rounds.append(_cpu_ms(worker_pass) / len(images))
            result.device_rounds.append(_cpu_ms(device_pass) / len(images))
    finally:
        torch.set_num_threads(before)
    result.worker_ms = statistics.median(result.worker_rounds)
    result.device_ms = statistics.median(result.device_rounds)
    return result


def bench_hue(size: int = 224, *, rounds: int = 3, repeats: int = 20) -> tuple[float, float]:
    """CPU ms of one hue rotation of a ``size`` px crop on one thread: (ours, the chroma form;
    torchvision's ``adjust_hue``, the HSV round trip), medians of ``rounds`` alternating rounds."""
    from torchvision.transforms.v2 import functional as TF

    from swavctl.data.multicrop.photometric import adjust_hue

    x = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0))
    ours, theirs = [], []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adjust_hue(x, 0.1), TF.adjust_hue(x[0], 0.1)  # warm-up
        for _ in range(rounds):
            ours.append(_cpu_ms(lambda: [adjust_hue(x, 0.1) for _ in range(repeats)]) / repeats)
            theirs.append(_cpu_ms(lambda: [TF.adjust_hue(x[0], 0.1) for _ in range(repeats)]) / repeats)
    finally:
        torch.set_num_threads(before)
    return statistics.median(ours), statistics.median(theirs)
