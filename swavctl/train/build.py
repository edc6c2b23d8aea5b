"""Build the pieces of a run from settings: model, optimizer and crops.

Shared by the training loop and the benchmarks, so both measure the same objects.
"""

from __future__ import annotations

import torch

from swavctl.config import Settings
from swavctl.data import multicrop
from swavctl.model.swav import SwAV
from swavctl.train.lars import LARC, parameter_groups
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
