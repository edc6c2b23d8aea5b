"""The photometric ops of the multi-crop, written once for both paths.

Each op takes float images ``x`` of shape ``[N, 3, H, W]`` with values in [0, 1] (the worker
path passes one crop, ``N = 1``; the device path a batch of crops) and a factor that is either
one Python float for all N or a float tensor ``[N, 1, 1, 1]`` on ``x``'s device, one per image.
The formulas are torchvision's ``transforms.v2.functional`` on float images (what ColorJitter,
RandomGrayscale and GaussianBlur compute, and the official SwAV code calls), tested against it:

* brightness ``clamp(f x, 0, 1)``; contrast ``clamp(f x + (1 - f) mean(luma(x)), 0, 1)``;
  saturation ``clamp(f x + (1 - f) luma(x), 0, 1)``; luma ``0.2989 R + 0.587 G + 0.114 B``;
* hue: torchvision's HSV rotation, in the chroma form (see :func:`adjust_hue`), without the
  reductions over channels, boolean masks and gathers that make the HSV round trip slow;
* Gaussian blur: torchvision's kernel and reflect padding, applied separably as shifted
  multiply-adds (see :func:`gaussian_blur`).

:func:`photometric` applies a crop's jitter (in its drawn order), grayscale and blur to the rows
of a batch that draw them, and :func:`normalize` ends the recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from swavctl.data.multicrop.draws import CropDraws
from swavctl.data.multicrop.spec import AugmentSpec, jitter_enabled

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "gaussian_blur",
    "gaussian_kernels",
    "grayscale",
    "normalize",
    "photometric",
    "to_device",
]

Factor = float | torch.Tensor  # one value for all images, or [N, 1, 1, 1]
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_NEGLIGIBLE_TAP = 1e-9  # blur weights below this (relative to a sum of 1) change no float32 value
_CHANNEL_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)  # hue: n for red, green, blue


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` on ``device`` without making the host wait for the device.

    A CPU tensor is copied to a CUDA device from page-locked memory with ``non_blocking=True``
    (the copy is queued on the stream; torch keeps the page-locked buffer alive until it is
    done): a plain ``.to("cuda")`` would wait for every kernel queued before it. Tensors already
    on ``device`` come back as they are.
    """
    if values.device == device:
        return values
    if device.type == "cuda" and values.device.type == "cpu":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


def luma(x: torch.Tensor) -> torch.Tensor:
    """``0.2989 R + 0.587 G + 0.114 B`` of ``[N, 3, H, W]``, shape ``[N, 1, H, W]``."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])


def adjust_brightness(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    """In place: ``clamp(f x, 0, 1)`` (torchvision ``adjust_brightness``)."""
    return x.mul_(factor).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    """In place: ``clamp(f x + (1 - f) m, 0, 1)``, m the mean luma of each image (torchvision
    ``adjust_contrast``)."""
    mean = luma(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _axpy(x.mul_(factor), mean, 1.0 - factor).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    """In place: ``clamp(f x + (1 - f) luma(x), 0, 1)`` (torchvision ``adjust_saturation``)."""
    gray = luma(x)
    return _axpy(x.mul_(factor), gray, 1.0 - factor).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Rotate the HSV hue of ``x`` by ``factor`` turns (torchvision ``adjust_hue``); a new tensor.

    Source hue in sixths of a turn (torchvision's ``_rgb_to_hsv``): ``(G - B) / C`` where red is
    the maximum, else ``(B - R) / C + 2`` where green is, else ``(R - G) / C + 4``, with ``C =
    max - min`` (hue 0 where C = 0). Back to RGB with the chroma form of ``_hsv_to_rgb``: with the
    rotated hue ``h6``, channel n (5 red, 3 green, 1 blue) is ``min + C * clamp(d_n - 1, 0, 1)``,
    ``d_n`` the distance from ``h6 + n`` to 2 modulo 6. That equals ``_hsv_to_rgb(_rgb_to_hsv(x))``
    (``p = min``, ``q = max - C f``, ``t = min + C f``) and leaves saturation and value alone.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
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
    # 1 where chroma is 0 (h6 is 0 there too), as torchvision's ``where``. Not ``chroma + 1 -
    # sign(chroma)``: a chroma below half float32's spacing at 1 is lost in that sum (0/0 -> NaN).
    safe = chroma.masked_fill(chroma == 0.0, 1.0)
    h6.div_(safe).add_(factor * 6.0 - 2.0)
    d = h6 + to_device(_CHANNEL_OFFSETS, x.device)  # [N, 3, H, W]: h6 + n - 2
    d.sub_(torch.round(d * (1.0 / 6.0)).mul_(6.0)).abs_()  # distance to 2 modulo 6, in [0, 3]
    return d.sub_(1.0).clamp_(0.0, 1.0).mul_(chroma).add_(bottom)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Three-channel luma (torchvision ``rgb_to_grayscale(num_output_channels=3)``); a new tensor."""
    return luma(x).expand_as(x).contiguous()


def gaussian_kernels(kernel_size: int, sigma: np.ndarray) -> np.ndarray:
    """torchvision's 1-D Gaussians, one row per sigma: float64 ``[N, kernel_size]``.

    ``exp(-t^2 / (2 sigma^2))`` at ``t = -(k-1)/2 .. (k-1)/2``, normalised to sum 1 (torchvision
    writes it as ``softmax(-(t' / sigma)^2)`` on ``t' = t / sqrt 2``).
    """
    t = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) * 0.5
    pdf = np.exp(-0.5 * (t[None, :] / np.asarray(sigma, dtype=np.float64)[:, None]) ** 2)
    return pdf / pdf.sum(axis=1, keepdims=True)


