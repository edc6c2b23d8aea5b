"""The device path: a whole batch's multi-crop at once, on the training device (GPU, or the CPU).

With ``data.augment_on = "device"`` the loader's workers only read (or decode) the files; the
training process makes every crop of the batch here, from the same draws the worker path would
use for those images (:func:`.draws.draw_batch`, one generator per image seeded from its sample
seed), with the same photometric stage (:func:`.photometric.photometric`, on all crops of one size
at once). Only the resize differs:

* **Resampling** is torchvision's antialiased bilinear resize of the box, written as two
  per-sample weight matrices (:func:`resample_weights`) applied with batched matmuls on
  zero-padded stacks of the decoded images. It equals ``v2.functional.resized_crop(...,
  antialias=True)`` on float images up to float rounding, for upscaling and downscaling alike, and
  it clamps at the box edge as crop-then-resize does. It does not round the crop to whole grey
  levels as the worker path's uint8 kernel does: a difference of at most about half a grey level
  per pixel before the photometric ops. (``torchvision.ops.roi_align`` was the first candidate; it
  samples across the box edge and its adaptive box filter differs from torchvision's triangle.)
  With TF32 matmuls enabled globally the crops carry TF32 rounding (about 1e-3 relative).
* **Padding.** Each padded stack is float32 ``[n, 3, H_max, W_max]`` and its matmuls cost
  ``O(size * H_max * W_max)`` per crop, so :func:`size_groups` splits a batch of mixed sizes into
  groups padded separately (landscape apart from portrait, a 4288 x 2848 photo apart from 500 x
  375 ones); one stack of everything made a batch of 16 with one large photo 9.4x slower on the
  CPU (``bench/batch_padding.py``). Each image's crop still costs ``O(size * H * W)`` however
  small its box: a 12-megapixel photo costs about as much to crop as a training step.

Random numbers and parameters stay on the CPU (numpy), so grouping the samples never waits on the
GPU; the index, factor and box tensors the ops need are copied to the device from page-locked
memory without blocking (:func:`~.photometric.to_device`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from swavctl.data.multicrop.draws import CropDraws, draw_batch
from swavctl.data.multicrop.photometric import normalize, photometric, to_device
from swavctl.data.multicrop.spec import AugmentSpec, CropSpec, blur_kernel_size, check_image

__all__ = [
    "PAD_SLACK",
    "apply_draws",
    "batch_geometric",
    "batch_multicrop",
    "resample_weights",
    "size_groups",
    "stack_padded",
]

# How much zero padding batch_geometric may process, relative to the pixels of the images it
# holds, before size_groups starts another group (each group costs a few more kernel launches).
PAD_SLACK = 1.25


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
    and its work grow with ``N * H_max * W_max``. Images are sorted by orientation (landscape and
    square, then portrait) and by area, and taken greedily into the current group while its
    padded area ``n * max(h) * max(w)`` stays within ``slack`` times the pixels it holds;
    otherwise the image opens a new group. Images of one size always share one group. Each group
    lists its indices in ascending order.
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


def batch_geometric(padded: torch.Tensor, draws: CropDraws, size: int) -> torch.Tensor:
    """Crop + resize + flip: float32 ``[K, 3, size, size]`` in [0, 1], ``K = len(draws)``.

    ``padded`` is :func:`stack_padded`'s ``[N, 3, H, W]`` batch (0..255); ``K`` must be a multiple
    of ``N``, sample ``k`` being cut from image ``k % N`` (crop-major order, several crop specs
    of one size at once). The resize is separable: per sample, a ``[size, H]`` and a
    ``[size, W]`` weight matrix from :func:`resample_weights`, applied as two batched matmuls
    without copying the source images per crop. A flip reverses the rows of the horizontal matrix.
    """
    n, _, height, width = padded.shape
    k_total = len(draws)
    if k_total % n != 0:
        raise ValueError(f"{k_total} boxes cannot be spread over {n} images")
    k = k_total // n
    boxes = to_device(torch.from_numpy(draws.boxes).to(torch.float64), padded.device)
    top, left, box_h, box_w = boxes.unbind(dim=1)
    w_y = resample_weights(top, box_h, size, height)
    w_x = resample_weights(left, box_w, size, width)
    flip = to_device(torch.from_numpy(draws.flip), padded.device)
    w_x = torch.where(flip[:, None, None], w_x.flip(1), w_x)
    # Crop-major [k, N, ...] -> [N, k, ...] so that each image is read once for all its boxes.
    w_y = w_y.to(padded.dtype).view(k, n, size, height).transpose(0, 1)
    w_x = w_x.to(padded.dtype).view(k, n, size, width).transpose(0, 1)
    rows = torch.einsum("nkph,nchw->nkcpw", w_y, padded)  # [N, k, 3, size, W]
    out = torch.einsum("nkcpw,nkqw->nkcpq", rows, w_x)  # [N, k, 3, size, size]
    out = out.transpose(0, 1).reshape(k_total, 3, size, size)
    return out.mul_(1.0 / 255.0)  # ToDtype(float32, scale=True)


def _check_images(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(images) == 0:
        raise ValueError("need at least one image")
    checked = [check_image(im) for im in images]
    devices = {im.device for im in checked}
    if len(devices) != 1:
        raise ValueError(f"all images must be on one device, got {sorted(str(d) for d in devices)}")
    return checked


def _geometric(
    padded: list[torch.Tensor], groups: list[list[int]], draws: CropDraws, size: int, specs: int
) -> torch.Tensor:
    """The crops of ``specs`` crop specs of one size (crop-major ``draws``), from the padded
    stacks of the image ``groups``."""
    n = sum(len(g) for g in groups)
    if len(groups) == 1:
        return batch_geometric(padded[0], draws, size)
    x = torch.empty((len(draws), 3, size, size), dtype=torch.float32, device=padded[0].device)
    for indices, stack in zip(groups, padded, strict=True):
        # Crop-major rows of these images: crop spec j, image i -> j * n + i.
        rows = (np.arange(specs)[:, None] * n + np.asarray(indices)[None, :]).reshape(-1)
        index = to_device(torch.from_numpy(rows), x.device)
        x.index_copy_(0, index, batch_geometric(stack, draws.take(rows), size))
    return x


def apply_draws(
    images: Sequence[torch.Tensor],
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    draws: Sequence[CropDraws],
    *,
    pad_slack: float = PAD_SLACK,
) -> list[torch.Tensor]:
    """The crops for given draws (:func:`.draws.draw_batch`'s): one float32 ``[N, 3, s, s]`` per crop.

    Crops of equal size are processed together as one batch, cut from the images padded in the
    groups of :func:`size_groups` (``pad_slack=inf``: one padded stack of every image). Outputs
    are on the images' device and normalised with ``augment.mean`` / ``augment.std``.
    """
    checked = _check_images(images)
    n = len(checked)
    if len(draws) != len(crops):
        raise ValueError(f"got {len(draws)} sets of draws for {len(crops)} crops")
    if any(len(d) != n for d in draws):
        raise ValueError(f"each set of draws must have {n} rows, one per image")
    device = checked[0].device
    mean = to_device(torch.tensor(augment.mean, dtype=torch.float32), device).view(3, 1, 1)
    std = to_device(torch.tensor(augment.std, dtype=torch.float32), device).view(3, 1, 1)
    outputs: list[torch.Tensor | None] = [None] * len(crops)
    with torch.no_grad():
        groups = size_groups([(int(im.shape[-2]), int(im.shape[-1])) for im in checked], pad_slack)
        padded = [stack_padded([checked[i] for i in g]) for g in groups]
        by_size: dict[int, list[int]] = {}
        for i, crop in enumerate(crops):
            by_size.setdefault(crop.size, []).append(i)
        for size, members in by_size.items():
            group = CropDraws.cat([draws[i] for i in members])
            x = _geometric(padded, groups, group, size, len(members))
            x = photometric(x, group, augment, blur_kernel_size(size, augment.blur_sigma_max))
            x = normalize(x, mean, std)
            for k, i in enumerate(members):
                outputs[i] = x[k * n : (k + 1) * n]
    return [o for o in outputs if o is not None]


def batch_multicrop(
    images: Sequence[torch.Tensor],
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    *,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Batched SwAV multi-crop (arXiv 2006.09882): one float32 ``[N, 3, s, s]`` tensor per crop spec.

    ``images`` are uint8 ``[3, H_i, W_i]`` (or ``[1, H_i, W_i]``) tensors of any sizes, all on one
    device; outputs live on that device. Image i's draws come from a generator seeded with
    ``seeds[i]``, or else from ``generator`` in turn (see :func:`.draws.draw_batch`): the same
    draws the worker path makes with that generator. :func:`.draws.draw_batch` and
    :func:`apply_draws` show or reuse them.
    """
    checked = _check_images(images)
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in checked]
    draws = draw_batch(sizes, crops, augment, seeds=seeds, generator=generator)
    return apply_draws(checked, crops, augment, draws)
