"""Build the pieces of a run from settings: model, optimizer and crops.

Shared by the training loop and the benchmarks, so both measure the same objects. Devices,
synchronised batch norm, DDP and compilation are applied here, at the edge: the model itself
knows nothing of them.
"""

from __future__ import annotations

import torch
from torch import nn

from swavctl.config import Settings
from swavctl.data import multicrop
from swavctl.distributed import dist
from swavctl.distributed.sync_batchnorm import convert_sync_batchnorm
from swavctl.model.swav import SwAV
from swavctl.train.larc import LARC, parameter_groups
from swavctl.train.precision import keep_scores_fp32


def build_model(settings: Settings) -> SwAV:
    """The SwAV model of ``settings``, initialised from ``train.seed``, for training: its prototype
    scores stay float32 under autocast (:mod:`swavctl.train.precision`)."""
    torch.manual_seed(settings.train.seed)
    model = SwAV(
        settings.model.arch,
        settings.model.hidden_dim,
        settings.model.embedding_dim,
        settings.model.prototypes,
    )
    return keep_scores_fp32(model)


def build_model_on(settings: Settings, device: torch.device) -> SwAV:
    """:func:`build_model` on ``device``, with synchronised batch norm across ranks when asked and
    the ``train.channels_last`` memory layout."""
    model = build_model(settings)
    bn_group = settings.dist.sync_batchnorm_group
    # A group of 1 is plain BatchNorm.
    if dist.world_size() > 1 and settings.dist.sync_batchnorm and bn_group != 1:
        model = convert_sync_batchnorm(  # type: ignore[assignment]
            model, device_type=device.type, process_group=dist.subgroups(bn_group)
        )
    model.to(device)
    # On the CPU too: NCHW max pooling with indices was 21x slower than NHWC (convnet-tiny, 16 px),
    # and a ResNet-50 step 1.2x slower.
    if settings.train.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def wrap_for_training(model: SwAV, settings: Settings, device: torch.device) -> nn.Module:
    """The module a step calls: ``model`` in DDP across ranks, compiled when ``train.compile``.

    Only the model is wrapped: the objective's memory (SwAV's queue) is per rank and must stay
    outside DDP, whose buffer broadcast would give every rank rank 0's.
    """
    wrapped: nn.Module = model
    if dist.world_size() > 1:
        # Prototype freezing drops the prototypes' gradients *after* backward (they are still
        # used in forward), so DDP never needs find_unused_parameters.
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if settings.train.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return wrapped


def build_optimizer(model: torch.nn.Module, settings: Settings) -> LARC:
    """SGD with momentum wrapped in LARC (``.optim`` is the SGD); plain SGD when ``optim.lars`` is off."""
    sgd = torch.optim.SGD(
        parameter_groups(
            model,
            weight_decay=settings.optim.weight_decay,
            exclude_bias_norm=settings.optim.lars_exclude_bias_norm,
        ),
        lr=settings.optim.base_lr,
        momentum=settings.optim.momentum,
    )
    return LARC(
        sgd,
        trust_coefficient=settings.optim.lars_trust,
        clip=settings.optim.lars_clip,
        enabled=settings.optim.lars,
    )


def crop_specs(settings: Settings) -> list[multicrop.CropSpec]:
    """One :class:`~swavctl.data.multicrop.CropSpec` per crop, high resolution first. (The
    augmentation's spec is ``settings.data.augment`` itself.)"""
    return multicrop.crop_specs(settings.data)
