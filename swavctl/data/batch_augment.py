"""Multi-crop augmentation for a whole batch at once (CPU or GPU), same distribution as the v2 path.

This is the batched twin of :class:`swavctl.data.augment.PerImageMultiCrop` (the SwAV recipe of
Caron et al. 2020, arXiv 2006.09882, appendix A). Every crop of every image gets its own random
parameters, drawn from the same distributions as ``torchvision.transforms.v2``:

* **Crop boxes** follow ``RandomResizedCrop``'s sampler (10 tries of area scale ~ U(min, max) and
  log aspect ratio ~ U(log 3/4, log 4/3), first fitting try wins, else the centre-crop fallback),
  vectorised over samples and tries. See :func:`sample_crop_boxes`.
* **Resampling** is torchvision's antialiased bilinear resize of the box, written as two
  per-sample weight matrices (:func:`resample_weights`) applied with batched matmuls on
  zero-padded stacks. It equals ``v2.functional.resized_crop(..., antialias=True)`` on float
  images up to float rounding, for upscaling and downscaling alike, and it clamps at the box edge
  as crop-then-resize does. (``torchvision.ops.roi_align`` was the first candidate; it samples
  across the box edge and its adaptive box filter differs from torchvision's triangle filter, so
  it only approximates the v2 path.) The dense matrices cost ``O(size * (H + W))`` memory per
  sample and the matmuls are cheap on a GPU; with TF32 matmuls enabled globally the crops carry
  TF32 rounding (about 1e-3 relative), and cuDNN's TF32 (on by default) applies to the blur.
  Each padded stack is float32 ``[n, 3, H_max, W_max]`` and its matmuls cost
  ``O(size * H_max * W_max)`` per crop, so :func:`size_groups` splits a batch of mixed sizes
  into groups padded separately (landscape apart from portrait, a 4288 x 2848 photo apart from
  500 x 375 ones); one stack of everything made a batch of 16 with one large photo 9.4x slower
  on the CPU (``bench/batch_padding.py``). Each image's crop still costs ``O(size * H * W)``
  however small its box: a 12-megapixel photo costs about as much to crop as a training step.
  The per-image path resizes uint8 and so rounds the crop to whole grey levels; this path does
  not (a difference below 1/255 per pixel).
* **Flip, jitter, grayscale, blur** are per-sample Bernoulli draws with the configured rates.
  ColorJitter factors and the random order of its four ops are per sample; the ops run in four
  steps, and at each step each op is applied to the samples whose permutation puts it there
  (at most 16 masked launches instead of a loop over the 24 permutations). Formulas follow
  ``torchvision.transforms.v2.functional`` on float images in [0, 1].
* **Gaussian blur** uses the same kernel (torchvision's ``softmax(-(x / sigma)**2)`` on a
  ``linspace``), the same kernel side (:func:`swavctl.data.augment.blur_kernel_size`) and the same
  reflect padding, applied separably as two grouped (depthwise) convolutions with one kernel per
  sample.

Random numbers: every parameter is drawn by :func:`sample_params` from ``generator`` (torch's
default CPU generator when ``None``) on the generator's own device, then kept on the CPU. The CPU
copy is what decides the grouping of samples, so applying the parameters never waits on the GPU;
only the index and factor tensors the ops need are copied to the images' device, each from
page-locked memory without blocking (:func:`to_device`). A plain ``tensor.to("cuda")`` of a CPU
tensor synchronises the host with the GPU; the 82 small copies of a 2x224 + 6x96 batch did so
82 times a step, so the GPU drained and waited for the host after every few kernels. A CPU
generator is the cheap, recommended choice even for CUDA images; a CUDA generator also works.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from swavctl.data.augment import (
    ASPECT_RATIO,
    AugmentSpec,
    CropSpec,
    blur_kernel_size,
    check_image,
)

__all__ = [
    "CropParams",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "apply_params",
    "batch_geometric",
    "batch_multicrop",
    "batch_normalize",
    "batch_photometric",
    "color_jitter",
    "gaussian_blur",
    "resample_weights",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "sample_params",
    "size_groups",
    "stack_padded",
    "to_device",
]

# How much zero padding batch_geometric may process, relative to the pixels of the images it
# holds, before size_groups starts another group (each group costs a few more kernel launches).
PAD_SLACK = 1.25

# ColorJitter op ids, as torchvision's ``fn_idx``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class CropParams:
    """Random parameters of one crop spec for a batch of N images. All tensors are on the CPU.

    ``boxes`` is int64 ``[N, 4]`` as (top, left, height, width) in source pixels; the boolean
    ``[N]`` masks say which samples get flipped, jittered, grayscaled and blurred;
    ``jitter_order`` is int64 ``[N, 4]``, a permutation of the op ids 0 brightness, 1 contrast,
    2 saturation, 3 hue; the float64 ``[N]`` factors and ``sigma`` are drawn for every sample
    (and ignored where the op is not applied).
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    jitter_order: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def take(self, rows: torch.Tensor) -> CropParams:
        """The parameters of samples ``rows`` (an int64 index tensor), in that order."""
        return CropParams(**{f.name: getattr(self, f.name)[rows] for f in fields(CropParams)})

    @staticmethod
    def cat(params: Sequence[CropParams]) -> CropParams:
        """Concatenate parameter sets along the sample dimension."""
        return CropParams(
            **{f.name: torch.cat([getattr(p, f.name) for p in params]) for f in fields(CropParams)}
        )


