"""Multi-crop augmentation, per image on the CPU (the DataLoader-worker path).

SwAV (Caron et al. 2020, arXiv 2006.09882, section 3.2 and appendix A) views every image through
several crops: by default 2 crops of 224 px with area scale (0.14, 1.0) followed by 6 crops of
96 px with area scale (0.05, 0.14). Every crop gets its own independent draw of:

1. RandomResizedCrop, aspect ratio in (3/4, 4/3), bilinear with antialiasing;
2. horizontal flip, p = 0.5;
3. ColorJitter(0.8, 0.8, 0.8, 0.2) applied with p = 0.8, the four ops in a random order;
4. grayscale, p = 0.2;
5. Gaussian blur, p = 0.5, sigma ~ U(0.1, 2.0) in pixels of the output crop;
6. normalisation with mean (0.485, 0.456, 0.406) and std (0.228, 0.224, 0.225) (the official code
   uses 0.228 for red, not torchvision's 0.229; we follow it).

This module builds that recipe from ``torchvision.transforms.v2`` in three public, separable
stages so that the cheap, integer part (geometry) can stay on the CPU while the photometric part
can later run batched on a GPU (see :mod:`swavctl.data.batch_augment`, which draws from the same
distributions):

* :func:`geometric_transform`: crop + flip, uint8 in and uint8 out (torchvision's fast uint8
  antialiased resize; rounding to uint8 here matches the official PIL pipeline);
* :func:`photometric_transform`: converts to float32 in [0, 1], then jitter, grayscale and blur.
  Unlike the official PIL code, the photometric ops run in float, so there is no rounding to
  uint8 after each of them, and the formulas are exactly the ones the batched path uses;
* :func:`normalize_transform`: per-channel ``(x - mean) / std``.

The Gaussian blur kernel size follows one rule in both paths, :func:`blur_kernel_size`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from swavctl.errors import UserError

__all__ = [
    "ASPECT_RATIO",
    "AugmentConfigError",
    "AugmentSpec",
    "CropSpec",
    "PerImageMultiCrop",
    "blur_kernel_size",
    "check_image",
    "expand_crops",
    "geometric_transform",
    "normalize_transform",
    "photometric_transform",
]

# RandomResizedCrop aspect-ratio range (width / height), fixed as in the paper and torchvision.
ASPECT_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


class AugmentConfigError(UserError, ValueError):
    """An invalid crop or augmentation setting: a ValueError that the CLI prints as one line."""


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


@dataclass(frozen=True)
class AugmentSpec:
    """Per-crop photometric settings. The defaults are the SwAV paper's (arXiv 2006.09882)."""

    flip_prob: float = 0.5  # horizontal flip probability
    jitter_prob: float = 0.8  # probability that ColorJitter is applied at all
    brightness: float = 0.8  # brightness factor ~ U(max(0, 1 - b), 1 + b)
    contrast: float = 0.8  # contrast factor ~ U(max(0, 1 - c), 1 + c)
    saturation: float = 0.8  # saturation factor ~ U(max(0, 1 - s), 1 + s)
    hue: float = 0.2  # hue shift ~ U(-h, h), in turns of the colour wheel, h <= 0.5
    grayscale_prob: float = 0.2  # probability of converting to (3-channel) grayscale
    blur_prob: float = 0.5  # probability of Gaussian blur
    blur_sigma_min: float = 0.1  # blur sigma ~ U(min, max), in pixels of the output crop
    blur_sigma_max: float = 2.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet channel means
    std: tuple[float, float, float] = (0.228, 0.224, 0.225)  # official SwAV uses 0.228

    def __post_init__(self) -> None:
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise AugmentConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if value < 0.0:
                raise AugmentConfigError(f"{name} must be non-negative, got {value!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise AugmentConfigError(f"hue must be in [0, 0.5], got {self.hue!r}")
        if not 0.0 < self.blur_sigma_min <= self.blur_sigma_max:
            raise AugmentConfigError(
                "blur sigmas must satisfy 0 < blur_sigma_min <= blur_sigma_max, "
                f"got {self.blur_sigma_min!r} and {self.blur_sigma_max!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise AugmentConfigError("mean and std must have 3 entries (R, G, B)")
        if any(s <= 0.0 for s in self.std):
            raise AugmentConfigError(f"std entries must be positive, got {self.std!r}")

    def jitter_ranges(self) -> tuple[tuple[float, float] | None, ...]:
        """Sampling ranges of (brightness, contrast, saturation, hue), as torchvision's ColorJitter.

        An entry is ``None`` when the op is the identity (strength 0), in which case torchvision
        skips it and so does the batched path.
        """
        out: list[tuple[float, float] | None] = []
        for value in (self.brightness, self.contrast, self.saturation):
            out.append(None if value == 0.0 else (max(0.0, 1.0 - value), 1.0 + value))
        out.append(None if self.hue == 0.0 else (-self.hue, self.hue))
        return tuple(out)


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
    the lists differ in length or are empty, a count is not a positive integer, a size is not a
    positive integer, or a scale pair breaks ``0 < min <= max <= 1``.
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
    for i, (count, size, lo, hi) in enumerate(
        zip(crop_counts, crop_sizes, min_scales, max_scales, strict=True)
    ):
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise AugmentConfigError(f"crop_counts[{i}] must be a positive integer, got {count!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise AugmentConfigError(f"crop_sizes[{i}] must be a positive integer, got {size!r}")
        if not (0.0 < lo <= hi <= 1.0):
            raise AugmentConfigError(
                f"crop group {i}: scales must satisfy 0 < min_scale <= max_scale <= 1, "
                f"got min_scales[{i}]={lo!r}, max_scales[{i}]={hi!r}"
            )
        specs.extend(CropSpec(size=size, min_scale=float(lo), max_scale=float(hi)) for _ in range(count))
    return specs


def blur_kernel_size(crop_size: int, sigma_max: float) -> int:
    """Gaussian-blur kernel side used by both paths: ``2 * ceil(3 * sigma_max) + 1``.

    That covers +-3 sigma for the largest sigma drawn. It is clipped to the largest odd number
    not above ``crop_size`` so that reflect padding (``kernel // 2`` per side) stays valid.
    """
    if crop_size <= 0:
        raise AugmentConfigError(f"crop size must be positive, got {crop_size!r}")
    kernel = 2 * math.ceil(3.0 * sigma_max) + 1
    largest_odd = crop_size if crop_size % 2 == 1 else crop_size - 1
    return max(1, min(kernel, largest_odd))


def geometric_transform(crop: CropSpec, augment: AugmentSpec) -> v2.Transform:
    """Crop + flip stage: RandomResizedCrop (bilinear, antialiased) then a random horizontal flip.

    Works on uint8 (or float) ``[..., 3, H, W]`` tensors and keeps the dtype.
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                crop.size,
                scale=(crop.min_scale, crop.max_scale),
                ratio=ASPECT_RATIO,
                interpolation=v2.InterpolationMode.BILINEAR,
                antialias=True,
            ),
            v2.RandomHorizontalFlip(p=augment.flip_prob),
        ]
    )


def photometric_transform(augment: AugmentSpec, crop_size: int) -> v2.Transform:
    """Photometric stage for crops of side ``crop_size``.

    Converts to float32 in [0, 1] (``ToDtype(scale=True)``), then ColorJitter with probability
    ``jitter_prob`` (random order of the four ops), RandomGrayscale, and Gaussian blur with
    probability ``blur_prob``, sigma ~ U(sigma_min, sigma_max) and the kernel side from
    :func:`blur_kernel_size`.
    """
    kernel = blur_kernel_size(crop_size, augment.blur_sigma_max)
    return v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply(
                [
                    v2.ColorJitter(
                        brightness=augment.brightness,
                        contrast=augment.contrast,
                        saturation=augment.saturation,
                        hue=augment.hue,
                    )
                ],
                p=augment.jitter_prob,
            ),
            v2.RandomGrayscale(p=augment.grayscale_prob),
            v2.RandomApply(
                [v2.GaussianBlur(kernel, sigma=(augment.blur_sigma_min, augment.blur_sigma_max))],
                p=augment.blur_prob,
            ),
        ]
    )


def normalize_transform(augment: AugmentSpec) -> v2.Transform:
    """Normalisation stage: float32 in [0, 1] to ``(x - mean) / std`` per channel."""
    return v2.Normalize(mean=list(augment.mean), std=list(augment.std))


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


class PerImageMultiCrop:
    """CPU multi-crop path, run inside DataLoader workers on one decoded image.

    For each :class:`CropSpec`, in order, applies :func:`geometric_transform`,
    :func:`photometric_transform` and :func:`normalize_transform` with fresh random parameters
    (torch's global RNG, which the DataLoader seeds per worker).
    """

    def __init__(self, crops: Sequence[CropSpec], augment: AugmentSpec) -> None:
        if len(crops) == 0:
            raise AugmentConfigError("at least one crop is needed")
        self.crops: tuple[CropSpec, ...] = tuple(crops)
        self.augment = augment
        normalize = normalize_transform(augment)
        # Photometric stages differ only by blur kernel, i.e. by crop size: build one per size.
        photometric = {size: photometric_transform(augment, size) for size in {c.size for c in self.crops}}
        self._pipelines = [
            v2.Compose([geometric_transform(c, augment), photometric[c.size], normalize]) for c in self.crops
        ]

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Return one float32 ``[3, s, s]`` normalised tensor per crop, in crop order.

        ``image`` is uint8 ``[3, H, W]`` (or ``[1, H, W]``) of any size, smaller than the crop
        included (RandomResizedCrop then upsamples).
        """
        image = check_image(image)
        return [pipeline(image) for pipeline in self._pipelines]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crops={list(self.crops)!r}, augment={self.augment!r})"
