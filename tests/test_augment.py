"""Multi-crop augmentation: the per-image v2 path and the batched path draw from one distribution."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T1
from torchvision.transforms.v2 import functional as TF

from swavctl.data.augment import (
    AugmentSpec,
    CropSpec,
    PerImageMultiCrop,
    blur_kernel_size,
    expand_crops,
)
from swavctl.data.batch_augment import (
    CropParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_params,
    batch_geometric,
    batch_multicrop,
    batch_photometric,
    color_jitter,
    gaussian_blur,
    rgb_to_grayscale,
    sample_crop_boxes,
    sample_params,
    size_groups,
    stack_padded,
)

NO_PHOTOMETRIC = AugmentSpec(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add waiting


def smooth_image(h: int, w: int, seed: int, channels: int = 3) -> torch.Tensor:
    """A uint8 image with structure at several scales (so crops differ)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, 6, 6, generator=g)
    img = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    img = img * 0.8 + 0.2 * torch.rand(channels, h, w, generator=g)
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


def binomial_tol(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1.0 - p) / n)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


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
        (([2, 6], [224, 0], [0.14, 0.05], [1.0, 0.14]), r"crop_sizes\[1\]"),
        (([2, 6], [224, 96], [0.0, 0.05], [1.0, 0.14]), r"min_scales\[0\]"),
        (([2, 6], [224, 96], [0.14, 0.2], [1.0, 0.14]), "min_scale <= max_scale"),
        (([2, 6], [224, 96], [0.14, 0.05], [1.5, 0.14]), r"max_scales\[0\]"),
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


def test_blur_kernel_size_rule() -> None:
    assert blur_kernel_size(224, 2.0) == 13  # 2 * ceil(6) + 1
    assert blur_kernel_size(96, 2.0) == 13
    assert blur_kernel_size(224, 0.1) == 3
    assert blur_kernel_size(8, 2.0) == 7  # clipped to the largest odd side <= crop
    assert blur_kernel_size(3, 2.0) == 3
    assert blur_kernel_size(2, 2.0) == 1
    assert blur_kernel_size(1, 2.0) == 1


# ----------------------------------------------------------------------------------------------
# Shapes and input handling, both paths
# ----------------------------------------------------------------------------------------------

CROPS = [CropSpec(32, 0.14, 1.0), CropSpec(32, 0.14, 1.0), CropSpec(16, 0.05, 0.14), CropSpec(5, 0.05, 0.14)]


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
def test_shapes_both_paths(image: torch.Tensor) -> None:
    augment = AugmentSpec(jitter_prob=1.0, grayscale_prob=0.5, blur_prob=1.0)
    per_image = PerImageMultiCrop(CROPS, augment)(image)
    batched = batch_multicrop([image, image], CROPS, augment, generator=torch.Generator().manual_seed(0))
    assert len(per_image) == len(batched) == len(CROPS)
    for crop, one, many in zip(CROPS, per_image, batched, strict=True):
        assert one.shape == (3, crop.size, crop.size) and one.dtype == torch.float32
        assert many.shape == (2, 3, crop.size, crop.size) and many.dtype == torch.float32
        assert torch.isfinite(one).all() and torch.isfinite(many).all()


def test_batched_mixed_sizes() -> None:
    images = [smooth_image(48, 64, 0), smooth_image(10, 12, 1), smooth_image(33, 21, 2, channels=1)]
    out = batch_multicrop(images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(1))
    assert [tuple(o.shape) for o in out] == [(3, 3, c.size, c.size) for c in CROPS]


