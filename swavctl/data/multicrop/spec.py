"""What a multi-crop makes: the crops (:class:`CropSpec`) and the per-crop augmentation.

The augmentation's settings are :class:`swavctl.config.AugmentSettings` themselves (``data.augment``),
here also named :data:`AugmentSpec`: one declaration of the 12 fields, validated once, by pydantic.
The crops are the lists ``data.crop_counts``, ``crop_sizes``, ``min_scales`` and ``max_scales``,
expanded into one :class:`CropSpec` per crop by :func:`expand_crops` (:func:`crop_specs` for the
settings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swavctl.config import AugmentSettings, DataSettings
from swavctl.errors import UserError

#: The photometric settings of every crop (``data.augment``): the class of the settings tree.
AugmentSpec = AugmentSettings

#: RandomResizedCrop's aspect-ratio range (width / height), fixed as in the paper and torchvision.
ASPECT_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

#: The identity value of each ColorJitter op (brightness, contrast, saturation, hue).
JITTER_IDENTITY: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0)


class AugmentConfigError(UserError, ValueError):
    """An invalid crop setting: a ValueError that the CLI prints as one line."""


@dataclass(frozen=True)
class CropSpec:
    """One crop of the multi-crop recipe.

    ``size`` is the output side in pixels; ``min_scale``/``max_scale`` bound the fraction of the
    source image area that RandomResizedCrop samples, uniformly. The aspect ratio range is fixed
    at :data:`ASPECT_RATIO` (3/4, 4/3) as in the paper.
    """

    size: int  # output side in px
    min_scale: float  # RandomResizedCrop area-scale range, 0 < min_scale <= max_scale <= 1
    max_scale: float

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise AugmentConfigError(f"crop size must be a positive integer, got {self.size!r}")
        if not (0.0 < self.min_scale <= self.max_scale <= 1.0):
            raise AugmentConfigError(
                "crop scales must satisfy 0 < min_scale <= max_scale <= 1, "
                f"got min_scale={self.min_scale!r}, max_scale={self.max_scale!r}"
            )


def expand_crops(
    crop_counts: Sequence[int],
    crop_sizes: Sequence[int],
    min_scales: Sequence[float],
    max_scales: Sequence[float],
) -> list[CropSpec]:
    """Expand the lightly-style multi-crop hyperparameters into one :class:`CropSpec` per crop.

    ``expand_crops([2, 6], [224, 96], [0.14, 0.05], [1.0, 0.14])`` gives the paper's 8 crops,
    2 x 224 px then 6 x 96 px, in the order given (put the high-resolution crops first: SwAV
    computes codes on the first ones). Raises :class:`AugmentConfigError` (a ``ValueError``) when
    the lists differ in length or are empty, a count is not a positive integer, or a group's
    :class:`CropSpec` is invalid (the message names the group).
    """
    lengths = {
        "crop_counts": len(crop_counts),
        "crop_sizes": len(crop_sizes),
        "min_scales": len(min_scales),
        "max_scales": len(max_scales),
    }
    if len(set(lengths.values())) != 1:
        listed = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise AugmentConfigError(
            f"crop_counts, crop_sizes, min_scales and max_scales differ in length ({listed})"
        )
    if lengths["crop_counts"] == 0:
        raise AugmentConfigError("at least one crop group is needed; crop_counts is empty")
    specs: list[CropSpec] = []
    groups = zip(crop_counts, crop_sizes, min_scales, max_scales, strict=True)
    for i, (count, size, lo, hi) in enumerate(groups):
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise AugmentConfigError(f"crop_counts[{i}] must be a positive integer, got {count!r}")
        try:
            crop = CropSpec(size=size, min_scale=float(lo), max_scale=float(hi))
        except AugmentConfigError as exc:
            raise AugmentConfigError(
                f"crop group {i} (crop_sizes[{i}]={size!r}, min_scales[{i}]={lo!r}, "
                f"max_scales[{i}]={hi!r}): {exc}"
            ) from None
        specs.extend([crop] * count)
    return specs


def crop_specs(data: DataSettings) -> list[CropSpec]:
    """One :class:`CropSpec` per crop of ``data`` (validated settings), high resolution first."""
    return expand_crops(data.crop_counts, data.crop_sizes, data.min_scales, data.max_scales)


def jitter_enabled(augment: AugmentSpec) -> tuple[bool, bool, bool, bool]:
    """Whether each ColorJitter op (brightness, contrast, saturation, hue) runs: strength 0 makes
    it the identity, which torchvision skips, and so do we."""
    return (augment.brightness != 0.0, augment.contrast != 0.0, augment.saturation != 0.0, augment.hue != 0.0)


def jitter_ranges(augment: AugmentSpec) -> tuple[tuple[float, float] | None, ...]:
    """Sampling ranges of (brightness, contrast, saturation, hue), as torchvision's ColorJitter:
    ``(max(0, 1 - s), 1 + s)`` for the first three, ``(-h, h)`` for hue; ``None`` for an op that
    does not run (:func:`jitter_enabled`)."""
    b, c, s, h = augment.brightness, augment.contrast, augment.saturation, augment.hue
    ranges = [(max(0.0, 1.0 - v), 1.0 + v) for v in (b, c, s)] + [(-h, h)]
    return tuple(r if on else None for r, on in zip(ranges, jitter_enabled(augment), strict=True))


def blur_kernel_size(crop_size: int, sigma_max: float) -> int:
    """Gaussian-blur kernel side: ``2 * ceil(3 * sigma_max) + 1``, covering +-3 sigma.

    It is clipped to the largest odd number not above ``crop_size`` so that reflect padding
    (``kernel // 2`` per side) stays valid.
    """
    if crop_size <= 0:
        raise AugmentConfigError(f"crop size must be positive, got {crop_size!r}")
    kernel = 2 * math.ceil(3.0 * sigma_max) + 1
    largest_odd = crop_size if crop_size % 2 == 1 else crop_size - 1
    return max(1, min(kernel, largest_odd))


def check_image(image: torch.Tensor) -> torch.Tensor:
    """Validate one decoded image and return it as uint8 ``[3, H, W]``.

    Accepts uint8 ``[3, H, W]`` or ``[1, H, W]`` (a grayscale decode, repeated to 3 channels).
    Raises ``ValueError`` otherwise.
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor image, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape [3, H, W] or [1, H, W], got {tuple(image.shape)}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image has an empty side: {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image
