"""A folder of real JPEG files of ImageNet-like size for data benchmarks (no download).

Each image is smooth colour structure at a random coarse scale (a bicubic upscale of a few random
pixels) plus pixel noise, encoded at quality 90: about 70 KB for 500 x 375, close to ImageNet's
average file, with natural-image decode cost (a pure-noise JPEG decodes much slower).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def write_jpeg(path: Path, seed: int, width: int, height: int, quality: int = 90) -> None:
    """One synthetic photo-like JPEG of ``width x height`` pixels."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(
        0, 256, size=(int(rng.integers(3, 12)), int(rng.integers(3, 12)), 3), dtype=np.uint8
    )
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0.0, 10.0, size=(height, width, 3)).astype(
        np.int16
    )
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=quality)


def is_portrait(index: int, share: float) -> bool:
    """Whether image ``index`` of the folder is turned 90 degrees: a ``share`` of them, spread
    evenly over the indices (golden-ratio steps). Like ImageNet: mostly landscape, some portrait."""
    return (index * 0.6180339887) % 1.0 < share


def _write_range(args: tuple[str, int, int, int, int, float]) -> int:
    root, start, stop, width, height, portrait = args
    for i in range(start, stop):
        w, h = (height, width) if is_portrait(i, portrait) else (width, height)
        write_jpeg(Path(root) / f"img{i:06d}.jpg", seed=i, width=w, height=h)
    return stop - start


def write_jpeg_folder(
    root: Path,
    count: int,
    *,
    width: int = 500,
    height: int = 375,
    portrait: float = 0.25,
    processes: int | None = None,
) -> Path:
    """Write ``count`` JPEGs (``width x height``, a ``portrait`` share turned 90 degrees) into ``root``.

    Files that already exist are kept, so a second call is free. Returns ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    existing = {p.name for p in root.glob("img*.jpg")}
    if all(f"img{i:06d}.jpg" in existing for i in range(count)):
        return root
    processes = max(1, min(processes or os.cpu_count() or 1, count // 64 + 1))
    bounds = np.linspace(0, count, processes + 1).astype(int)
    jobs = [
        (str(root), int(a), int(b), width, height, portrait)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    if processes == 1:
        for job in jobs:
            _write_range(job)
    else:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_range, jobs))
    return root