def test_gray_looking_input_stays_gray() -> None:
    image = _gray_looking(40, 40)
    augment = AugmentSpec(jitter_prob=1.0, grayscale_prob=0.0, blur_prob=1.0)
    mean = torch.tensor(augment.mean).view(-1, 1, 1)
    std = torch.tensor(augment.std).view(-1, 1, 1)
    outs = PerImageMultiCrop(CROPS, augment)(image) + [
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
        PerImageMultiCrop(CROPS, AugmentSpec())(bad)
    with pytest.raises(ValueError):
        batch_multicrop([bad], CROPS, AugmentSpec())


def test_generator_reproducible() -> None:
    images = [smooth_image(48, 64, i) for i in range(3)]
    a = batch_multicrop(images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(7))
    b = batch_multicrop(images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(7))
    c = batch_multicrop(images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


# ----------------------------------------------------------------------------------------------
# Distributions of the random parameters
# ----------------------------------------------------------------------------------------------


def _tv_boxes(h: int, w: int, scale: tuple[float, float], n: int) -> torch.Tensor:
    torch.manual_seed(1234)
    img = torch.empty(3, h, w, dtype=torch.uint8)
    ratio = (3.0 / 4.0, 4.0 / 3.0)
    return torch.tensor([T1.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


def _our_boxes(h: int, w: int, scale: tuple[float, float], n: int) -> torch.Tensor:
    hs = torch.full((n,), h, dtype=torch.int64)
    ws = torch.full((n,), w, dtype=torch.int64)
    return sample_crop_boxes(hs, ws, scale[0], scale[1], generator=torch.Generator().manual_seed(99))


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
    (params,) = sample_params(
        [(40, 50)] * n, [CropSpec(16, 0.05, 0.14)], augment, generator=torch.Generator().manual_seed(5)
    )
    for mask, p in [
        (params.flip, augment.flip_prob),
        (params.jitter, augment.jitter_prob),
        (params.grayscale, augment.grayscale_prob),
        (params.blur, augment.blur_prob),
    ]:
        assert mask.dtype == torch.bool and mask.shape == (n,)
        assert abs(mask.double().mean().item() - p) <= binomial_tol(p, n)
    # Factors: uniform over ColorJitter's ranges, sigma uniform over the blur range.
    for values, (lo, hi) in [
        (params.brightness, (1 - augment.brightness, 1 + augment.brightness)),
        (params.contrast, (1 - augment.contrast, 1 + augment.contrast)),
        (params.saturation, (1 - augment.saturation, 1 + augment.saturation)),
        (params.hue, (-augment.hue, augment.hue)),
        (params.sigma, (augment.blur_sigma_min, augment.blur_sigma_max)),
    ]:
        assert values.min() >= lo and values.max() <= hi
        assert abs(values.mean().item() - (lo + hi) / 2) <= 4 * (hi - lo) / math.sqrt(12 * n)


def test_jitter_order_uniform() -> None:
    n = 4800
    (params,) = sample_params(
        [(40, 50)] * n, [CropSpec(16, 0.05, 0.14)], AugmentSpec(), generator=torch.Generator().manual_seed(6)
    )
    order = params.jitter_order
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    perms, counts = torch.unique(order, dim=0, return_counts=True)
    assert perms.shape[0] == 24
    p = 1 / 24
    assert ((counts.double() / n - p).abs() <= binomial_tol(p, n)).all()


# ----------------------------------------------------------------------------------------------
# Op equivalence with torchvision.transforms.v2.functional
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
        (adjust_hue, TF.adjust_hue, [-0.2, 0.0, 0.2, 0.5, 0.13], 1e-4),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_jitter_ops_match_torchvision(
    ours: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    theirs: Callable[..., torch.Tensor],
    factors: list[float],
    atol: float,
) -> None:
    x = _float_batch()
    out = ours(x.clone(), torch.tensor(factors, dtype=torch.float64))
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], theirs(x[i], f), atol=atol, rtol=0)


def test_grayscale_matches_torchvision() -> None:
    x = _float_batch()
    out = rgb_to_grayscale(x).expand_as(x)
    for i in range(x.shape[0]):
        torch.testing.assert_close(
            out[i], TF.rgb_to_grayscale(x[i], num_output_channels=3), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("kernel", [13, 3, 1])
def test_blur_matches_torchvision(kernel: int) -> None:
    x = _float_batch(h=22, w=26)
    sigmas = [0.1, 0.7, 2.0, 1.3, 0.45]
    out = gaussian_blur(x, torch.tensor(sigmas), kernel)
    for i, s in enumerate(sigmas):
        torch.testing.assert_close(
            out[i], TF.gaussian_blur(x[i], [kernel, kernel], [s, s]), atol=1e-5, rtol=0
        )


def test_color_jitter_order_matches_sequential_v2() -> None:
    x = _float_batch()
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2], [3, 0, 1, 2]])
    factors = [
        torch.tensor(v, dtype=torch.float64)
        for v in (
            [1.5, 0.4, 1.2, 0.9, 1.7],
            [0.5, 1.6, 0.3, 1.1, 0.6],
            [1.8, 0.2, 0.0, 1.4, 0.9],
            [0.1, -0.2, 0.15, -0.05, 0.2],
        )
    ]
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for enabled in [(True, True, True, True), (True, False, True, False)]:
        out = color_jitter(x.clone(), order, factors, enabled)
        for i in range(x.shape[0]):
            ref = x[i]
            for op in order[i].tolist():
                if enabled[op]:
                    ref = fns[op](ref, factors[op][i].item())
            torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)