# --------------------------------------------------------------------------------------------
# Parameter sampling
# --------------------------------------------------------------------------------------------


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) float64 on the CPU, drawn on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64).cpu()


def _uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None
) -> torch.Tensor:
    return _rand(shape, generator).mul_(high - low).add_(low)


def sample_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    min_scale: float,
    max_scale: float,
    *,
    ratio: tuple[float, float] = ASPECT_RATIO,
    generator: torch.Generator | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """Vectorised ``RandomResizedCrop.get_params``: one box per image, int64 ``[N, 4]``.

    Rows are (top, left, height, width). For each image, up to ``tries`` candidates are drawn
    with target area ``H * W * U(min_scale, max_scale)`` and aspect ratio ``exp(U(log r0, log
    r1))``; side lengths are rounded (half to even, as Python's ``round``) and the first
    candidate that fits wins, placed uniformly at random. If none fits, the box is torchvision's
    fallback: the largest centred crop whose aspect ratio is clamped to ``ratio``.
    """
    n = int(heights.shape[0])
    h_img = heights.to(torch.float64).cpu()
    w_img = widths.to(torch.float64).cpu()
    area = (h_img * w_img)[:, None]
    scale = _uniform((n, tries), min_scale, max_scale, generator)
    log_ratio = _uniform((n, tries), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_ratio)
    target = area * scale
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= w_img[:, None]) & (h > 0) & (h <= h_img[:, None])
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first True
    found = fits.any(dim=1)
    w_try = w.gather(1, first).squeeze(1)
    h_try = h.gather(1, first).squeeze(1)

    # Fallback (torchvision): centre crop with the aspect ratio clamped into `ratio`.
    in_ratio = w_img / h_img
    too_tall = in_ratio < min(ratio)
    too_wide = in_ratio > max(ratio)
    w_fb = torch.where(too_wide, torch.round(h_img * max(ratio)), w_img)
    h_fb = torch.where(too_tall, torch.round(w_img / min(ratio)), h_img)

    w_box = torch.where(found, w_try, w_fb)
    h_box = torch.where(found, h_try, h_fb)
    u_top = _rand((n,), generator)
    u_left = _rand((n,), generator)
    # Uniform integer in [0, H - h] (torch.randint(0, H - h + 1)); min() guards u -> 1 rounding.
    top_rand = torch.minimum(torch.floor(u_top * (h_img - h_box + 1)), h_img - h_box)
    left_rand = torch.minimum(torch.floor(u_left * (w_img - w_box + 1)), w_img - w_box)
    top = torch.where(found, top_rand, torch.div(h_img - h_box, 2, rounding_mode="floor"))
    left = torch.where(found, left_rand, torch.div(w_img - w_box, 2, rounding_mode="floor"))
    return torch.stack([top, left, h_box, w_box], dim=1).to(torch.int64)