def _axpy(out: torch.Tensor, x: torch.Tensor, weight: Factor) -> torch.Tensor:
    """In place ``out += weight * x``, the weight a float or one per image."""
    return out.add_(x, alpha=weight) if isinstance(weight, float) else out.addcmul_(x, weight)


def gaussian_blur(x: torch.Tensor, sigma: np.ndarray | Sequence[float], kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of each image with its own sigma, reflect padding; a new tensor.

    torchvision's ``gaussian_blur`` with the kernels of :func:`gaussian_kernels` (``kernel_size``
    odd and below both sides of ``x``), applied as shifted multiply-adds, horizontal then
    vertical: 2k passes instead of torchvision's k x k depthwise convolution. Taps below 1e-9 in
    every image are left out (a change far below float32 resolution).
    """
    if kernel_size <= 1:
        return x.clone()
    weights = gaussian_kernels(kernel_size, np.asarray(sigma, dtype=np.float64))
    if weights.shape[0] != x.shape[0]:
        raise ValueError(f"got {weights.shape[0]} sigmas for {x.shape[0]} images")
    taps = np.flatnonzero(weights.max(axis=0) >= _NEGLIGIBLE_TAP).tolist()
    per_tap = to_device(torch.from_numpy(weights.T.astype(np.float32)), x.device)  # [k, N]
    w = per_tap.view(kernel_size, -1, 1, 1, 1).unbind(0)  # one [N, 1, 1, 1] weight per tap
    pad = kernel_size // 2
    height, width = x.shape[-2:]
    padded = F.pad(x, [pad, pad, pad, pad], mode="reflect")
    first, rest = taps[0], taps[1:]
    rows = padded[..., first : first + width] * w[first]
    for i in rest:
        rows.addcmul_(padded[..., i : i + width], w[i])
    out = rows[..., first : first + height, :] * w[first]
    for i in rest:
        out.addcmul_(rows[..., i : i + height, :], w[i])
    return out


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """In place ``(x - mean) / std`` per channel (torchvision ``normalize``); ``mean`` and ``std``
    broadcast against ``x`` (``[3, 1, 1]``)."""
    return x.sub_(mean).div_(std)


_JITTER_OPS: tuple[Callable[[torch.Tensor, Factor], torch.Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)


def _per_row(values: list[float], device: torch.device) -> Factor:
    """One factor per row: a float for one row, else ``[rows, 1, 1, 1]`` on ``device``."""
    if len(values) == 1:
        return values[0]
    return to_device(torch.tensor(values, dtype=torch.float32), device).view(-1, 1, 1, 1)


def _apply(x: torch.Tensor, rows: list[int], fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
    """``x`` with ``x[rows] = fn(x[rows], *args)``: in place on ``x`` when ``rows`` are all of it."""
    if len(rows) == x.shape[0]:
        return fn(x, *args)
    index = to_device(torch.tensor(rows), x.device)
    return x.index_copy_(0, index, fn(x.index_select(0, index), *args))


def _jitter_steps(draws: CropDraws, enabled: Sequence[bool]) -> list[tuple[int, list[int]]]:
    """The jitter ops to apply, in order, each with the rows that apply it: (op, rows) for each
    position of an order (0 to 3) and op (0 brightness, 1 contrast, 2 saturation, 3 hue) that
    some row of ``draws`` applies there and that is ``enabled``."""
    steps: list[list[list[int]]] = [[[], [], [], []] for _ in range(4)]
    for row, (on, order) in enumerate(zip(draws.jitter.tolist(), draws.order.tolist(), strict=True)):
        if on:
            for position, op in enumerate(order):
                steps[position][op].append(row)
    return [(op, rows) for ops in steps for op, rows in enumerate(ops) if rows and enabled[op]]


def photometric(x: torch.Tensor, draws: CropDraws, augment: AugmentSpec, kernel_size: int) -> torch.Tensor:
    """The photometric stage of the recipe on crops ``x`` (``[N, 3, s, s]``, in [0, 1]), row n
    drawn by ``draws`` row n: ColorJitter's ops in each row's order, then grayscale, then the blur
    (``kernel_size`` taps, each row's sigma). Rows that do not draw an op keep their values.

    Rows are grouped by what they draw (at most 16 jitter groups, 4 positions x 4 ops), so a batch
    costs a few dozen tensor ops whatever its size. Works in place where it can; use the result.
    """
    enabled = jitter_enabled(augment)
    factors = draws.factors.tolist()
    for op, rows in _jitter_steps(draws, enabled):
        x = _apply(x, rows, _JITTER_OPS[op], _per_row([factors[r][op] for r in rows], x.device))
    rows = [r for r, on in enumerate(draws.grayscale.tolist()) if on]
    if rows:
        x = _apply(x, rows, grayscale)
    rows = [r for r, on in enumerate(draws.blur.tolist()) if on]
    if rows and kernel_size > 1:
        x = _apply(x, rows, gaussian_blur, draws.sigma[rows], kernel_size)
    return x
