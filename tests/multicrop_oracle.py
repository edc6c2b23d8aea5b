"""The multi-crop recipe as torchvision ``transforms.v2`` writes it: the oracle the tests check against.

:class:`PerImageMultiCrop` builds SwAV's per-crop pipeline (Caron et al. 2020, arXiv 2006.09882,
appendix A; ColorJitter as the official code uses it) from torchvision's own transforms, drawing
from torch's global generator; :func:`v2_reference` runs the same ops through
``transforms.v2.functional`` with the parameters of one row of our draws. swavctl never runs
either: they are what our two paths must agree with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from swavctl.data.multicrop import (
    ASPECT_RATIO,
    AugmentConfigError,
    AugmentSpec,
    CropDraws,
    CropSpec,
    blur_kernel_size,
    check_image,
    jitter_ranges,
)

V2_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def smooth_image(h: int, w: int, seed: int, channels: int = 3) -> torch.Tensor:
    """A uint8 image with structure at several scales (so crops differ)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, 6, 6, generator=g)
    img = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    img = img * 0.8 + 0.2 * torch.rand(channels, h, w, generator=g)
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


def geometric_transform(crop: CropSpec, augment: AugmentSpec) -> v2.Transform:
    """RandomResizedCrop (bilinear, antialiased) then a random horizontal flip."""
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
    """To float32 in [0, 1], ColorJitter with probability ``jitter_prob``, RandomGrayscale and
    Gaussian blur with probability ``blur_prob`` (the kernel side of :func:`blur_kernel_size`)."""
    kernel = blur_kernel_size(crop_size, augment.blur_sigma_max)
    jitter = v2.ColorJitter(
        brightness=augment.brightness,
        contrast=augment.contrast,
        saturation=augment.saturation,
        hue=augment.hue,
    )
    blur = v2.GaussianBlur(kernel, sigma=(augment.blur_sigma_min, augment.blur_sigma_max))
    return v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([jitter], p=augment.jitter_prob),
            v2.RandomGrayscale(p=augment.grayscale_prob),
            v2.RandomApply([blur], p=augment.blur_prob),
        ]
    )


class PerImageMultiCrop:
    """The recipe from torchvision's transforms, one image at a time, torch's global generator."""

    def __init__(self, crops: Sequence[CropSpec], augment: AugmentSpec) -> None:
        if len(crops) == 0:
            raise AugmentConfigError("at least one crop is needed")
        self.crops = tuple(crops)
        normalize = v2.Normalize(mean=list(augment.mean), std=list(augment.std))
        photometric = {size: photometric_transform(augment, size) for size in {c.size for c in self.crops}}
        self._pipelines = [
            v2.Compose([geometric_transform(c, augment), photometric[c.size], normalize]) for c in self.crops
        ]

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        image = check_image(image)
        return [pipeline(image) for pipeline in self._pipelines]


def v2_reference(
    image: torch.Tensor, draws: CropDraws, row: int, size: int, augment: AugmentSpec
) -> torch.Tensor:
    """Crop ``row`` of ``draws`` made step by step with ``transforms.v2.functional``: resized_crop
    (uint8 image: torchvision's uint8 kernel; float: its float kernel), flip, to float, ColorJitter's
    ops in the row's order (those of strength 0 skipped, as ColorJitter skips them), grayscale,
    blur, normalize."""
    top, left, height, width = draws.boxes[row].tolist()
    x = TF.resized_crop(
        image,
        top,
        left,
        height,
        width,
        [size, size],
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )
    if draws.flip[row]:
        x = TF.horizontal_flip(x)
    x = TF.to_dtype(x, torch.float32, scale=True)
    if draws.jitter[row]:
        enabled = [r is not None for r in jitter_ranges(augment)]
        for op in draws.order[row].tolist():
            if enabled[op]:
                x = V2_JITTER[op](x, float(draws.factors[row, op]))
    if draws.grayscale[row]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if draws.blur[row]:
        k = blur_kernel_size(size, augment.blur_sigma_max)
        sigma = float(draws.sigma[row])
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    return TF.normalize(x, list(augment.mean), list(augment.std))