def sample_params(
    image_sizes: Sequence[tuple[int, int]],
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    *,
    generator: torch.Generator | None = None,
) -> list[CropParams]:
    """Draw every random parameter for ``len(image_sizes)`` images, one :class:`CropParams` per crop.

    ``image_sizes`` holds (height, width) per image. Distributions match torchvision v2's
    RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale and
    RandomApply(GaussianBlur): a transform with probability p is applied iff ``U[0,1) < p``.
    Jitter factors are drawn from :meth:`AugmentSpec.jitter_ranges` (identity values for
    disabled ops), the jitter order is a uniform random permutation per sample.
    """
    n = len(image_sizes)
    if n == 0:
        raise ValueError("need at least one image")
    sizes = torch.tensor([[int(h), int(w)] for h, w in image_sizes], dtype=torch.int64)
    if (sizes <= 0).any():
        raise ValueError("image sizes must be positive")
    ranges = augment.jitter_ranges()
    identity = (1.0, 1.0, 1.0, 0.0)
    out: list[CropParams] = []
    for crop in crops:
        boxes = sample_crop_boxes(
            sizes[:, 0], sizes[:, 1], crop.min_scale, crop.max_scale, generator=generator
        )
        flip = _rand((n,), generator) < augment.flip_prob
        jitter = _rand((n,), generator) < augment.jitter_prob
        order = _rand((n, 4), generator).argsort(dim=1)  # uniform over the 24 permutations
        factors = [
            _uniform((n,), r[0], r[1], generator)
            if r is not None
            else torch.full((n,), ident, dtype=torch.float64)
            for r, ident in zip(ranges, identity, strict=True)
        ]
        grayscale = _rand((n,), generator) < augment.grayscale_prob
        blur = _rand((n,), generator) < augment.blur_prob
        sigma = _uniform((n,), augment.blur_sigma_min, augment.blur_sigma_max, generator)
        out.append(
            CropParams(
                boxes=boxes,
                flip=flip,
                jitter=jitter,
                jitter_order=order,
                brightness=factors[0],
                contrast=factors[1],
                saturation=factors[2],
                hue=factors[3],
                grayscale=grayscale,
                blur=blur,
                sigma=sigma,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Batched ops. x is float [N, 3, H, W] in [0, 1]; per-sample factors are [N] tensors.
# --------------------------------------------------------------------------------------------


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` on ``device`` without making the host wait for the device.

    A CPU tensor is copied to a CUDA device from page-locked memory with ``non_blocking=True``
    (the copy is queued on the stream; torch keeps the page-locked buffer alive until it is
    done). Tensors already on ``device`` come back as they are.
    """
    if values.device == device:
        return values
    if device.type == "cuda" and values.device.type == "cpu":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return to_device(values.to(x.dtype), x.device).view(-1, 1, 1, 1)


def _blend(image1: torch.Tensor, image2: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    # torchvision's _blend: ratio * image1 + (1 - ratio) * image2, clamped to [0, 1].
    return image1.mul(ratio).add_(image2.mul(1.0 - ratio)).clamp_(0.0, 1.0)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` (torchvision's weights), shape ``[..., 1, H, W]``."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(dim=-3)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample ``clamp(x * factor, 0, 1)`` (torchvision ``adjust_brightness``)."""
    return x.mul(_per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample blend of x with the mean of its luma (torchvision ``adjust_contrast``)."""
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, _per_sample(factor, x))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample blend of x with its luma image (torchvision ``adjust_saturation``)."""
    return _blend(x, rgb_to_grayscale(x), _per_sample(factor, x))


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    # Same algorithm as torchvision.transforms.v2.functional._color._rgb_to_hsv (after Pillow).
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    channels_range_divisor = torch.where(eqc, ones, channels_range).unsqueeze_(dim=-3)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - image) / channels_range_divisor).unbind(dim=-3)
    mask_maxc_neq_r = maxc != r
    mask_maxc_eq_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(mask_maxc_eq_g & mask_maxc_neq_r)
    hr = bc.sub_(gc).mul_(~mask_maxc_neq_r)
    hb = gc.add_(4.0).sub_(rc).mul_(mask_maxc_neq_r.logical_and_(mask_maxc_eq_g.logical_not_()))
    h = hr.add_(hg).add_(hb)
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


_HSV_SELECT = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long)


def _hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    # Same algorithm as torchvision.transforms.v2.functional._color._hsv_to_rgb, for [N, 3, H, W].
    h, s, v = img.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int64).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = to_device(_HSV_SELECT, img.device)[:, i].moveaxis(0, -3)  # [N, 3, H, W]
    return vpqt.gather(-3, select)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample hue rotation by ``factor`` turns in HSV space (torchvision ``adjust_hue``)."""
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(to_device(factor.to(x.dtype), x.device).view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


_JITTER_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)


def _masked_apply(
    x: torch.Tensor, mask: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """In place: ``x[mask] = fn(x[mask], idx)`` where idx is the CPU index of the masked samples."""
    idx = torch.nonzero(mask).flatten()
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return x.copy_(fn(x, idx))
    idx_dev = to_device(idx, x.device)
    return x.index_copy_(0, idx_dev, fn(x.index_select(0, idx_dev), idx))


def _with_factor(
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], factor: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def apply(sub: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return op(sub, factor[idx])

    return apply


def color_jitter(
    x: torch.Tensor,
    order: torch.Tensor,
    factors: Sequence[torch.Tensor],
    enabled: Sequence[bool] = (True, True, True, True),
) -> torch.Tensor:
    """Apply brightness, contrast, saturation and hue to every sample, in its own order.

    ``order`` is an int64 ``[N, 4]`` CPU tensor: row n is the permutation of op ids (0
    brightness, 1 contrast, 2 saturation, 3 hue) for sample n, as torchvision's ``fn_idx``.
    ``factors`` holds four ``[N]`` tensors. Ops with ``enabled[op] == False`` are skipped (as
    torchvision skips a ``None`` factor). Modifies ``x`` in place and returns it.
    """
    for position in range(4):
        for op in range(4):
            if not enabled[op]:
                continue
            _masked_apply(x, order[:, position] == op, _with_factor(_JITTER_OPS[op], factors[op]))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur of ``[N, C, H, W]`` with sigma ``[N]`` (pixels), reflect padding.

    The 1-D kernel is torchvision's: ``softmax(-(t / sigma)**2)`` with ``t = linspace(-l, l, k)``,
    ``l = (k - 1) / (2 sqrt 2)``, i.e. a normalised Gaussian sampled at integer offsets. It is
    applied separably (horizontal then vertical depthwise conv), which equals torchvision's 2-D
    conv of the outer-product kernel up to float rounding.
    """
    if kernel_size % 2 != 1 or kernel_size <= 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if kernel_size == 1 or x.shape[0] == 0:
        return x.clone()
    n, c, height, width = x.shape
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, steps=kernel_size, dtype=x.dtype, device=x.device)
    sig = to_device(sigma.to(x.dtype), x.device).view(-1, 1)
    kernel = torch.softmax(t.view(1, -1).div(sig).pow(2).neg(), dim=1)  # [N, k]
    weight = kernel.repeat_interleave(c, dim=0)  # [N * C, k], one kernel per (sample, channel)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, height, width), [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, weight.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, weight.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, height, width)


