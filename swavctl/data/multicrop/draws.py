"""The random draws of a multi-crop: one table of uniforms per image, read the same way by both paths.

Every random choice of an image's crops comes from one call,
``torch.rand((crops, COLUMNS), dtype=float64, generator=g)``, on the generator of that image (the
loop seeds one per sample from (seed, epoch, index)). Row ``c`` drives crop ``c``:

==========  =====================================================================================
columns     drive
==========  =====================================================================================
0-19        RandomResizedCrop's 10 tries: column 2i the area scale, 2i + 1 the log aspect ratio
20, 21      the box's top and left among the positions where it fits
22          horizontal flip (applied iff u < flip_prob)
23          colour jitter (iff u < jitter_prob)
24-27       the jitter order: the argsort of the four (a uniform permutation)
28-31       brightness, contrast, saturation and hue factors, uniform over ColorJitter's ranges
32          grayscale (iff u < grayscale_prob)
33          blur (iff u < blur_prob)
34          blur sigma, uniform over (blur_sigma_min, blur_sigma_max)
==========  =====================================================================================

:func:`interpret` turns any number of rows into :class:`CropDraws`, vectorised (numpy, whose
small-array calls cost a few microseconds, so one image's 8 rows stay cheap in a loader worker
and a batch's thousands of rows cost one pass). The worker path reads one image's rows
(:func:`draw_image`); the device path stacks the tables of a batch's images
(:func:`draw_batch`). For the same generator state both get the very same boxes, flips, factors,
orders and sigmas.

The crop box follows ``RandomResizedCrop.get_params``: try ``i`` has target area ``H * W * (min +
(max - min) u)`` and aspect ratio ``exp(log 3/4 + (log 4/3 - log 3/4) u')``, sides rounded half
to even (Python's and torchvision's ``round``); the first try that fits wins and is placed at
``top = floor(u_top * (H - h + 1))`` (a uniform integer in [0, H - h]); if none fits, the box is
torchvision's fallback, the largest centred crop with the aspect ratio clamped into (3/4, 4/3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from swavctl.data.multicrop.spec import ASPECT_RATIO, JITTER_IDENTITY, AugmentSpec, CropSpec, jitter_ranges

__all__ = ["COLUMNS", "TRIES", "CropDraws", "draw_batch", "draw_image", "interpret", "uniform_table"]

TRIES = 10  # RandomResizedCrop's number of tries before its fallback
COLUMNS = 2 * TRIES + 15  # uniforms per crop: see the table in the module docstring
_LOG_RATIO = (math.log(ASPECT_RATIO[0]), math.log(ASPECT_RATIO[1]))
_PROBS = [22, 23, 32, 33]  # flip, jitter, grayscale, blur


@dataclass(frozen=True)
class CropDraws:
    """Every random parameter of ``M`` crops (one row each), as numpy arrays.

    ``boxes`` int64 ``[M, 4]`` (top, left, height, width) in source pixels; boolean ``[M]``
    ``flip``, ``jitter``, ``grayscale`` and ``blur`` (whether each is applied); ``order`` int64
    ``[M, 4]``, the permutation of the jitter ops (0 brightness, 1 contrast, 2 saturation, 3
    hue) as torchvision's ``fn_idx``; ``factors`` float64 ``[M, 4]``, the factor of each op (its
    identity value where the op's strength is 0: torchvision then skips the op, and so do we);
    ``sigma`` float64 ``[M]``, the blur's sigma in output pixels.
    """

    boxes: np.ndarray
    flip: np.ndarray
    jitter: np.ndarray
    order: np.ndarray
    factors: np.ndarray
    grayscale: np.ndarray
    blur: np.ndarray
    sigma: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def take(self, rows: Sequence[int] | np.ndarray | slice) -> CropDraws:
        """The draws of ``rows``, in that order."""
        return CropDraws(
            self.boxes[rows], self.flip[rows], self.jitter[rows], self.order[rows],
            self.factors[rows], self.grayscale[rows], self.blur[rows], self.sigma[rows],
        )  # fmt: skip

    @staticmethod
    def cat(draws: Sequence[CropDraws]) -> CropDraws:
        """Rows of several draws, one after the other."""
        return CropDraws(
            **{f.name: np.concatenate([getattr(d, f.name) for d in draws]) for f in fields(CropDraws)}
        )

    def equals(self, other: CropDraws) -> bool:
        """Whether every field of both is identical (value for value)."""
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(CropDraws))


def uniform_table(crops: int, generator: torch.Generator | None) -> np.ndarray:
    """One image's table: float64 ``[crops, COLUMNS]`` uniforms in [0, 1) from ``generator``
    (torch's default generator when ``None``)."""
    return torch.rand((crops, COLUMNS), dtype=torch.float64, generator=generator).numpy()


def _boxes(u: np.ndarray, sizes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """RandomResizedCrop boxes of the rows: int64 ``[M, 4]`` (see the module docstring)."""
    height, width = sizes[:, 0:1], sizes[:, 1:2]
    lo, hi = scales[:, 0:1], scales[:, 1:2]
    target = (height * width) * (lo + (hi - lo) * u[:, 0 : 2 * TRIES : 2])
    aspect = np.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u[:, 1 : 2 * TRIES : 2])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    rows = np.arange(len(u))
    first = fits.argmax(axis=1)  # the first try that fits (0 when none does)
    found = fits[rows, first]
    height, width = height[:, 0], width[:, 0]
    # torchvision's fallback: the largest centred box with the aspect ratio clamped into range.
    in_ratio = width / height
    w_fallback = np.where(in_ratio > ASPECT_RATIO[1], np.round(height * ASPECT_RATIO[1]), width)
    h_fallback = np.where(in_ratio < ASPECT_RATIO[0], np.round(width / ASPECT_RATIO[0]), height)
    w_box = np.where(found, w[rows, first], w_fallback)
    h_box = np.where(found, h[rows, first], h_fallback)
    # A uniform integer in [0, H - h]; min() guards a u that rounds the product up to H - h + 1.
    top = np.minimum(np.floor(u[:, 20] * (height - h_box + 1)), height - h_box)
    left = np.minimum(np.floor(u[:, 21] * (width - w_box + 1)), width - w_box)
    top = np.where(found, top, (height - h_box) // 2)
    left = np.where(found, left, (width - w_box) // 2)
    return np.stack([top, left, h_box, w_box], axis=1).astype(np.int64)


def interpret(table: np.ndarray, sizes: np.ndarray, scales: np.ndarray, augment: AugmentSpec) -> CropDraws:
    """Read rows of uniforms as crop parameters (the column layout is the module docstring's).

    ``table`` is float64 ``[M, COLUMNS]``; ``sizes`` float64 ``[M, 2]`` holds the (height, width)
    of each row's image and ``scales`` float64 ``[M, 2]`` the (min, max) area scale of its crop.
    A transform with probability p is applied iff its uniform is below p; factors are uniform over
    :func:`~swavctl.data.multicrop.spec.jitter_ranges`.
    """
    ranges = jitter_ranges(augment)
    low = np.array([JITTER_IDENTITY[i] if r is None else r[0] for i, r in enumerate(ranges)])
    high = np.array([JITTER_IDENTITY[i] if r is None else r[1] for i, r in enumerate(ranges)])
    probs = np.array([augment.flip_prob, augment.jitter_prob, augment.grayscale_prob, augment.blur_prob])
    applied = table[:, _PROBS] < probs
    sigma_lo, sigma_hi = augment.blur_sigma_min, augment.blur_sigma_max
    return CropDraws(
        boxes=_boxes(table, sizes, scales),
        flip=applied[:, 0],
        jitter=applied[:, 1],
        order=table[:, 24:28].argsort(axis=1, kind="stable"),
        factors=low + (high - low) * table[:, 28:32],
        grayscale=applied[:, 2],
        blur=applied[:, 3],
        sigma=sigma_lo + (sigma_hi - sigma_lo) * table[:, 34],
    )


def draw_image(
    height: int,
    width: int,
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    generator: torch.Generator | None,
) -> CropDraws:
    """The draws of one ``height x width`` image's crops: row ``c`` is crop ``c``."""
    sizes = np.array([[height, width]], dtype=np.float64).repeat(len(crops), axis=0)
    scales = np.array([[c.min_scale, c.max_scale] for c in crops], dtype=np.float64)
    return interpret(uniform_table(len(crops), generator), sizes, scales, augment)


def _generators(
    count: int, seeds: Sequence[int] | None, generator: torch.Generator | None
) -> list[torch.Generator | None]:
    if seeds is None:
        return [generator] * count
    if generator is not None:
        raise ValueError("give seeds or a generator, not both")
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} images")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw_batch(
    image_sizes: Sequence[tuple[int, int]],
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    *,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[CropDraws]:
    """The draws of a batch: one :class:`CropDraws` per crop spec, row ``i`` for image ``i``.

    Image ``i``'s table comes from a generator seeded with ``seeds[i]`` or, without seeds, from
    ``generator`` (torch's default when ``None``), the images' tables drawn in turn. So image
    ``i`` gets the draws :func:`draw_image` gives with the same generator state.
    """
    n = len(image_sizes)
    if n == 0:
        raise ValueError("need at least one image")
    if any(int(h) <= 0 or int(w) <= 0 for h, w in image_sizes):
        raise ValueError("image sizes must be positive")
    k = len(crops)
    tables = np.stack([uniform_table(k, g) for g in _generators(n, seeds, generator)])  # [N, k, C]
    # Crop-major rows (crop c of image i is row c * N + i), so each crop's rows are one slice.
    table = tables.transpose(1, 0, 2).reshape(k * n, COLUMNS)
    sizes = np.tile(np.asarray(image_sizes, dtype=np.float64), (k, 1))
    scales = np.array([[c.min_scale, c.max_scale] for c in crops], dtype=np.float64).repeat(n, axis=0)
    draws = interpret(table, sizes, scales, augment)
    return [draws.take(slice(c * n, (c + 1) * n)) for c in range(k)]