def _params(n: int, **overrides: torch.Tensor) -> CropParams:
    base: dict[str, torch.Tensor] = {
        "boxes": torch.zeros(n, 4, dtype=torch.int64),
        "flip": torch.zeros(n, dtype=torch.bool),
        "jitter": torch.zeros(n, dtype=torch.bool),
        "jitter_order": torch.arange(4).repeat(n, 1),
        "brightness": torch.ones(n, dtype=torch.float64),
        "contrast": torch.ones(n, dtype=torch.float64),
        "saturation": torch.ones(n, dtype=torch.float64),
        "hue": torch.zeros(n, dtype=torch.float64),
        "grayscale": torch.zeros(n, dtype=torch.bool),
        "blur": torch.zeros(n, dtype=torch.bool),
        "sigma": torch.ones(n, dtype=torch.float64),
    }
    base.update(overrides)
    return CropParams(**base)


def test_batch_photometric_matches_v2_pipeline() -> None:
    """Masks, per-sample order and factors reach the right samples; result equals v2 step by step."""
    x = _float_batch(n=6)
    params = _params(
        6,
        jitter=torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool),
        jitter_order=torch.tensor(
            [[3, 1, 0, 2], [0, 1, 2, 3], [0, 2, 1, 3], [2, 3, 1, 0], [1, 0, 3, 2], [1, 2, 3, 0]]
        ),
        brightness=torch.tensor([1.4, 0.5, 0.8, 1.1, 1.7, 0.3], dtype=torch.float64),
        contrast=torch.tensor([0.6, 1.2, 1.5, 0.4, 0.9, 1.8], dtype=torch.float64),
        saturation=torch.tensor([1.7, 0.2, 0.5, 1.3, 1.0, 0.0], dtype=torch.float64),
        hue=torch.tensor([0.1, -0.2, 0.05, -0.15, 0.2, 0.0], dtype=torch.float64),
        grayscale=torch.tensor([0, 1, 1, 0, 0, 1], dtype=torch.bool),
        blur=torch.tensor([1, 1, 0, 0, 1, 1], dtype=torch.bool),
        sigma=torch.tensor([0.3, 1.9, 1.0, 0.8, 1.2, 0.1], dtype=torch.float64),
    )
    augment = AugmentSpec()
    kernel = blur_kernel_size(x.shape[-1], augment.blur_sigma_max)
    out = batch_photometric(x.clone(), params, augment, kernel)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [params.brightness, params.contrast, params.saturation, params.hue]
    for i in range(6):
        ref = x[i]
        if params.jitter[i]:
            for op in params.jitter_order[i].tolist():
                ref = fns[op](ref, factors[op][i].item())
        if params.grayscale[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if params.blur[i]:
            s = params.sigma[i].item()
            ref = TF.gaussian_blur(ref, [kernel, kernel], [s, s])
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)


