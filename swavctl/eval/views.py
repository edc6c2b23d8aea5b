"""The evaluation views of an image: training crops, the centre view, and normalisation.

The paper's linear evaluation (Caron et al. 2020, Sec. 4.1, following the official
``eval_linear.py``) trains on ``RandomResizedCrop(224)`` + horizontal flip and evaluates on
``Resize(256)`` + ``CenterCrop(224)``. Here the crop side scales with the data: it is the
pretraining high-resolution crop size (``settings.data.crop_sizes[0]``, 224 in the paper's
recipe) and the resize side keeps the paper's ratio, ``resize = round(crop * 256 / 224)``.
So a model pretrained with 24 px crops is evaluated on 24 px centre crops of images resized
to 27 px, and one pretrained with 224 px crops on the paper's 224 from 256.

The training crops follow the same idea. The paper pretrains with global crops of area scale
(0.14, 1) and trains the linear classifier on RandomResizedCrop's default (0.08, 1); here the
smallest scale is the model's own global-crop scale times that ratio,
``min_scale = data.min_scales[0] * 0.08 / 0.14``: exactly 0.08 for the paper's recipe, 0.23 for
the demo (pretrained with (0.4, 1) on 32 px digits, where 8% of the image is a featureless
blob). The horizontal flip has the model's ``data.augment.flip_prob`` (0.5 in the paper's
recipe): data the model was pretrained without flips (digits) is not flipped here either.

Crop parameters are drawn from a ``random.Random`` seeded per image and epoch, so a view does not
depend on the loader worker that made it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from swavctl.config import Settings

PAPER_CROP = 224
PAPER_RESIZE = 256
PAPER_PRETRAIN_MIN_SCALE = 0.14  # global crops of the paper's multi-crop
PAPER_EVAL_MIN_SCALE = 0.08  # torchvision's RandomResizedCrop default, as in eval_linear.py


@dataclass(frozen=True)
class Geometry:
    """Crop side, resize side (shorter side before the centre crop), training-crop scales and flip."""

    crop: int
    resize: int
    min_scale: float = PAPER_EVAL_MIN_SCALE
    max_scale: float = 1.0
    flip_prob: float = 0.5

    def as_dict(self) -> dict[str, float]:
        return {
            "crop": self.crop,
            "resize": self.resize,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "flip_prob": self.flip_prob,
        }


def geometry_for(settings: Settings, crop: int | None = None, min_scale: float | None = None) -> Geometry:
    """The evaluation views of a model, derived from its pretraining settings (module docstring).

    ``crop`` and ``min_scale`` override the derived crop side and smallest training-crop scale.
    """
    side = int(crop or settings.data.crop_sizes[0])
    if min_scale is None:
        derived = settings.data.min_scales[0] * PAPER_EVAL_MIN_SCALE / PAPER_PRETRAIN_MIN_SCALE
        min_scale = round(min(1.0, derived), 4)
    return Geometry(
        crop=side,
        resize=int(round(side * PAPER_RESIZE / PAPER_CROP)),
        min_scale=min_scale,
        flip_prob=settings.data.augment.flip_prob,
    )


def center_view(image: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Resize the shorter side to ``geometry.resize`` (bilinear, antialiased), then centre-crop."""
    resized = TF.resize(image, [geometry.resize], antialias=True)
    return TF.center_crop(resized, [geometry.crop, geometry.crop])


def random_crop_box(
    height: int, width: int, rng: random.Random, *, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop`` box (top, left, h, w), drawn from ``rng``.

    Up to 10 tries of an area fraction ~ U(scale) and a log-uniform aspect ratio; then the
    centre crop clamped to ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_view(image: torch.Tensor, geometry: Geometry, rng: random.Random) -> torch.Tensor:
    """RandomResizedCrop(crop, scale=(min_scale, max_scale), ratio=(3/4, 4/3)), then a flip (flip_prob)."""
    top, left, h, w = random_crop_box(
        int(image.shape[-2]),
        int(image.shape[-1]),
        rng,
        scale=(geometry.min_scale, geometry.max_scale),
        ratio=(3 / 4, 4 / 3),
    )
    crop = TF.resized_crop(image, top, left, h, w, [geometry.crop, geometry.crop], antialias=True)
    if rng.random() < geometry.flip_prob:
        crop = TF.horizontal_flip(crop)
    return crop


class Normalizer:
    """uint8 images (N x 3 x H x W) on any device -> float32 ``(x / 255 - mean) / std``."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std
