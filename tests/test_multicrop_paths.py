"""The worker path and the device path, value for value: the same draws for the same seed, and the
same pixels up to the documented difference of their resizes.

The only difference between the paths is the resize: the worker path's torchvision uint8 kernel
rounds each of its two separable passes to whole grey levels (at most 0.5 level each) with 15-bit
fixed-point weights, where the device path keeps float32. So a crop differs by at most
``RESIZE_LEVELS`` grey levels before the photometric ops (checked below). Every later op is
shared code, and each moves a difference by at most a known factor (sup norm):

* brightness ``clamp(f x)``: ``f``;
* contrast ``f x + (1 - f) mean`` and saturation ``f x + (1 - f) luma``: ``|f| + |1 - f|``;
* hue: 3 (each linear piece of the rotation has absolute coefficients summing to at most 3,
  tests/test_multicrop.py checks the bound);
* grayscale, blur (weights >= 0, summing to 1), clamping: 1; normalisation: ``1 / std``.

So the outputs of one crop differ by at most the product of its drawn factors times
``RESIZE_LEVELS / 255 / min(std)``, plus float rounding. Where the resize is the identity (a
square image cropped whole to its own size) both paths see the same pixels, and the outputs agree
to float rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from swavctl.data.dataset import Batch, collate, pretrain_dataset, sample_seed
from swavctl.data.multicrop import (
    AugmentSpec,
    CropDraws,
    CropSpec,
    MultiCrop,
    apply_draws,
    batch_multicrop,
    draw_batch,
)
from swavctl.data.multicrop.batched import batch_geometric, stack_padded
from swavctl.data.multicrop.per_image import resized_crop
from swavctl.files.image_folder import list_images
from swavctl.train.device_batch import batch_crops
from tests.conftest import write_image_folder
from tests.multicrop_oracle import smooth_image

pytestmark = pytest.mark.usefixtures("one_thread")

#: The most the two resizes differ, in grey levels: 0.5 of rounding after each uint8 pass, plus the
#: fixed-point weights' error (below 0.03 level for up to 50 taps; 1.003 measured on noise images).
RESIZE_LEVELS = 1.05
CROPS = [CropSpec(32, 0.14, 1.0), CropSpec(32, 0.14, 1.0), CropSpec(16, 0.05, 0.14), CropSpec(5, 0.05, 0.14)]
STRONG = AugmentSpec(jitter_prob=1.0, grayscale_prob=0.3, blur_prob=0.7)
SHAPES = [(48, 64), (64, 48), (10, 12), (7, 90), (1, 1), (33, 21), (120, 90)]


def _images() -> list[torch.Tensor]:
    noise = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return [smooth_image(h, w, i, channels=1 if i == 5 else 3) for i, (h, w) in enumerate(SHAPES)] + [noise]


def _sizes(images: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(int(im.shape[-2]), int(im.shape[-1])) for im in images]


@pytest.mark.parametrize("augment", [AugmentSpec(), AugmentSpec(hue=0.0, brightness=0.0, flip_prob=0.0)])
def test_both_paths_draw_the_same_table(augment: AugmentSpec) -> None:
    """Per-image seeds (the loop's) and one generator drawn in turn give, image by image and crop
    by crop, the very boxes, flips, jitter orders and factors, grayscale, blur and sigmas."""
    images = _images()
    worker = MultiCrop(CROPS, augment)
    seeds = [sample_seed(7, 2, i) for i in range(len(images))]
    batch = draw_batch(_sizes(images), CROPS, augment, seeds=seeds)
    in_turn = draw_batch(_sizes(images), CROPS, augment, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for i, (h, w) in enumerate(_sizes(images)):
        seeded = worker.draw(h, w, torch.Generator().manual_seed(seeds[i]))
        drawn = worker.draw(h, w, g)
        for c in range(len(CROPS)):
            assert batch[c].take([i]).equals(seeded.take([c])), (i, c)
            assert in_turn[c].take([i]).equals(drawn.take([c])), (i, c)
    # The draws differ between images and crops (the comparison above can fail).
    assert not batch[0].take([0]).equals(batch[1].take([0]))
    assert not batch[0].take([0]).equals(batch[0].take([1]))


def _bound(draws: CropDraws, row: int, augment: AugmentSpec) -> float:
    """The largest output difference a resize difference of RESIZE_LEVELS can make (module docstring)."""
    gain = 1.0
    if draws.jitter[row]:
        b, c, s, h = draws.factors[row].tolist()
        gain = b * (abs(c) + abs(1 - c)) * (abs(s) + abs(1 - s)) * (3.0 if h != 0.0 else 1.0)
    return gain * RESIZE_LEVELS / 255 / min(augment.std) + 1e-5


@pytest.mark.parametrize("augment", [AugmentSpec(), STRONG], ids=["paper", "strong"])
def test_the_paths_differ_only_by_the_resize(augment: AugmentSpec) -> None:
    images = _images()
    seeds = list(range(100, 100 + len(images)))
    device = batch_multicrop(images, CROPS, augment, seeds=seeds)
    worker = MultiCrop(CROPS, augment)
    worst_geometry = 0.0
    for i, image in enumerate(images):
        draws = worker.draw(*_sizes([image])[0], torch.Generator().manual_seed(seeds[i]))
        crops = worker.apply(image, draws)
        padded = stack_padded([image.expand(3, -1, -1)])
        for c, crop in enumerate(CROPS):
            row = draws.take([c])
            geometry = batch_geometric(padded, row, crop.size)[0]
            uint8 = resized_crop(
                image.expand(3, -1, -1), draws.boxes[c].tolist(), crop.size, bool(draws.flip[c])
            )
            worst_geometry = max(worst_geometry, float((geometry - uint8).abs().max()) * 255)
            difference = float((device[c][i] - crops[c]).abs().max())
            assert difference <= _bound(draws, c, augment), (i, c, difference)
    assert worst_geometry <= RESIZE_LEVELS
    assert worst_geometry > 0.5  # the paths do resize differently (the check above is not empty)


def test_the_paths_give_the_same_pixels_where_the_resize_is_exact() -> None:
    """Square images cropped whole to their own size: the resize is the identity in both paths, so
    every shared op sees the same input, in a batch or alone; float rounding only (the batch's
    factors are float32 tensors where one image's are Python floats)."""
    size = 24
    images = [smooth_image(size, size, i) for i in range(12)]
    crops = [CropSpec(size, 1.0, 1.0)] * 3
    augment = AugmentSpec(jitter_prob=0.9, grayscale_prob=0.3, blur_prob=0.7)
    seeds = [sample_seed(1, 0, i) for i in range(len(images))]
    draws = draw_batch(_sizes(images), crops, augment, seeds=seeds)
    assert all((d.boxes == [0, 0, size, size]).all() for d in draws)  # the whole image, every time
    device = apply_draws(images, crops, augment, draws)
    worker = MultiCrop(crops, augment)
    for i, image in enumerate(images):
        alone = worker(image, generator=torch.Generator().manual_seed(seeds[i]))
        for c in range(len(crops)):
            torch.testing.assert_close(device[c][i], alone[c], atol=1e-5, rtol=0)
    applied = np.stack([d.jitter for d in draws]).mean(), np.stack([d.flip for d in draws]).mean()
    assert 0.5 < applied[0] < 1 and 0 < applied[1] < 1  # mixed rows: grouping matters


def test_the_loop_makes_the_same_crops_with_either_path(tmp_path: Path) -> None:
    """The dataset's worker items and the device hand-over (batch_crops) of the same batch: the
    same draws (seeded by (seed, epoch, index)), so the same crops up to the resize."""
    folder = write_image_folder(tmp_path / "images", classes=2, per_class=4, size=40)
    paths = list_images(folder)
    augment = AugmentSpec()
    crops = CROPS[:3]
    cpu = torch.device("cpu")
    workers = pretrain_dataset(paths, seed=5, crops=crops, augment=augment, augment_on="workers", device=cpu)
    device = pretrain_dataset(paths, seed=5, crops=crops, augment=augment, augment_on="device", device=cpu)
    indices, epoch = [6, 1, 3, 0], 3
    made_by_workers = batch_crops(
        collate([workers[epoch, i] for i in indices]), crops, augment, cpu, 5, epoch
    )
    batch = collate([device[epoch, i] for i in indices])
    assert isinstance(batch, Batch) and batch.images is not None
    made_on_device = batch_crops(batch, crops, augment, cpu, 5, epoch)
    worker = MultiCrop(crops, augment)
    for k, (index, image) in enumerate(zip(indices, batch.images, strict=True)):
        draws = worker.draw(*_sizes([image])[0], torch.Generator().manual_seed(sample_seed(5, epoch, index)))
        for c in range(len(crops)):
            difference = float((made_by_workers[c][k] - made_on_device[c][k]).abs().max())
            assert difference <= _bound(draws, c, augment), (index, c, difference)