def test_crop_whole_image_is_identity_even_in_padded_batch() -> None:
    big, small = smooth_image(30, 40, 0), smooth_image(16, 16, 1)
    padded = stack_padded([big, small])
    params = _params(2, boxes=torch.tensor([[0, 0, 30, 40], [0, 0, 16, 16]]))
    out = batch_geometric(padded, params, 16)
    torch.testing.assert_close(out[1], TF.to_dtype(small, torch.float32, scale=True), atol=1e-6, rtol=0)
    flipped = batch_geometric(padded, _params(2, boxes=params.boxes, flip=torch.ones(2).bool()), 16)
    torch.testing.assert_close(flipped[1], out[1].flip(-1), atol=0, rtol=0)


@pytest.mark.parametrize("size", [24, 16, 7], ids=["upscale", "mixed", "downscale"])
def test_crop_matches_torchvision_resized_crop(size: int) -> None:
    """Crop + antialiased bilinear resize equals v2's resized_crop, also at the edge of a padded image."""
    big, small = smooth_image(30, 40, 0), smooth_image(16, 18, 1)
    padded = stack_padded([big, small])
    # Two crop specs' worth of boxes (crop-major): sample k comes from image k % 2.
    boxes = torch.tensor([[3, 5, 12, 10], [4, 6, 12, 12], [0, 0, 30, 40], [1, 0, 15, 18]])
    flip = torch.tensor([False, True, True, False])
    out = batch_geometric(padded, _params(4, boxes=boxes, flip=flip), size)
    for k in range(4):
        image = [big, small][k % 2]
        top, left, h, w = boxes[k].tolist()
        ref = TF.resized_crop(TF.to_dtype(image, torch.float32, scale=True), top, left, h, w, [size, size])
        if flip[k]:
            ref = TF.horizontal_flip(ref)
        torch.testing.assert_close(out[k], ref, atol=1e-5, rtol=0)


