"""The hand-over of a batch to the training device: decode (nvjpeg on a GPU), then crop there.

With ``data.augment_on = "device"`` the loader's workers only read files; the training process
decodes the batch onto the device (:func:`decode_batch`) and makes every crop of it in one
batched pass (:func:`batch_crops`). With worker augmentation the crops are simply moved.
"""

from __future__ import annotations

from typing import Any

import torch

from swavctl.data.augment import AugmentSpec
from swavctl.data.dataset import Batch, Skipped, decode_images, sample_seed


def batch_crops(
    batch: Batch,
    crops: list[Any],
    augment: AugmentSpec,
    device: torch.device,
    seed: int,
    epoch: int,
    step: int,
    rank: int,
) -> list[torch.Tensor]:
    """The batch's crops on ``device``: made by the workers (moved), or made here in one batch.

    Device augmentation draws its random parameters from a generator seeded by (seed, epoch,
    step, rank), so a batch's crops do not depend on when or on which thread it is prepared.
    """
    if batch.crops is not None:
        return [c.to(device, non_blocking=True) for c in batch.crops]
    from swavctl.data.batch_augment import batch_multicrop

    assert batch.images is not None
    images = [im.to(device, non_blocking=True) for im in batch.images]  # decoded by decode_batch
    generator = torch.Generator(device="cpu").manual_seed(sample_seed(seed, epoch, step * 1_000_003 + rank))
    return batch_multicrop(images, crops, augment, generator=generator)


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