def batch_normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place (torchvision ``normalize``)."""
    m = to_device(torch.tensor(mean, dtype=x.dtype), x.device).view(-1, 1, 1)
    s = to_device(torch.tensor(std, dtype=x.dtype), x.device).view(-1, 1, 1)
    return x.sub_(m).div_(s)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def stack_padded(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack uint8 ``[3, H_i, W_i]`` images into float32 ``[N, 3, H_max, W_max]`` (values 0..255).

    Each image sits at the top-left, zero-padded. The padding never contributes to a crop: the
    resampling weights of :func:`batch_geometric` vanish outside each box.
    """
    heights = [int(im.shape[-2]) for im in images]
    widths = [int(im.shape[-1]) for im in images]
    h_max, w_max = max(heights), max(widths)
    if all(h == h_max for h in heights) and all(w == w_max for w in widths):
        return torch.stack(list(images)).to(torch.float32)
    out = torch.zeros((len(images), 3, h_max, w_max), dtype=torch.float32, device=images[0].device)
    for i, (im, h, w) in enumerate(zip(images, heights, widths, strict=True)):
        out[i, :, :h, :w] = im
    return out


def size_groups(sizes: Sequence[tuple[int, int]], slack: float = PAD_SLACK) -> list[list[int]]:
    """Split images into groups that are cheap to pad together: lists of indices into ``sizes``.

    :func:`batch_geometric` works on a zero-padded ``[N, 3, H_max, W_max]`` stack, so its memory
    and its work grow with ``N * H_max * W_max``: one 4288 x 2848 photo in a batch of 500 x 375
    images would make every image cost as much as the largest. Images are sorted by orientation
    (landscape and square, then portrait) and by area, and taken greedily into the current group
    while its padded area ``n * max(h) * max(w)`` stays within ``slack`` times the pixels it
    holds; otherwise the image opens a new group. Images of one size always share one group.
    Each group lists its indices in ascending order.
    """
    if slack < 1.0:
        raise ValueError(f"slack must be at least 1, got {slack}")
    order = sorted(
        range(len(sizes)), key=lambda i: (sizes[i][0] > sizes[i][1], sizes[i][0] * sizes[i][1], sizes[i])
    )
    groups: list[list[int]] = []
    h_max = w_max = pixels = 0
    for i in order:
        h, w = sizes[i]
        if groups:
            count = len(groups[-1]) + 1
            padded = count * max(h_max, h) * max(w_max, w)
            if padded <= slack * (pixels + h * w):
                groups[-1].append(i)
                h_max, w_max, pixels = max(h_max, h), max(w_max, w), pixels + h * w
                continue
        groups.append([i])
        h_max, w_max, pixels = h, w, h * w
    return [sorted(g) for g in groups]


