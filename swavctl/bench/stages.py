"""Where a loader worker's time goes, stage by stage: ours and the official pipeline, per image.

Each measurement runs in a new process (started as the DataLoader starts its workers) with one
torch thread, as a worker has, and makes every crop of a list of JPEG files, timing each stage
with the process's CPU clock (on a machine shared with other jobs, CPU time moves less than wall
time). Ours is the worker path (:class:`swavctl.data.multicrop.MultiCrop`), timed by wrapping its
parts while the real code runs: the decode, the table of draws, the uint8 resize, each
photometric op, the normalisation, and the rest (Python between the ops). The official pipeline
is :class:`swavctl.bench.official_data.OfficialMultiCropDataset`, timed transform by transform.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

#: The stages reported for each pipeline, in the order an image meets them.
OURS = (
    "decode", "draws", "resize", "brightness", "contrast", "saturation", "hue", "grayscale", "blur",
    "normalize", "rest",
)  # fmt: skip
OFFICIAL = ("decode", "resize", "flip", "color jitter", "grayscale", "blur", "to tensor", "normalize", "rest")


@dataclass
class StageTimes:
    """Mean CPU milliseconds per image of each stage."""

    pipeline: str  # "ours" or "official"
    images: int
    ms: dict[str, float]

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values())


class _Clock:
    """Sums CPU time per stage; ``wrap`` times a function's calls under a stage's name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.process_time()
        try:
            yield
        finally:
            self.seconds[name] += time.process_time() - start

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed


@contextmanager
def _patched(targets: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    for obj, name, value in targets:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _ours(paths: Sequence[Path], passes: int, clock: _Clock) -> None:
    from swavctl.data.images import decode_file
    from swavctl.data.multicrop import AugmentSpec, MultiCrop, expand_crops, per_image, photometric

    multicrop = MultiCrop(expand_crops([2, 6], [224, 96], [0.14, 0.05], [1.0, 0.14]), AugmentSpec())
    ops = photometric._JITTER_OPS
    names = ("brightness", "contrast", "saturation", "hue")
    targets = [
        (photometric, "_JITTER_OPS", tuple(clock.wrap(n, op) for n, op in zip(names, ops, strict=True))),
        (photometric, "grayscale", clock.wrap("grayscale", photometric.grayscale)),
        (photometric, "gaussian_blur", clock.wrap("blur", photometric.gaussian_blur)),
        (per_image, "resized_crop", clock.wrap("resize", per_image.resized_crop)),
        (per_image, "normalize", clock.wrap("normalize", per_image.normalize)),
    ]
    with _patched(targets):
        for p in range(passes):
            for i, path in enumerate(paths):
                with clock.stage("decode"):
                    image = decode_file(path)
                with clock.stage("draws"):
                    draws = multicrop.draw(
                        int(image.shape[-2]), int(image.shape[-1]), torch.Generator().manual_seed(i + p)
                    )
                with clock.stage("all crops"):
                    multicrop.apply(image, draws)


def _official(paths: Sequence[Path], passes: int, clock: _Clock) -> None:
    from PIL import Image

    from swavctl.bench.official_data import OfficialMultiCropDataset

    dataset = OfficialMultiCropDataset(paths, [224, 96], [2, 6], [0.14, 0.05], [1.0, 0.14])
    for _ in range(passes):
        for path in paths:
            with clock.stage("decode"), open(path, "rb") as f:
                image = Image.open(f).convert("RGB")
            for pipeline in dataset.trans:
                rrc, flip, colour, to_tensor, normalize = pipeline.transforms
                (jitter, gray), blur = colour.transforms[0].transforms, colour.transforms[1]
                x = image
                steps = [rrc, flip, jitter, gray, blur, to_tensor, normalize]
                for name, fn in zip(OFFICIAL[1:-1], steps, strict=True):  # all but decode and rest
                    with clock.stage(name):
                        x = fn(x)


def _measure(pipeline: str, paths: Sequence[str], passes: int) -> StageTimes:
    """In this (fresh) process: one warm-up pass, then ``passes`` timed passes over ``paths``."""
    torch.set_num_threads(1)
    run = _official if pipeline == "official" else _ours
    files = [Path(p) for p in paths]
    run(files, 1, _Clock())
    clock = _Clock()
    run(files, passes, clock)
    images = passes * len(files)
    seconds = dict(clock.seconds)
    if pipeline != "official":  # "rest": what the crops took beyond the ops timed inside them
        inside = sum(v for k, v in seconds.items() if k not in ("decode", "draws", "all crops"))
        seconds["rest"] = seconds.pop("all crops") - inside
    stages = OFFICIAL if pipeline == "official" else OURS
    ms = {k: 1000 * seconds.get(k, 0.0) / images for k in stages}
    return StageTimes(pipeline=pipeline, images=images, ms=ms)


def stage_times(pipeline: str, paths: Sequence[Path], *, passes: int = 2) -> StageTimes:
    """:class:`StageTimes` of ``pipeline`` ("ours" or "official") over ``paths``, measured in a
    new process (the default start method, as the DataLoader's: a fork on Linux)."""
    with ProcessPoolExecutor(1, mp_context=get_context()) as pool:
        return pool.submit(_measure, pipeline, [str(p) for p in paths], passes).result()
