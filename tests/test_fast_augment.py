"""The loader workers' fast multi-crop: same ops as torchvision v2, same parameter distributions."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T1
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from swavctl.data.augment import AugmentSpec, CropSpec, PerImageMultiCrop, blur_kernel_size
from swavctl.data.fast_augment import (
    CropDraw,
    FastMultiCrop,
    adjust_hue,
    apply_draw,
    crop_box,
    draw_crops,
    gaussian_blur,
)


def smooth_image(h: int, w: int, seed: int, channels: int = 3) -> torch.Tensor:
    """A uint8 image with structure at several scales (so crops differ)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, 6, 6, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    img = img * 0.8 + 0.2 * torch.rand(channels, h, w, generator=g)
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


def binomial_tol(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1.0 - p) / n)


def _assert_same_distribution(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Two-sample check: means within 4 sigma, and CDFs at a's deciles within 4 binomial sigmas."""
    a, b = a.double(), b.double()
    n_a, n_b = a.numel(), b.numel()
    se = math.sqrt(a.var().item() / n_a + b.var().item() / n_b)
    assert abs(a.mean().item() - b.mean().item()) <= 4 * se + 1e-12, what
    for q in torch.linspace(0.1, 0.9, 9).tolist():
        t = torch.quantile(a, q).item()
        p_a = (a <= t).double().mean().item()
        p_b = (b <= t).double().mean().item()
        p = 0.5 * (p_a + p_b)
        tol = 4 * math.sqrt(max(p * (1 - p), 1e-4) * (1 / n_a + 1 / n_b))
        assert abs(p_a - p_b) <= tol, f"{what}: CDF at {t:.4f}: {p_a:.4f} vs {p_b:.4f}"


CROPS = [CropSpec(32, 0.14, 1.0), CropSpec(32, 0.14, 1.0), CropSpec(16, 0.05, 0.14), CropSpec(5, 0.05, 0.14)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add waiting


def _v2_reference(image: torch.Tensor, d: CropDraw, size: int, augment: AugmentSpec) -> torch.Tensor:
    """The per-image v2 pipeline, step by step, with the parameters of ``d``."""
    x = TF.resized_crop(
        image,
        d.top,
        d.left,
        d.height,
        d.width,
        [size, size],
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )
    if d.flip:
        x = TF.horizontal_flip(x)
    x = TF.to_dtype(x, torch.float32, scale=True)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [d.brightness, d.contrast, d.saturation, d.hue]
    if d.jitter:
        for op in d.order:
            if factors[op] is not None:
                x = fns[op](x, factors[op])
    if d.grayscale:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if d.blur:
        k = blur_kernel_size(size, augment.blur_sigma_max)
        x = TF.gaussian_blur(x, [k, k], [d.sigma, d.sigma])
    return TF.normalize(x, list(augment.mean), list(augment.std))


@pytest.mark.parametrize(
    "augment",
    [AugmentSpec(), AugmentSpec(jitter_prob=1.0, grayscale_prob=0.5, blur_prob=1.0, hue=0.5, saturation=0.0)],
    ids=["paper", "strong"],
)
def test_every_crop_equals_the_v2_pipeline(augment: AugmentSpec) -> None:
    mean = torch.tensor(augment.mean).view(3, 1, 1)
    std = torch.tensor(augment.std).view(3, 1, 1)
    images = [
        smooth_image(48, 64, 0),
        smooth_image(10, 12, 1),
        smooth_image(7, 90, 2),
        smooth_image(40, 40, 3),
    ]
    g = torch.Generator().manual_seed(0)
    for image in images * 6:
        draws = draw_crops(int(image.shape[1]), int(image.shape[2]), CROPS, augment, g)
        for crop, d in zip(CROPS, draws, strict=True):
            k = blur_kernel_size(crop.size, augment.blur_sigma_max)
            ours = apply_draw(image, d, crop.size, augment, kernel_size=k, mean=mean, std=std)
            torch.testing.assert_close(ours, _v2_reference(image, d, crop.size, augment), atol=2e-5, rtol=0)


def _hue_cases() -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 24, 24, generator=g)
    x[:, 0, :6] = torch.tensor(
        [[1, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1], [0, 0, 1, 0, 1, 1]], dtype=torch.float32
    )
    x[:, 1, :4] = torch.tensor(
        [[0.5, 0.7, 0.2, 0.0], [0.5, 0.7, 0.7, 0.0], [0.5, 0.1, 0.7, 0.0]]
    )  # gray, ties
    x[:, 2] = x[0, 2]  # a gray row
    x[:, 3, :3] = torch.tensor([[1.0, 1.0, 0.3], [1.0, 0.3, 1.0], [0.3, 1.0, 1.0]])  # two-way maxima
    return x


@pytest.mark.parametrize("factor", [-0.5, -0.2, -1e-3, 0.07, 0.2, 0.5])
def test_hue_matches_torchvision(factor: float) -> None:
    x = _hue_cases()
    torch.testing.assert_close(adjust_hue(x, factor), TF.adjust_hue(x, factor), atol=2e-6, rtol=0)


@pytest.mark.parametrize(("size", "kernel"), [(24, 13), (13, 13), (9, 3), (5, 5)])
def test_blur_matches_torchvision(size: int, kernel: int) -> None:
    x = smooth_image(size, size + 3, 7).float() / 255
    for sigma in (0.1, 0.8, 2.0):
        torch.testing.assert_close(
            gaussian_blur(x, sigma, kernel),
            TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma]),
            atol=1e-6,
            rtol=0,
        )


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14)])
@pytest.mark.parametrize("hw", [(120, 200), (36, 300)])
def test_crop_boxes_match_torchvision(scale: tuple[float, float], hw: tuple[int, int]) -> None:
    n = 3000
    h, w = hw
    torch.manual_seed(1234)
    img = torch.empty(3, h, w, dtype=torch.uint8)
    theirs = torch.tensor(
        [T1.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]
    )
    g = torch.Generator().manual_seed(5)
    ours = torch.tensor(
        [crop_box(torch.rand(22, generator=g, dtype=torch.float64).tolist(), h, w, *scale) for _ in range(n)]
    )
    top, left, bh, bw = ours.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    for name, f in {
        "scale": lambda b: b[:, 2] * b[:, 3] / (h * w),
        "log_aspect": lambda b: torch.log(b[:, 3] / b[:, 2]),
        "center_y": lambda b: (b[:, 0] + b[:, 2] / 2) / h,
        "center_x": lambda b: (b[:, 1] + b[:, 3] / 2) / w,
    }.items():
        _assert_same_distribution(f(theirs.double()), f(ours.double()), f"{name} {hw} {scale}")
    # Where no try fits, both fall back to the same centred box.
    fb_h = h if w / h > 4 / 3 else round(w / 0.75)
    fb_w = round(h * 4 / 3) if w / h > 4 / 3 else w
    fallback = torch.tensor([(h - fb_h) // 2, (w - fb_w) // 2, fb_h, fb_w])
    p_ours = (ours == fallback).all(1).double().mean().item()
    p_theirs = (theirs == fallback).all(1).double().mean().item()
    p = 0.5 * (p_ours + p_theirs)
    assert abs(p_ours - p_theirs) <= 4 * math.sqrt(max(p * (1 - p), 1e-4) * 2 / n)


def test_application_rates_ranges_and_order() -> None:
    augment = AugmentSpec(flip_prob=0.3, jitter_prob=0.6, grayscale_prob=0.1, blur_prob=0.9)
    g = torch.Generator().manual_seed(9)
    draws = [d for _ in range(1200) for d in draw_crops(40, 50, [CropSpec(16, 0.05, 0.14)] * 4, augment, g)]
    n = len(draws)
    for attr, p in [("flip", 0.3), ("jitter", 0.6), ("grayscale", 0.1), ("blur", 0.9)]:
        rate = sum(getattr(d, attr) for d in draws) / n
        assert abs(rate - p) <= binomial_tol(p, n), attr
    for attr, (lo, hi) in [
        ("brightness", (0.2, 1.8)),
        ("contrast", (0.2, 1.8)),
        ("saturation", (0.2, 1.8)),
        ("hue", (-0.2, 0.2)),
        ("sigma", (0.1, 2.0)),
    ]:
        values = torch.tensor([getattr(d, attr) for d in draws], dtype=torch.float64)
        assert values.min() >= lo and values.max() <= hi
        assert abs(values.mean().item() - (lo + hi) / 2) <= 4 * (hi - lo) / math.sqrt(12 * n), attr
    orders = torch.tensor([d.order for d in draws])
    perms, counts = torch.unique(orders, dim=0, return_counts=True)
    assert perms.shape[0] == 24
    assert ((counts.double() / n - 1 / 24).abs() <= binomial_tol(1 / 24, n)).all()
    # Strength 0 disables an op, as ColorJitter's None factor.
    (d,) = draw_crops(40, 50, [CropSpec(16, 0.05, 0.14)], AugmentSpec(hue=0.0, brightness=0.0), g)
    assert d.hue is None and d.brightness is None and d.contrast is not None


def test_output_statistics_agree_with_per_image_v2() -> None:
    images = [smooth_image(48, 64, 20 + i) for i in range(16)]
    crops = [CropSpec(32, 0.14, 1.0), CropSpec(16, 0.05, 0.14)]
    augment = AugmentSpec()
    torch.manual_seed(0)
    v2_path = PerImageMultiCrop(crops, augment)
    fast = FastMultiCrop(crops, augment)
    a_all = [v2_path(im) for _ in range(8) for im in images]
    b_all = [fast(im) for _ in range(8) for im in images]
    for c, crop in enumerate(crops):
        a = torch.stack([o[c] for o in a_all])
        b = torch.stack([o[c] for o in b_all])
        assert b.shape == a.shape == (128, 3, crop.size, crop.size)
        for stat in (lambda t: t.mean(dim=(1, 2, 3)), lambda t: t.std(dim=(1, 2, 3))):
            sa, sb = stat(a), stat(b)
            se = math.sqrt(sa.var().item() / sa.numel() + sb.var().item() / sb.numel())
            assert abs(sa.mean().item() - sb.mean().item()) <= 4 * se + 0.02


def test_seeded_by_the_global_generator_and_rejects_bad_input() -> None:
    image = smooth_image(30, 40, 1)
    fast = FastMultiCrop(CROPS, AugmentSpec())
    torch.manual_seed(3)
    a = fast(image)
    torch.manual_seed(3)
    b = fast(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert [tuple(x.shape) for x in a] == [(3, c.size, c.size) for c in CROPS]
    with pytest.raises(ValueError):
        fast(torch.zeros(3, 8, 8))
    one_channel = fast(smooth_image(20, 20, 2, channels=1))
    assert all(torch.isfinite(x).all() for x in one_channel)