def resample_weights(start: torch.Tensor, length: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """1-D weights of torchvision's antialiased bilinear resize of ``[start, start + length)`` to ``size``.

    Returns float64 ``[N, size, extent]``: row ``i`` of sample ``n`` holds the weights over the
    ``extent`` source pixels. This is ATen's ``_upsample_bilinear2d_aa`` filter (as PIL's): with
    ``scale = length / size`` and ``support = max(scale, 1)``, output pixel i centred at
    ``c = scale * (i + 0.5)`` (box coordinates) weighs source pixel j by the triangle
    ``max(0, 1 - |j + 0.5 - c| / support)``, restricted to pixels inside the box and normalised
    to sum 1. When upscaling it is plain half-pixel bilinear interpolation, clamped at the box
    edge, exactly as ``resized_crop`` (crop, then resize) does.
    """
    start = start.to(torch.float64)
    length = length.to(torch.float64)
    device = start.device
    scale = length / size
    support = scale.clamp(min=1.0)
    center = scale[:, None] * (torch.arange(size, dtype=torch.float64, device=device) + 0.5)  # [N, size]
    rel = torch.arange(extent, dtype=torch.float64, device=device)[None, None, :] - start[:, None, None]
    x = (rel + 0.5 - center[:, :, None]) / support[:, None, None]
    inside = (rel >= 0) & (rel < length[:, None, None])
    w = (1.0 - x.abs()).clamp_(min=0.0).mul_(inside)
    return w.div_(w.sum(dim=-1, keepdim=True).clamp_(min=1e-12))


def batch_geometric(padded: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
    """Crop + resize + flip: float32 ``[K, 3, size, size]`` in [0, 1], ``K = len(params)``.

    ``padded`` is :func:`stack_padded`'s ``[N, 3, H, W]`` batch (0..255); ``K`` must be a multiple
    of ``N``, sample ``k`` being cut from image ``k % N`` (crop-major order, several crop specs
    of one size at once). The resize is separable: per sample, a ``[size, H]`` and a
    ``[size, W]`` weight matrix from :func:`resample_weights` (torchvision's antialiased
    bilinear, so this equals ``resized_crop(..., antialias=True)`` up to float rounding), applied
    as two batched matmuls without copying the source images per crop. A flip just reverses the
    rows of the horizontal weight matrix.
    """
    n, _, height, width = padded.shape
    k_total = len(params)
    if k_total % n != 0:
        raise ValueError(f"{k_total} boxes cannot be spread over {n} images")
    k = k_total // n
    boxes = to_device(params.boxes.to(torch.float64), padded.device)
    top, left, box_h, box_w = boxes.unbind(dim=1)
    w_y = resample_weights(top, box_h, size, height)
    w_x = resample_weights(left, box_w, size, width)
    flip = to_device(params.flip, padded.device)
    w_x = torch.where(flip[:, None, None], w_x.flip(1), w_x)
    # Crop-major [k, N, ...] -> [N, k, ...] so that each image is read once for all its boxes.
    w_y = w_y.to(padded.dtype).view(k, n, size, height).transpose(0, 1)
    w_x = w_x.to(padded.dtype).view(k, n, size, width).transpose(0, 1)
    rows = torch.einsum("nkph,nchw->nkcpw", w_y, padded)  # [N, k, 3, size, W]
    out = torch.einsum("nkcpw,nkqw->nkcpq", rows, w_x)  # [N, k, 3, size, size]
    out = out.transpose(0, 1).reshape(k_total, 3, size, size)
    return out.mul_(1.0 / 255.0)  # ToDtype(float32, scale=True)


def batch_photometric(
    x: torch.Tensor, params: CropParams, augment: AugmentSpec, kernel_size: int
) -> torch.Tensor:
    """Jitter (per-sample order), grayscale and blur on float ``[K, 3, s, s]`` in [0, 1], in place."""
    enabled = [r is not None for r in augment.jitter_ranges()]
    if any(enabled):
        factors = (params.brightness, params.contrast, params.saturation, params.hue)
        order = params.jitter_order.masked_fill(~params.jitter[:, None], -1)  # -1: not jittered
        color_jitter(x, order, factors, enabled)
    _masked_apply(x, params.grayscale, lambda sub, idx: rgb_to_grayscale(sub).expand_as(sub))
    sigma = params.sigma
    _masked_apply(x, params.blur, lambda sub, idx: gaussian_blur(sub, sigma[idx], kernel_size))
    return x


def _check_images(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(images) == 0:
        raise ValueError("need at least one image")
    checked = [check_image(im) for im in images]
    devices = {im.device for im in checked}
    if len(devices) != 1:
        raise ValueError(f"all images must be on one device, got {sorted(str(d) for d in devices)}")
    return checked


def apply_params(
    images: Sequence[torch.Tensor],
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    params: Sequence[CropParams],
    *,
    pad_slack: float = PAD_SLACK,
) -> list[torch.Tensor]:
    """Apply pre-drawn parameters (from :func:`sample_params`): one float32 ``[N, 3, s, s]`` per crop.

    Crops of equal size are processed together as one batch, cut from the images padded in the
    groups of :func:`size_groups` (``pad_slack=inf``: one padded stack of every image). Outputs
    are on the images' device and normalised with ``augment.mean`` / ``augment.std``.
    """
    checked = _check_images(images)
    n = len(checked)
    if len(params) != len(crops):
        raise ValueError(f"got {len(params)} parameter sets for {len(crops)} crops")
    if any(len(p) != n for p in params):
        raise ValueError(f"parameter sets must have {n} samples, one per image")
    outputs: list[torch.Tensor | None] = [None] * len(crops)
    device = checked[0].device
    with torch.no_grad():
        images_by_size = size_groups([(int(im.shape[-2]), int(im.shape[-1])) for im in checked], pad_slack)
        padded = [stack_padded([checked[i] for i in g]) for g in images_by_size]
        group_indices = [torch.tensor(g) for g in images_by_size]
        groups: dict[int, list[int]] = {}
        for i, crop in enumerate(crops):
            groups.setdefault(crop.size, []).append(i)
        for size, members in groups.items():
            group = CropParams.cat([params[i] for i in members])
            if images_by_size == [list(range(n))]:
                x = batch_geometric(padded[0], group, size)
            else:
                x = torch.empty((len(group), 3, size, size), dtype=torch.float32, device=device)
                spec_offsets = torch.arange(len(members))[:, None] * n
                for indices, stack in zip(group_indices, padded, strict=True):
                    # Crop-major rows of these images within the group: crop spec j, image i -> j * n + i.
                    rows = (spec_offsets + indices[None, :]).reshape(-1)
                    x.index_copy_(0, to_device(rows, device), batch_geometric(stack, group.take(rows), size))
            x = batch_photometric(x, group, augment, blur_kernel_size(size, augment.blur_sigma_max))
            x = batch_normalize(x, augment.mean, augment.std)
            for k, i in enumerate(members):
                outputs[i] = x[k * n : (k + 1) * n]
    return [o for o in outputs if o is not None]


def batch_multicrop(
    images: Sequence[torch.Tensor],
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    *,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Batched SwAV multi-crop (arXiv 2006.09882): one float32 ``[N, 3, s, s]`` tensor per crop spec.

    ``images`` are uint8 ``[3, H_i, W_i]`` (or ``[1, H_i, W_i]``) tensors of any sizes, all on one
    device; outputs live on that device. Parameters come from ``generator`` (see the module
    docstring); use :func:`sample_params` + :func:`apply_params` to see or reuse them.
    """
    checked = _check_images(images)
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in checked]
    params = sample_params(sizes, crops, augment, generator=generator)
    return apply_params(checked, crops, augment, params)