def test_apply_params_uses_given_boxes() -> None:
    image = smooth_image(16, 16, 2)
    crop = CropSpec(16, 0.5, 1.0)
    params = _params(1, boxes=torch.tensor([[0, 0, 16, 16]]))
    (out,) = apply_params([image], [crop], NO_PHOTOMETRIC, [params])
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
    params = sample_params(sizes, CROPS, augment, generator=torch.Generator().manual_seed(5))
    together = apply_params(images, CROPS, augment, params)
    for i, image in enumerate(images):
        alone = apply_params([image], CROPS, augment, [p.take(torch.tensor([i])) for p in params])
        for crop, many, one in zip(CROPS, together, alone, strict=True):
            assert many.shape == (len(images), 3, crop.size, crop.size)
            torch.testing.assert_close(many[i], one[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Both paths end to end: output pixel statistics agree (loose sanity)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", [NO_PHOTOMETRIC, AugmentSpec()], ids=["geometry-only", "paper"])
def test_output_statistics_agree(augment: AugmentSpec) -> None:
    images = [smooth_image(48, 64, 20 + i) for i in range(16)]
    crops = [CropSpec(32, 0.14, 1.0), CropSpec(16, 0.05, 0.14)]
    reps = 8
    torch.manual_seed(0)
    per_image = PerImageMultiCrop(crops, augment)
    cpu = [[per_image(im) for im in images] for _ in range(reps)]
    g = torch.Generator().manual_seed(0)
    batched = [batch_multicrop(images, crops, augment, generator=g) for _ in range(reps)]
    for c in range(len(crops)):
        a = torch.stack([out[c] for rep in cpu for out in rep])  # [reps * 16, 3, s, s]
        b = torch.cat([rep[c] for rep in batched])
        for stat in (lambda t: t.mean(dim=(1, 2, 3)), lambda t: t.std(dim=(1, 2, 3))):
            sa, sb = stat(a), stat(b)
            se = math.sqrt(sa.var().item() / sa.numel() + sb.var().item() / sb.numel())
            assert abs(sa.mean().item() - sb.mean().item()) <= 4 * se + 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    images = [smooth_image(48, 64, 0), smooth_image(10, 12, 1), smooth_image(33, 21, 2)]
    cpu = batch_multicrop(images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(3))
    cuda_images = [im.cuda() for im in images]
    gpu = batch_multicrop(cuda_images, CROPS, AugmentSpec(), generator=torch.Generator().manual_seed(3))
    for a, b in zip(cpu, gpu, strict=True):
        assert b.device.type == "cuda"
        assert (a - b.cpu()).abs().mean() < 1e-4
    dev_gen = torch.Generator(device="cuda").manual_seed(3)
    out = batch_multicrop(cuda_images, CROPS, AugmentSpec(), generator=dev_gen)
    assert all(o.device.type == "cuda" and torch.isfinite(o).all() for o in out)


# ----------------------------------------------------------------------------------------------
# The paper's recipe, as built
# ----------------------------------------------------------------------------------------------


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


def test_per_image_pipeline_is_built_from_the_papers_transforms() -> None:
    """Each crop's pipeline is, in order: RandomResizedCrop(size, its scale, ratio (3/4, 4/3),
    bilinear, antialiased), a *horizontal* flip p 0.5, then to float, ColorJitter(0.8, 0.8, 0.8, 0.2)
    with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 with sigma in (0.1, 2.0) and the crop size's
    kernel, then the normalisation."""
    from torchvision.transforms import v2

    crops = [CropSpec(16, 0.14, 1.0), CropSpec(8, 0.05, 0.14), CropSpec(16, 0.14, 1.0)]
    multicrop = PerImageMultiCrop(crops, AugmentSpec())
    assert len(multicrop._pipelines) == len(crops)
    for crop, pipeline in zip(crops, multicrop._pipelines, strict=True):
        geometric, photometric, normalize = pipeline.transforms
        resized_crop, flip = geometric.transforms
        assert type(resized_crop) is v2.RandomResizedCrop
        assert resized_crop.size == (crop.size, crop.size)
        assert resized_crop.scale == (crop.min_scale, crop.max_scale)
        assert resized_crop.ratio == pytest.approx((3 / 4, 4 / 3))
        assert resized_crop.interpolation == v2.InterpolationMode.BILINEAR and resized_crop.antialias
        assert type(flip) is v2.RandomHorizontalFlip and flip.p == 0.5

        to_float, jitter, grayscale, blur = photometric.transforms
        assert type(to_float) is v2.ToDtype and to_float.dtype == torch.float32 and to_float.scale
        assert type(jitter) is v2.RandomApply and jitter.p == 0.8
        (color,) = jitter.transforms
        assert type(color) is v2.ColorJitter
        for strength in (color.brightness, color.contrast, color.saturation):
            assert strength == pytest.approx((0.2, 1.8))
        assert color.hue == pytest.approx((-0.2, 0.2))
        assert type(grayscale) is v2.RandomGrayscale and grayscale.p == 0.2
        assert type(blur) is v2.RandomApply and blur.p == 0.5
        (gaussian,) = blur.transforms
        assert type(gaussian) is v2.GaussianBlur
        assert list(gaussian.sigma) == pytest.approx([0.1, 2.0])
        kernel = blur_kernel_size(crop.size, 2.0)
        assert tuple(gaussian.kernel_size) == (kernel, kernel)

        assert type(normalize) is v2.Normalize
        assert list(normalize.mean) == pytest.approx([0.485, 0.456, 0.406])
        assert list(normalize.std) == pytest.approx([0.228, 0.224, 0.225])
