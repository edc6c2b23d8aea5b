"""Multi-crop: the spec, the draws against torchvision's samplers, the ops against torchvision's
functional ops, and the device path's geometry and batching. (Both paths against each other:
tests/test_multicrop_paths.py.)"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
from torchvision.transforms.v2 import functional as TF

from swavctl.config import AugmentSettings
from swavctl.data.multicrop import (
    AugmentSpec,
    CropDraws,
    CropSpec,
    MultiCrop,
    apply_draws,
    batch_multicrop,
    blur_kernel_size,
    draw_batch,
    expand_crops,
    size_groups,
)
from swavctl.data.multicrop.batched import batch_geometric, stack_padded
from swavctl.data.multicrop.photometric import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    grayscale,
    photometric,
)
from tests.multicrop_oracle import V2_JITTER, PerImageMultiCrop, smooth_image, v2_reference

NO_PHOTOMETRIC = AugmentSpec(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
CROPS = [CropSpec(32, 0.14, 1.0), CropSpec(32, 0.14, 1.0), CropSpec(16, 0.05, 0.14), CropSpec(5, 0.05, 0.14)]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add waiting


def binomial_tol(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1.0 - p) / n)


# ----------------------------------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------------------------------


def test_the_augment_spec_is_the_settings_class() -> None:
    """One declaration of the augmentation's fields: the settings tree's (validated once)."""
    assert AugmentSpec is AugmentSettings


def test_expand_crops_paper_recipe() -> None:
    crops = expand_crops([2, 6], [224, 96], [0.14, 0.05], [1.0, 0.14])
    assert len(crops) == 8
    assert crops[:2] == [CropSpec(224, 0.14, 1.0)] * 2
    assert crops[2:] == [CropSpec(96, 0.05, 0.14)] * 6


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([2, 6], [224], [0.14, 0.05], [1.0, 0.14]), "differ in length"),
        (([], [], [], []), "empty"),
        (([0, 6], [224, 96], [0.14, 0.05], [1.0, 0.14]), r"crop_counts\[0\]"),
        (([2, -1], [224, 96], [0.14, 0.05], [1.0, 0.14]), r"crop_counts\[1\]"),
        (([2, 6], [224, 0], [0.14, 0.05], [1.0, 0.14]), r"crop group 1 .*crop size must be a positive"),
        (([2, 6], [224, 96], [0.0, 0.05], [1.0, 0.14]), r"crop group 0 .*min_scale=0\.0"),
        (([2, 6], [224, 96], [0.14, 0.2], [1.0, 0.14]), "min_scale <= max_scale"),
        (([2, 6], [224, 96], [0.14, 0.05], [1.5, 0.14]), r"crop group 0 .*max_scale=1\.5"),
    ],
)
def test_expand_crops_rejects(args: tuple[list, list, list, list], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expand_crops(*args)


def test_specs_validate() -> None:
    with pytest.raises(ValueError, match="size"):
        CropSpec(0, 0.1, 0.5)
    with pytest.raises(ValueError, match="scales"):
        CropSpec(32, 0.6, 0.5)
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentSpec(flip_prob=1.5)
    with pytest.raises(ValueError, match="hue"):
        AugmentSpec(hue=0.6)
    with pytest.raises(ValueError, match="sigma"):
        AugmentSpec(blur_sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma"):
        AugmentSpec(blur_sigma_min=1.0, blur_sigma_max=0.5)
    with pytest.raises(ValueError, match="std"):
        AugmentSpec(std=(0.2, 0.0, 0.2))


def test_blur_kernel_size_rule() -> None:
    assert blur_kernel_size(224, 2.0) == 13  # 2 * ceil(6) + 1
    assert blur_kernel_size(96, 2.0) == 13
    assert blur_kernel_size(224, 0.1) == 3
    assert blur_kernel_size(8, 2.0) == 7  # clipped to the largest odd side <= crop
    assert blur_kernel_size(3, 2.0) == 3
    assert blur_kernel_size(2, 2.0) == 1
    assert blur_kernel_size(1, 2.0) == 1


def test_augment_spec_defaults_are_the_papers() -> None:
    """SwAV's per-crop photometric recipe (arXiv 2006.09882, App. A; the official normalisation)."""
    spec = AugmentSpec()
    assert spec.flip_prob == 0.5
    assert spec.jitter_prob == 0.8
    assert (spec.brightness, spec.contrast, spec.saturation, spec.hue) == (0.8, 0.8, 0.8, 0.2)
    assert spec.grayscale_prob == 0.2
    assert spec.blur_prob == 0.5
    assert (spec.blur_sigma_min, spec.blur_sigma_max) == (0.1, 2.0)
    assert spec.mean == (0.485, 0.456, 0.406)
    assert spec.std == (0.228, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Shapes and input handling, both paths and the oracle
# ----------------------------------------------------------------------------------------------


def _gray_looking(h: int, w: int) -> torch.Tensor:
    return smooth_image(h, w, 3, channels=1).expand(3, -1, -1).clone()


@pytest.mark.parametrize(
    "image",
    [
        smooth_image(48, 64, 0),  # larger than every crop, non-square
        smooth_image(10, 12, 1),  # smaller than the 32 px crop
        smooth_image(7, 90, 2),  # extreme aspect ratio (centre-crop fallback)
        smooth_image(1, 1, 4),  # a single pixel
        smooth_image(40, 30, 5, channels=1),  # one-channel decode
        _gray_looking(40, 40),  # R = G = B
    ],
    ids=["48x64", "smaller-than-crop", "7x90", "1x1", "1-channel", "gray-rgb"],
)
def test_shapes_all_paths(image: torch.Tensor) -> None:
    augment = AugmentSpec(jitter_prob=1.0, grayscale_prob=0.5, blur_prob=1.0)
    oracle = PerImageMultiCrop(CROPS, augment)(image)
    worker = MultiCrop(CROPS, augment)(image, generator=torch.Generator().manual_seed(0))
    batched = batch_multicrop([image, image], CROPS, augment, generator=torch.Generator().manual_seed(0))
    assert len(oracle) == len(worker) == len(batched) == len(CROPS)
    for crop, one, two, many in zip(CROPS, oracle, worker, batched, strict=True):
        for x in (one, two):
            assert x.shape == (3, crop.size, crop.size) and x.dtype == torch.float32
        assert many.shape == (2, 3, crop.size, crop.size) and many.dtype == torch.float32
        assert torch.isfinite(one).all() and torch.isfinite(two).all() and torch.isfinite(many).all()


def test_batched_mixed_sizes() -> None:
    images = [smooth_image(48, 64, 0), smooth_image(10, 12, 1), smooth_image(33, 21, 2, channels=1)]
    out = batch_multicrop(images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(1))
    assert [tuple(o.shape) for o in out] == [(3, 3, c.size, c.size) for c in CROPS]


def test_gray_looking_input_stays_gray() -> None:
    image = _gray_looking(40, 40)
    augment = AugmentSpec(jitter_prob=1.0, grayscale_prob=0.0, blur_prob=1.0)
    mean = torch.tensor(augment.mean).view(-1, 1, 1)
    std = torch.tensor(augment.std).view(-1, 1, 1)
    outs = MultiCrop(CROPS, augment)(image, generator=torch.Generator().manual_seed(2)) + [
        o[0] for o in batch_multicrop([image], CROPS, augment, generator=torch.Generator().manual_seed(2))
    ]
    for out in outs:
        rgb = out * std + mean
        assert (rgb[0] - rgb[1]).abs().max() < 2e-3 and (rgb[1] - rgb[2]).abs().max() < 2e-3


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(3, 8, 8), torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8)],
    ids=["float", "4-channel", "2d"],
)
def test_rejects_bad_images(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        MultiCrop(CROPS, AugmentSpec())(bad)
    with pytest.raises(ValueError):
        batch_multicrop([bad], CROPS, AugmentSpec())


def test_generator_reproducible() -> None:
    images = [smooth_image(48, 64, i) for i in range(3)]
    a = batch_multicrop(images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(7))
    b = batch_multicrop(images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(7))
    c = batch_multicrop(images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    d = batch_multicrop(images, CROPS, AugmentSpec(), seeds=[4, 5, 6])
    e = batch_multicrop(images, CROPS, AugmentSpec(), seeds=[4, 5, 6])
    assert all(torch.equal(x, y) for x, y in zip(d, e, strict=True))


def test_worker_path_seeded_by_the_global_generator_when_given_none() -> None:
    image = smooth_image(30, 40, 1)
    fast = MultiCrop(CROPS, AugmentSpec())
    torch.manual_seed(3)
    a = fast(image)
    torch.manual_seed(3)
    b = fast(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    one_channel = fast(smooth_image(20, 20, 2, channels=1))
    assert all(torch.isfinite(x).all() for x in one_channel)


# ----------------------------------------------------------------------------------------------
# Distributions of the draws, against torchvision's samplers
# ----------------------------------------------------------------------------------------------


def _tv_boxes(h: int, w: int, scale: tuple[float, float], n: int) -> torch.Tensor:
    torch.manual_seed(1234)
    img = torch.empty(3, h, w, dtype=torch.uint8)
    ratio = (3.0 / 4.0, 4.0 / 3.0)
    return torch.tensor([T1.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


def _our_boxes(h: int, w: int, scale: tuple[float, float], n: int) -> torch.Tensor:
    (draws,) = draw_batch(
        [(h, w)] * n, [CropSpec(8, *scale)], AugmentSpec(), generator=torch.Generator().manual_seed(99)
    )
    return torch.from_numpy(draws.boxes)


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


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14)])
@pytest.mark.parametrize("hw", [(120, 200), (36, 300)])
def test_crop_boxes_match_torchvision(scale: tuple[float, float], hw: tuple[int, int]) -> None:
    n = 3000
    h, w = hw
    ours, theirs = _our_boxes(h, w, scale, n), _tv_boxes(h, w, scale, n)
    for boxes in (ours, theirs):
        top, left, bh, bw = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
        assert (top + bh <= h).all() and (left + bw <= w).all()

    def stats(boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        top, left, bh, bw = boxes.double().unbind(1)
        return {
            "scale": bh * bw / (h * w),
            "log_aspect": torch.log(bw / bh),
            "center_y": (top + bh / 2) / h,
            "center_x": (left + bw / 2) / w,
        }

    s_ours, s_theirs = stats(ours), stats(theirs)
    for key in s_ours:
        _assert_same_distribution(s_theirs[key], s_ours[key], f"{key} {hw} {scale}")
    # Fallback (centre crop, aspect clamped to 4/3) rate agrees with torchvision's.
    fb_h = h if w / h > 4 / 3 else round(w / 0.75)
    fb_w = round(h * 4 / 3) if w / h > 4 / 3 else w
    fallback = torch.tensor([(h - fb_h) // 2, (w - fb_w) // 2, fb_h, fb_w])
    p_ours = (ours == fallback).all(1).double().mean().item()
    p_theirs = (theirs == fallback).all(1).double().mean().item()
    p = 0.5 * (p_ours + p_theirs)
    assert abs(p_ours - p_theirs) <= 4 * math.sqrt(max(p * (1 - p), 1e-4) * 2 / n)
    if hw == (120, 200):
        # Where (almost) every box fits, the realised area scale stays in [min, max] up to rounding.
        realised = s_ours["scale"]
        slack = 2.5 / math.sqrt(scale[0] * h * w)  # relative error of rounding both sides
        assert realised.min() >= scale[0] * (1 - slack) and realised.max() <= scale[1] * (1 + slack)
        if scale[1] <= 0.14:  # every first try fits: the area scale is ~ U(min, max)
            tol = 4 * (scale[1] - scale[0]) / math.sqrt(12 * n) + 0.002  # + rounding bias
            assert abs(realised.mean().item() - 0.5 * sum(scale)) <= tol


@pytest.mark.parametrize(
    "augment",
    [AugmentSpec(), AugmentSpec(flip_prob=0.3, jitter_prob=0.6, grayscale_prob=0.1, blur_prob=0.9)],
    ids=["paper", "custom"],
)
def test_application_rates(augment: AugmentSpec) -> None:
    n = 4000
    (draws,) = draw_batch(
        [(40, 50)] * n, [CropSpec(16, 0.05, 0.14)], augment, generator=torch.Generator().manual_seed(5)
    )
    for mask, p in [
        (draws.flip, augment.flip_prob),
        (draws.jitter, augment.jitter_prob),
        (draws.grayscale, augment.grayscale_prob),
        (draws.blur, augment.blur_prob),
    ]:
        assert mask.dtype == np.bool_ and mask.shape == (n,)
        assert abs(mask.mean() - p) <= binomial_tol(p, n)
    # Factors: uniform over ColorJitter's ranges, sigma uniform over the blur range.
    for values, (lo, hi) in [
        (draws.factors[:, 0], (1 - augment.brightness, 1 + augment.brightness)),
        (draws.factors[:, 1], (1 - augment.contrast, 1 + augment.contrast)),
        (draws.factors[:, 2], (1 - augment.saturation, 1 + augment.saturation)),
        (draws.factors[:, 3], (-augment.hue, augment.hue)),
        (draws.sigma, (augment.blur_sigma_min, augment.blur_sigma_max)),
    ]:
        assert values.min() >= lo and values.max() <= hi
        assert abs(values.mean() - (lo + hi) / 2) <= 4 * (hi - lo) / math.sqrt(12 * n)


def test_jitter_order_uniform_and_strength_zero_is_the_identity() -> None:
    n = 4800
    (draws,) = draw_batch(
        [(40, 50)] * n, [CropSpec(16, 0.05, 0.14)], AugmentSpec(), generator=torch.Generator().manual_seed(6)
    )
    order = torch.from_numpy(draws.order)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    perms, counts = torch.unique(order, dim=0, return_counts=True)
    assert perms.shape[0] == 24
    p = 1 / 24
    assert ((counts.double() / n - p).abs() <= binomial_tol(p, n)).all()
    # Strength 0 draws the identity factor (and the op is skipped, as ColorJitter's None factor).
    (off,) = draw_batch([(40, 50)] * 50, [CropSpec(16, 0.05, 0.14)], AugmentSpec(hue=0.0, brightness=0.0))
    assert (off.factors[:, 0] == 1.0).all() and (off.factors[:, 3] == 0.0).all()
    assert off.factors[:, 1].std() > 0.1


# ----------------------------------------------------------------------------------------------
# The ops against torchvision.transforms.v2.functional
# ----------------------------------------------------------------------------------------------


def _float_batch(n: int = 5, h: int = 20, w: int = 24) -> torch.Tensor:
    x = torch.stack([smooth_image(h, w, 10 + i) for i in range(n)]).float() / 255
    x[-1] = x[-1, :1].expand(3, -1, -1)  # one gray-looking sample
    x[0, :, :2, :2] = 1.0  # a saturated corner
    return x


@pytest.mark.parametrize(
    ("ours", "theirs", "factors", "atol"),
    [
        (adjust_brightness, TF.adjust_brightness, [0.2, 1.0, 1.8, 0.7, 1.3], 1e-5),
        (adjust_contrast, TF.adjust_contrast, [0.2, 1.0, 1.8, 0.0, 1.3], 1e-5),
        (adjust_saturation, TF.adjust_saturation, [0.2, 1.0, 1.8, 0.0, 1.3], 1e-5),
        (adjust_hue, TF.adjust_hue, [-0.2, 0.0, 0.2, 0.5, 0.13], 1e-5),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_jitter_ops_match_torchvision(
    ours: Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor],
    theirs: Callable[..., torch.Tensor],
    factors: list[float],
    atol: float,
) -> None:
    """One factor per image (the device path) and one float for one image (the worker path)."""
    x = _float_batch()
    batched = ours(x.clone(), torch.tensor(factors).view(-1, 1, 1, 1))
    for i, f in enumerate(factors):
        ref = theirs(x[i], f)
        torch.testing.assert_close(batched[i], ref, atol=atol, rtol=0)
        torch.testing.assert_close(ours(x[i : i + 1].clone(), f)[0], ref, atol=atol, rtol=0)


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
    # Near grey: a chroma below half of float32's spacing at 1 (the pixel that once gave a NaN in
    # a training run, and its kin with the minimum in each channel).
    a, b = 0.5810508131980896, 0.5810507535934448
    x[:, 4, :3] = torch.tensor([[a, a, b], [a, b, a], [b, a, a]])
    x[:, 4, 3] = torch.tensor([0.25, 0.25 + 2**-26, 0.25])  # a chroma of 2^-26
    return x


@pytest.mark.parametrize("factor", [-0.5, -0.2, -1e-3, 0.07, 0.2, 0.5])
def test_hue_matches_torchvision_on_edge_cases(factor: float) -> None:
    x = _hue_cases()
    torch.testing.assert_close(adjust_hue(x[None], factor)[0], TF.adjust_hue(x, factor), atol=2e-6, rtol=0)


def test_hue_moves_pixels_at_most_three_times_their_change() -> None:
    """The sup-norm Lipschitz bound of the hue rotation that tests/test_multicrop_paths.py uses
    (each piece is linear with absolute coefficients summing to at most 3; the map is continuous)."""
    g = torch.Generator().manual_seed(8)
    x = torch.rand(4000, 3, 1, 1, generator=g)
    dx = (torch.rand(4000, 3, 1, 1, generator=g) - 0.5) * 1e-3
    y = (x + dx).clamp(0, 1)
    change = (x - y).abs().amax(dim=(1, 2, 3))
    for factor in (-0.5, -0.21, 0.13, 0.33):
        moved = (adjust_hue(x, factor) - adjust_hue(y, factor)).abs().amax(dim=(1, 2, 3))
        assert (moved <= 3 * change + 1e-6).all()
        assert (moved > 2.5 * change).any()  # and 3 is about the least such bound


def test_grayscale_matches_torchvision() -> None:
    x = _float_batch()
    out = grayscale(x)
    for i in range(x.shape[0]):
        torch.testing.assert_close(
            out[i], TF.rgb_to_grayscale(x[i], num_output_channels=3), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize(("size", "kernel"), [(22, 13), (13, 13), (9, 3), (5, 5), (22, 1)])
def test_blur_matches_torchvision(size: int, kernel: int) -> None:
    x = _float_batch(h=size, w=size + 4)
    sigmas = [0.1, 0.7, 2.0, 1.3, 0.45]
    batched = gaussian_blur(x, sigmas, kernel)
    for i, s in enumerate(sigmas):
        ref = TF.gaussian_blur(x[i], [kernel, kernel], [s, s])
        torch.testing.assert_close(batched[i], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(gaussian_blur(x[i : i + 1], [s], kernel)[0], ref, atol=1e-6, rtol=0)


def _draws(n: int, **overrides: np.ndarray) -> CropDraws:
    base: dict[str, np.ndarray] = {
        "boxes": np.zeros((n, 4), dtype=np.int64),
        "flip": np.zeros(n, dtype=bool),
        "jitter": np.zeros(n, dtype=bool),
        "order": np.tile(np.arange(4), (n, 1)),
        "factors": np.tile(np.array([1.0, 1.0, 1.0, 0.0]), (n, 1)),
        "grayscale": np.zeros(n, dtype=bool),
        "blur": np.zeros(n, dtype=bool),
        "sigma": np.ones(n),
    }
    base.update(overrides)
    return CropDraws(**base)


_STAGE_DRAWS = {
    "jitter": np.array([1, 0, 1, 1, 0, 1], dtype=bool),
    "order": np.array([[3, 1, 0, 2], [0, 1, 2, 3], [0, 2, 1, 3], [2, 3, 1, 0], [1, 0, 3, 2], [1, 2, 3, 0]]),
    "factors": np.array(
        [[1.4, 0.6, 1.7, 0.1], [0.5, 1.2, 0.2, -0.2], [0.8, 1.5, 0.5, 0.05], [1.1, 0.4, 1.3, -0.15]]
        + [[1.7, 0.9, 1.0, 0.2], [0.3, 1.8, 0.0, 0.0]]
    ),
    "grayscale": np.array([0, 1, 1, 0, 0, 1], dtype=bool),
    "blur": np.array([1, 1, 0, 0, 1, 1], dtype=bool),
    "sigma": np.array([0.3, 1.9, 1.0, 0.8, 1.2, 0.1]),
}


@pytest.mark.parametrize(
    "augment", [AugmentSpec(), AugmentSpec(saturation=0.0, hue=0.0)], ids=["paper", "saturation+hue off"]
)
@pytest.mark.parametrize("rows", ["together", "one at a time"])
def test_photometric_stage_matches_the_v2_pipeline(augment: AugmentSpec, rows: str) -> None:
    """Masks, per-row order and factors reach the right rows; the result equals v2 step by step,
    for a batch (the device path) and for one row at a time (the worker path)."""
    x = _float_batch(n=6)
    draws = _draws(6, **_STAGE_DRAWS)
    kernel = blur_kernel_size(x.shape[-1], augment.blur_sigma_max)
    if rows == "together":
        out = photometric(x.clone(), draws, augment, kernel)
    else:
        out = torch.cat(
            [photometric(x[i : i + 1].clone(), draws.take([i]), augment, kernel) for i in range(6)]
        )
    enabled = (True, True, augment.saturation > 0, augment.hue > 0)
    for i in range(6):
        ref = x[i]
        if draws.jitter[i]:
            for op in draws.order[i].tolist():
                if enabled[op]:
                    ref = V2_JITTER[op](ref, float(draws.factors[i, op]))
        if draws.grayscale[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if draws.blur[i]:
            s = float(draws.sigma[i])
            ref = TF.gaussian_blur(ref, [kernel, kernel], [s, s])
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "augment",
    [AugmentSpec(), AugmentSpec(jitter_prob=1.0, grayscale_prob=0.5, blur_prob=1.0, hue=0.5, saturation=0.0)],
    ids=["paper", "strong"],
)
def test_every_worker_crop_equals_the_v2_pipeline(augment: AugmentSpec) -> None:
    images = [
        smooth_image(48, 64, 0),
        smooth_image(10, 12, 1),
        smooth_image(7, 90, 2),
        smooth_image(40, 40, 3),
    ]
    multicrop = MultiCrop(CROPS, augment)
    g = torch.Generator().manual_seed(0)
    for image in images * 6:
        draws = multicrop.draw(int(image.shape[1]), int(image.shape[2]), g)
        for c, (crop, ours) in enumerate(zip(CROPS, multicrop.apply(image, draws), strict=True)):
            torch.testing.assert_close(
                ours, v2_reference(image, draws, c, crop.size, augment), atol=2e-5, rtol=0
            )


# ----------------------------------------------------------------------------------------------
# The device path's geometry and batching
# ----------------------------------------------------------------------------------------------


def test_crop_whole_image_is_identity_even_in_padded_batch() -> None:
    big, small = smooth_image(30, 40, 0), smooth_image(16, 16, 1)
    padded = stack_padded([big, small])
    boxes = np.array([[0, 0, 30, 40], [0, 0, 16, 16]])
    out = batch_geometric(padded, _draws(2, boxes=boxes), 16)
    torch.testing.assert_close(out[1], TF.to_dtype(small, torch.float32, scale=True), atol=1e-6, rtol=0)
    flipped = batch_geometric(padded, _draws(2, boxes=boxes, flip=np.ones(2, dtype=bool)), 16)
    torch.testing.assert_close(flipped[1], out[1].flip(-1), atol=0, rtol=0)


@pytest.mark.parametrize("size", [24, 16, 7], ids=["upscale", "mixed", "downscale"])
def test_crop_matches_torchvision_resized_crop(size: int) -> None:
    """Crop + antialiased bilinear resize equals v2's resized_crop, also at the edge of a padded image."""
    big, small = smooth_image(30, 40, 0), smooth_image(16, 18, 1)
    padded = stack_padded([big, small])
    # Two crop specs' worth of boxes (crop-major): sample k comes from image k % 2.
    boxes = np.array([[3, 5, 12, 10], [4, 6, 12, 12], [0, 0, 30, 40], [1, 0, 15, 18]])
    flip = np.array([False, True, True, False])
    out = batch_geometric(padded, _draws(4, boxes=boxes, flip=flip), size)
    for k in range(4):
        image = [big, small][k % 2]
        top, left, h, w = boxes[k].tolist()
        ref = TF.resized_crop(TF.to_dtype(image, torch.float32, scale=True), top, left, h, w, [size, size])
        if flip[k]:
            ref = TF.horizontal_flip(ref)
        torch.testing.assert_close(out[k], ref, atol=1e-5, rtol=0)


def test_apply_draws_uses_given_boxes() -> None:
    image = smooth_image(16, 16, 2)
    crop = CropSpec(16, 0.5, 1.0)
    (out,) = apply_draws([image], [crop], NO_PHOTOMETRIC, [_draws(1, boxes=np.array([[0, 0, 16, 16]]))])
    expected = TF.normalize(
        TF.to_dtype(image, torch.float32, scale=True), list(NO_PHOTOMETRIC.mean), list(NO_PHOTOMETRIC.std)
    )
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


def test_size_groups_bound_the_padding() -> None:
    sizes = [(375, 500)] * 5 + [(500, 375)] * 3 + [(2848, 4288), (333, 500), (1200, 900), (375, 500)]
    groups = size_groups(sizes)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for g in groups:
        h_max, w_max = max(sizes[i][0] for i in g), max(sizes[i][1] for i in g)
        pixels = sum(sizes[i][0] * sizes[i][1] for i in g)
        assert len(g) == 1 or len(g) * h_max * w_max <= 1.25 * pixels
    group_of = {i: n for n, g in enumerate(groups) for i in g}
    assert len({group_of[i] for i in (0, 1, 2, 3, 4, 11)}) == 1  # one size, one group
    assert group_of[0] != group_of[5]  # landscape and portrait are not padded into squares
    assert groups[group_of[8]] == [8]  # the big photo pads nothing else up to its size
    assert all(g == sorted(g) for g in groups)
    assert size_groups([(10, 10)] * 4) == [[0, 1, 2, 3]]
    assert size_groups([(11, 10), (10, 10), (12, 10)]) == [[0, 1, 2]]
    assert len(size_groups(sizes, slack=float("inf"))) == 1
    with pytest.raises(ValueError, match="slack"):
        size_groups(sizes, slack=0.9)


@pytest.mark.parametrize(
    ("shapes", "groups"),
    [
        ([(30, 40), (40, 30), (30, 40), (120, 90), (9, 13)], [[4], [0, 2], [1], [3]]),
        # One padding group, but not in size order: the stack must keep the batch's order.
        ([(31, 40), (30, 40), (32, 40), (30, 39)], [[0, 1, 2, 3]]),
    ],
    ids=["several-groups", "one-group-unsorted"],
)
def test_mixed_sizes_batch_equals_one_image_at_a_time(
    shapes: list[tuple[int, int]], groups: list[list[int]]
) -> None:
    """Images padded together or in separate groups come out as if each were augmented alone."""
    images = [smooth_image(h, w, i, channels=1 if i == 4 else 3) for i, (h, w) in enumerate(shapes)]
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    assert size_groups(sizes) == groups  # precondition: the case below is the one named
    augment = AugmentSpec(jitter_prob=1.0, grayscale_prob=0.3, blur_prob=0.5)
    draws = draw_batch(sizes, CROPS, augment, generator=torch.Generator().manual_seed(5))
    together = apply_draws(images, CROPS, augment, draws)
    for i, image in enumerate(images):
        alone = apply_draws([image], CROPS, augment, [d.take([i]) for d in draws])
        for crop, many, one in zip(CROPS, together, alone, strict=True):
            assert many.shape == (len(images), 3, crop.size, crop.size)
            torch.testing.assert_close(many[i], one[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Both paths end to end against the torchvision oracle: output pixel statistics (loose sanity)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", [NO_PHOTOMETRIC, AugmentSpec()], ids=["geometry-only", "paper"])
def test_output_statistics_agree_with_the_oracle(augment: AugmentSpec) -> None:
    images = [smooth_image(48, 64, 20 + i) for i in range(16)]
    crops = [CropSpec(32, 0.14, 1.0), CropSpec(16, 0.05, 0.14)]
    reps = 8
    torch.manual_seed(0)
    oracle = PerImageMultiCrop(crops, augment)
    expected = [[oracle(im) for im in images] for _ in range(reps)]
    worker = MultiCrop(crops, augment, generator=torch.Generator().manual_seed(1))
    worker_out = [[worker(im) for im in images] for _ in range(reps)]
    g = torch.Generator().manual_seed(0)
    batched = [batch_multicrop(images, crops, augment, generator=g) for _ in range(reps)]
    for c in range(len(crops)):
        a = torch.stack([out[c] for rep in expected for out in rep])  # [reps * 16, 3, s, s]
        for b in (
            torch.cat([rep[c] for rep in batched]),
            torch.stack([o[c] for rep in worker_out for o in rep]),
        ):
            assert b.shape == a.shape
            for stat in (lambda t: t.mean(dim=(1, 2, 3)), lambda t: t.std(dim=(1, 2, 3))):
                sa, sb = stat(a), stat(b)
                se = math.sqrt(sa.var().item() / sa.numel() + sb.var().item() / sb.numel())
                assert abs(sa.mean().item() - sb.mean().item()) <= 4 * se + 0.02


def test_oracle_is_built_from_the_papers_transforms() -> None:
    """Each crop's oracle pipeline is, in order: RandomResizedCrop(size, its scale, ratio (3/4,
    4/3), bilinear, antialiased), a *horizontal* flip p 0.5, then to float, ColorJitter(0.8, 0.8,
    0.8, 0.2) with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 with sigma in (0.1, 2.0) and the
    crop size's kernel, then the normalisation."""
    from torchvision.transforms import v2

    crops = [CropSpec(16, 0.14, 1.0), CropSpec(8, 0.05, 0.14), CropSpec(16, 0.14, 1.0)]
    multicrop = PerImageMultiCrop(crops, AugmentSpec())
    assert len(multicrop._pipelines) == len(crops)
    for crop, pipeline in zip(crops, multicrop._pipelines, strict=True):
        geometric, photometric_stage, normalize = pipeline.transforms
        resized_crop, flip = geometric.transforms
        assert type(resized_crop) is v2.RandomResizedCrop
        assert resized_crop.size == (crop.size, crop.size)
        assert resized_crop.scale == (crop.min_scale, crop.max_scale)
        assert resized_crop.ratio == pytest.approx((3 / 4, 4 / 3))
        assert resized_crop.interpolation == v2.InterpolationMode.BILINEAR and resized_crop.antialias
        assert type(flip) is v2.RandomHorizontalFlip and flip.p == 0.5

        to_float, jitter, gray, blur = photometric_stage.transforms
        assert type(to_float) is v2.ToDtype and to_float.dtype == torch.float32 and to_float.scale
        assert type(jitter) is v2.RandomApply and jitter.p == 0.8
        (color,) = jitter.transforms
        assert type(color) is v2.ColorJitter
        for strength in (color.brightness, color.contrast, color.saturation):
            assert strength == pytest.approx((0.2, 1.8))
        assert color.hue == pytest.approx((-0.2, 0.2))
        assert type(gray) is v2.RandomGrayscale and gray.p == 0.2
        assert type(blur) is v2.RandomApply and blur.p == 0.5
        (gaussian,) = blur.transforms
        assert type(gaussian) is v2.GaussianBlur
        assert list(gaussian.sigma) == pytest.approx([0.1, 2.0])
        kernel = blur_kernel_size(crop.size, 2.0)
        assert tuple(gaussian.kernel_size) == (kernel, kernel)

        assert type(normalize) is v2.Normalize
        assert list(normalize.mean) == pytest.approx([0.485, 0.456, 0.406])
        assert list(normalize.std) == pytest.approx([0.228, 0.224, 0.225])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    images = [smooth_image(48, 64, 0), smooth_image(10, 12, 1), smooth_image(33, 21, 2)]
    cpu = batch_multicrop(images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(3))
    cuda_images = [im.cuda() for im in images]
    gpu = batch_multicrop(cuda_images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(3))
    for a, b in zip(cpu, gpu, strict=True):
        assert b.device.type == "cuda"
        assert (a - b.cpu()).abs().mean() < 1e-4
    out = batch_multicrop(cuda_images, CROPS, AugmentSpec(), seeds=[1, 2, 3])
    assert all(o.device.type == "cuda" and torch.isfinite(o).all() for o in out)
