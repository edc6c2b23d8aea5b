"""Fast per-image multi-crop for the loader workers: the SwAV recipe with lean CPU kernels.

This computes exactly the recipe of :class:`swavctl.data.augment.PerImageMultiCrop` (SwAV, Caron
et al. 2020, arXiv 2006.09882, appendix A; torchvision ``v2`` semantics on float images), with
the same parameter distributions as :func:`swavctl.data.batch_augment.sample_params`, but about
twice as fast per image on one CPU thread, which is what a DataLoader worker has:

* **One draw per image.** All random numbers of an image's crops come from one
  ``torch.rand(crops, 35, dtype=float64)`` call on the given generator (the dataset passes one
  seeded per sample), then plain Python arithmetic. ``v2`` makes about a dozen small torch calls
  per crop and walks its pytree machinery for each of the seven transforms.
* **Crop boxes** follow ``RandomResizedCrop``: 10 tries of area scale ~ U(min, max) and log
  aspect ratio ~ U(log 3/4, log 4/3), sides rounded half to even, the first fitting try wins,
  placed uniformly, else torchvision's centred fallback. The crop itself is torchvision's
  uint8 antialiased ``resized_crop`` (the very kernel ``v2`` calls), then the flip.
* **Hue** is the same HSV rotation as ``adjust_hue``, written with the chroma form of HSV to RGB:
  with ``M = max``, ``C = max - min`` and the rotated hue ``h6`` in sixths of a turn, channel
  ``n`` (5 red, 3 green, 1 blue) is ``M - C * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + h6) mod
  6``. That is algebraically ``_hsv_to_rgb(_rgb_to_hsv(x))`` (``p = min``, ``q = M - C f``,
  ``t = min + C f``) without its channel-axis reductions, boolean masks and gathers, which are
  the slow kernels on a CPU. The sector of the source hue is selected with ``sign`` arithmetic.
* **Gaussian blur** uses torchvision's kernel (``exp(-x^2 / 2 sigma^2)`` on integer offsets,
  normalised) and reflect padding, applied separably as shifted multiply-adds (two passes of
  ``k`` taps instead of one ``k x k`` depthwise convolution); taps below 1e-9 are skipped, a
  change far below float32 resolution.
* **Random numbers** come from a generator the dataset seeds per sample (``torch.manual_seed``
  would also seed every accelerator backend, which costs more than a small image's crops).
* Brightness, contrast, saturation, grayscale and normalisation are ``v2``'s formulas, in place.

The outputs equal ``v2``'s functional ops for the same parameters up to float32 rounding (about
1e-6); ``tests/test_fast_augment.py`` checks that, and the parameter distributions against
torchvision's samplers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from swavctl.data.augment import (
    ASPECT_RATIO,
    AugmentConfigError,
    AugmentSpec,
    CropSpec,
    blur_kernel_size,
    check_image,
)

__all__ = [
    "CropDraw",
    "FastMultiCrop",
    "adjust_brightness_",
    "adjust_contrast_",
    "adjust_hue",
    "adjust_saturation_",
    "apply_draw",
    "crop_box",
    "draw_crops",
    "gaussian_blur",
    "gaussian_kernel1d",
    "grayscale",
]

_TRIES = 10  # RandomResizedCrop's number of tries before its fallback
_DRAWS = 2 * _TRIES + 15  # uniforms per crop: tries (scale, ratio), top, left, 13 photometric
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_NEGLIGIBLE_TAP = 1e-9  # blur weights below this (relative to a sum of 1) are left out


@dataclass(frozen=True)
class CropDraw:
    """Every random parameter of one crop of one image.

    ``order`` is the permutation of the ColorJitter ops (0 brightness, 1 contrast, 2 saturation,
    3 hue); a factor is ``None`` where that op is disabled (strength 0), as in torchvision.
    """

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: bool
    order: tuple[int, int, int, int]
    brightness: float | None
    contrast: float | None
    saturation: float | None
    hue: float | None
    grayscale: bool
    blur: bool
    sigma: float


def crop_box(
    u: Sequence[float], height: int, width: int, min_scale: float, max_scale: float
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` from 22 uniforms: (top, left, box height, box width).

    ``u[2i]`` and ``u[2i+1]`` drive try ``i`` (area scale and log aspect ratio); ``u[20]`` and
    ``u[21]`` place the box uniformly among the integer positions where it fits.
    """
    area = height * width
    log_lo, log_hi = math.log(ASPECT_RATIO[0]), math.log(ASPECT_RATIO[1])
    for i in range(_TRIES):
        target = area * (min_scale + (max_scale - min_scale) * u[2 * i])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * i + 1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[20] * (height - h + 1)), height - h)
            left = min(int(u[21] * (width - w + 1)), width - w)
            return top, left, h, w
    # torchvision's fallback: the largest centred crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < min(ASPECT_RATIO):
        w, h = width, round(width / min(ASPECT_RATIO))
    elif in_ratio > max(ASPECT_RATIO):
        h, w = height, round(height * max(ASPECT_RATIO))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_crops(
    height: int,
    width: int,
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    generator: torch.Generator | None = None,
) -> list[CropDraw]:
    """Draw the parameters of every crop of one ``height x width`` image (one torch RNG call).

    A transform with probability p is applied iff its uniform is below p; jitter factors are
    uniform over :meth:`AugmentSpec.jitter_ranges`; the jitter order is the argsort of four
    uniforms (a uniform permutation); sigma ~ U(blur_sigma_min, blur_sigma_max).
    """
    table = torch.rand((len(crops), _DRAWS), dtype=torch.float64, generator=generator).tolist()
    ranges = augment.jitter_ranges()
    draws: list[CropDraw] = []
    for crop, u in zip(crops, table, strict=True):
        top, left, h, w = crop_box(u[:22], height, width, crop.min_scale, crop.max_scale)
        keys = u[24:28]
        order = tuple(sorted(range(4), key=keys.__getitem__))
        factors = [
            None if r is None else r[0] + (r[1] - r[0]) * v for r, v in zip(ranges, u[28:32], strict=True)
        ]
        draws.append(
            CropDraw(
                top=top,
                left=left,
                height=h,
                width=w,
                flip=u[22] < augment.flip_prob,
                jitter=u[23] < augment.jitter_prob,
                order=order,  # type: ignore[arg-type]
                brightness=factors[0],
                contrast=factors[1],
                saturation=factors[2],
                hue=factors[3],
                grayscale=u[32] < augment.grayscale_prob,
                blur=u[33] < augment.blur_prob,
                sigma=augment.blur_sigma_min + (augment.blur_sigma_max - augment.blur_sigma_min) * u[34],
            )
        )
    return draws


