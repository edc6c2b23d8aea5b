"""Folders of real JPEG files of ImageNet-like size for data benchmarks (no download).

Two kinds:

* :func:`write_jpeg_folder`, synthetic: smooth colour structure at a random coarse scale (a
  bicubic upscale of a few random pixels) plus pixel noise, encoded at quality 90: about 70 KB
  for 500 x 375, close to ImageNet's average file. Smooth colour decodes faster than a photo.
* :func:`write_photo_folder`, photographs: random crops of scikit-learn's two bundled photographs
  (``load_sample_images``: china.jpg and flower.jpg, 640 x 427), resized to 500 x 375 (a quarter
  portrait, 375 x 500), some mirrored, encoded at quality 90: real textures and edges, so they
  decode, and compress, like ImageNet's photos.
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


def _folder_is_complete(root: Path, count: int) -> bool:
    existing = {p.name for p in root.glob("img*.jpg")}
    return all(f"img{i:06d}.jpg" in existing for i in range(count))


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
    if _folder_is_complete(root, count):
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


def sample_photographs() -> list[np.ndarray]:
    """scikit-learn's bundled photographs (china.jpg, flower.jpg) as ``[H, W, 3]`` uint8 arrays."""
    from sklearn.datasets import load_sample_images

    return [np.asarray(image, dtype=np.uint8) for image in load_sample_images().images]


def write_photo(path: Path, photo: np.ndarray, seed: int, width: int, height: int, quality: int = 90) -> None:
    """A random crop of ``photo`` with the aspect ratio of ``width x height``, covering 40 to 100%
    of the largest such crop's area, resized (Lanczos) to ``width x height``, mirrored with
    probability 1/2, saved as a JPEG."""
    rng = np.random.default_rng(seed)
    src_h, src_w = photo.shape[:2]
    full_w = min(src_w, src_h * width / height)  # the largest crop of the target aspect ratio
    side = float(np.sqrt(rng.uniform(0.4, 1.0)))
    box_w, box_h = max(1, round(full_w * side)), max(1, round(full_w * side * height / width))
    left, top = int(rng.integers(0, src_w - box_w + 1)), int(rng.integers(0, src_h - box_h + 1))
    image = Image.fromarray(photo[top : top + box_h, left : left + box_w])
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image.save(path, quality=quality)


def write_photo_folder(
    root: Path, count: int, *, width: int = 500, height: int = 375, portrait: float = 0.25
) -> Path:
    """Write ``count`` JPEGs cut from :func:`sample_photographs` into ``root``, alternating the two
    photographs (``width x height``, a ``portrait`` share turned 90 degrees, as
    :func:`write_jpeg_folder`). Files that already exist are kept. Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    if _folder_is_complete(root, count):
        return root
    photos = sample_photographs()
    for i in range(count):
        w, h = (height, width) if is_portrait(i, portrait) else (width, height)
        write_photo(root / f"img{i:06d}.jpg", photos[i % len(photos)], seed=i, width=w, height=h)
    return root
