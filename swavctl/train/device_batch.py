"""The hand-over of a batch to the training device: decode (nvjpeg on a GPU), then crop there.

With ``data.augment_on = "device"`` the loader's workers only read files; the training process
decodes the batch onto the device (:func:`decode_batch`) and makes every crop of it in one
batched pass (:func:`batch_crops`). With worker augmentation the crops are simply moved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swavctl.data.dataset import Batch, Skipped, decode_images, sample_seed
from swavctl.data.multicrop import AugmentSpec, CropSpec


def batch_crops(
    batch: Batch,
    crops: Sequence[CropSpec],
    augment: AugmentSpec,
    device: torch.device,
    seed: int,
    epoch: int,
) -> list[torch.Tensor]:
    """The batch's crops on ``device``: made by the workers (moved), or made here in one batch.

    Device augmentation draws each image's crops from a generator seeded by (seed, epoch, index),
    as the workers do, so a batch's crops do not depend on when, on which thread or on which rank
    it is prepared, and equal the worker path's up to the resize's rounding.
    """
    if batch.crops is not None:
        return [c.to(device, non_blocking=True) for c in batch.crops]
    from swavctl.data.multicrop import batch_multicrop

    assert batch.images is not None
    images = [im.to(device, non_blocking=True) for im in batch.images]  # decoded by decode_batch
    seeds = [sample_seed(seed, epoch, index) for index in batch.indices]
    return batch_multicrop(images, crops, augment, seeds=seeds)


def decode_batch(batch: Batch, paths: list[str], device: torch.device) -> Batch:
    """Decode a device-augmentation batch onto ``device`` (JPEGs by nvjpeg on a GPU).

    Items no decoder can read become :class:`Skipped` records, counted like unreadable files.
    """
    assert batch.images is not None
    images, failures, cpu_decoded = decode_images(batch.images, device)
    if not failures:
        return Batch(
            crops=None, images=images, indices=batch.indices, skipped=batch.skipped, cpu_decoded=cpu_decoded
        )
    failed = {position for position, _ in failures}
    skipped = list(batch.skipped) + [Skipped(paths[batch.indices[pos]], reason) for pos, reason in failures]
    indices = [index for pos, index in enumerate(batch.indices) if pos not in failed]
    return Batch(crops=None, images=images or None, indices=indices, skipped=skipped, cpu_decoded=cpu_decoded)