# ---------------------------------------------------------------------------------------------
# Photometric kernels on one float32 image [3, H, W] in [0, 1]


def _luma(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])


def adjust_brightness_(x: torch.Tensor, factor: float) -> torch.Tensor:
    """In place: ``clamp(x * factor, 0, 1)`` (torchvision ``adjust_brightness``)."""
    return x.mul_(factor).clamp_(0.0, 1.0)


def adjust_contrast_(x: torch.Tensor, factor: float) -> torch.Tensor:
    """In place: ``clamp(f x + (1 - f) mean(luma(x)), 0, 1)`` (torchvision ``adjust_contrast``)."""
    mean = float(_luma(x).mean())
    return x.mul_(factor).add_((1.0 - factor) * mean).clamp_(0.0, 1.0)


def adjust_saturation_(x: torch.Tensor, factor: float) -> torch.Tensor:
    """In place: ``clamp(f x + (1 - f) luma(x), 0, 1)`` (torchvision ``adjust_saturation``)."""
    gray = _luma(x)
    return x.mul_(factor).add_(gray, alpha=1.0 - factor).clamp_(0.0, 1.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Three-channel luma ``0.2989 R + 0.587 G + 0.114 B`` (torchvision ``rgb_to_grayscale``)."""
    return _luma(x).unsqueeze(-3).expand_as(x).contiguous()


_CHANNEL_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)  # n for red, green, blue


def adjust_hue(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Rotate the HSV hue of ``x`` ([3, H, W], float in [0, 1]) by ``factor`` turns.

    Source hue in sixths (torchvision's ``_rgb_to_hsv``): ``(G - B) / C`` where red is the
    maximum, else ``(B - R) / C + 2`` where green is, else ``(R - G) / C + 4``, with ``C = max -
    min`` (hue 0 where C = 0). Back to RGB with the chroma form: channel n gets
    ``min + C * clamp(d_n - 1, 0, 1)`` where ``d_n`` is the distance from ``h6 + n`` to 2 modulo
    6, which equals ``M - C * clamp(min(k, 4 - k), 0, 1)`` with ``k = (h6 + n) mod 6``. Saturation
    and value are untouched, as in ``adjust_hue``.
    """
    r, g, b = x.unbind(dim=-3)
    top = torch.maximum(torch.maximum(r, g), b)
    bottom = torch.minimum(torch.minimum(r, g), b)
    chroma = top - bottom
    # Exact 0/1 indicators: ``top`` is one of the channels, so ``c - top`` is 0 there, < 0 elsewhere.
    is_r = torch.sign(r - top).add_(1.0)
    is_g = torch.sign(g - top).add_(1.0).mul_(1.0 - is_r)
    is_b = (1.0 - is_r).sub_(is_g)
    h6 = (g - b).mul_(is_r)
    h6.add_((b - r).add_(chroma, alpha=2.0).mul_(is_g))
    h6.add_((r - g).add_(chroma, alpha=4.0).mul_(is_b))
    safe = chroma + 1.0 - torch.sign(chroma)  # 1 where chroma is 0 (h6 is 0 there too)
    h6.div_(safe).add_(6.0 * factor - 2.0)
    d = h6.unsqueeze(0) + _CHANNEL_OFFSETS.to(x.device)  # [3, H, W]: h6 + n - 2
    d.sub_(torch.round(d * (1.0 / 6.0)).mul_(6.0)).abs_()  # distance to 2 modulo 6, in [0, 3]
    return d.sub_(1.0).clamp_(0.0, 1.0).mul_(chroma).add_(bottom)


def gaussian_kernel1d(kernel_size: int, sigma: float) -> list[float]:
    """torchvision's 1-D Gaussian: ``exp(-x^2 / (2 sigma^2))`` at ``x = -(k-1)/2 .. (k-1)/2``, sum 1."""
    half = (kernel_size - 1) * 0.5
    pdf = [math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(kernel_size)]
    total = sum(pdf)
    return [p / total for p in pdf]


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of ``[C, H, W]`` with reflect padding (torchvision ``gaussian_blur``).

    ``kernel_size`` must be odd and below both sides (reflect padding needs ``k // 2 < side``).
    """
    if kernel_size <= 1:
        return x.clone()
    weights = gaussian_kernel1d(kernel_size, sigma)
    pad = kernel_size // 2
    height, width = x.shape[-2:]
    padded = F.pad(x.unsqueeze(0), [pad, pad, pad, pad], mode="reflect")[0]
    # Taps below 1e-9 (the tails of a small sigma) change no float32 value: skip them.
    taps = [i for i, w in enumerate(weights) if w >= _NEGLIGIBLE_TAP]
    first, rest = taps[0], taps[1:]
    # Horizontal pass over all padded rows, then the vertical pass.
    rows = padded[..., first : first + width] * weights[first]
    for i in rest:
        rows.add_(padded[..., i : i + width], alpha=weights[i])
    out = rows[..., first : first + height, :] * weights[first]
    for i in rest:
        out.add_(rows[..., i : i + height, :], alpha=weights[i])
    return out


def apply_draw(
    image: torch.Tensor,
    draw: CropDraw,
    size: int,
    augment: AugmentSpec,
    *,
    kernel_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """One crop: resized crop (uint8, antialiased bilinear) and flip, then float32 photometric ops
    in the recipe's order, then ``(x - mean) / std``. ``mean``/``std`` are ``[3, 1, 1]`` tensors."""
    crop = TF.resized_crop(
        image,
        draw.top,
        draw.left,
        draw.height,
        draw.width,
        [size, size],
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )
    if draw.flip:
        crop = crop.flip(-1)
    x = crop.to(torch.float32).mul_(1.0 / 255.0)
    if draw.jitter:
        for op in draw.order:
            if op == 0 and draw.brightness is not None:
                adjust_brightness_(x, draw.brightness)
            elif op == 1 and draw.contrast is not None:
                adjust_contrast_(x, draw.contrast)
            elif op == 2 and draw.saturation is not None:
                adjust_saturation_(x, draw.saturation)
            elif op == 3 and draw.hue is not None and draw.hue != 0.0:
                x = adjust_hue(x, draw.hue)
    if draw.grayscale:
        x = grayscale(x)
    if draw.blur:
        x = gaussian_blur(x, draw.sigma, kernel_size)
    return x.sub_(mean).div_(std)


class FastMultiCrop:
    """The multi-crop transform the loader workers run: a uint8 image in, one float32 crop per spec.

    Drop-in for :class:`~swavctl.data.augment.PerImageMultiCrop` (same constructor and call),
    drawing from torch's default generator (``generator`` to use another).
    """

    def __init__(
        self, crops: Sequence[CropSpec], augment: AugmentSpec, *, generator: torch.Generator | None = None
    ) -> None:
        if len(crops) == 0:
            raise AugmentConfigError("at least one crop is needed")
        self.crops: tuple[CropSpec, ...] = tuple(crops)
        self.augment = augment
        self.generator = generator
        self._kernels = {c.size: blur_kernel_size(c.size, augment.blur_sigma_max) for c in self.crops}
        self._mean = torch.tensor(augment.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(augment.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(
        self, image: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Return one normalised float32 ``[3, s, s]`` tensor per crop, in crop order.

        Random numbers come from ``generator``, else the one given at construction, else torch's
        default generator.
        """
        image = check_image(image)
        height, width = int(image.shape[-2]), int(image.shape[-1])
        draws = draw_crops(height, width, self.crops, self.augment, generator or self.generator)
        return [
            apply_draw(
                image,
                draw,
                crop.size,
                self.augment,
                kernel_size=self._kernels[crop.size],
                mean=self._mean,
                std=self._std,
            )
            for crop, draw in zip(self.crops, draws, strict=True)
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crops={list(self.crops)!r}, augment={self.augment!r})"
