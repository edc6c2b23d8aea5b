"""Build the pieces of a run from settings: model, optimizer, crops and augmentation.

Shared by the training loop and the benchmarks, so both measure the same objects.
"""

from __future__ import annotations

import torch

from swavctl.config import AugmentSettings, Settings
from swavctl.data.augment import AugmentSpec, CropSpec, expand_crops
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


def crop_specs(settings: Settings) -> list[CropSpec]:
    """One :class:`CropSpec` per crop, high resolution first."""
    data = settings.data
    return expand_crops(data.crop_counts, data.crop_sizes, data.min_scales, data.max_scales)


def augment_spec(aug: AugmentSettings) -> AugmentSpec:
    """The :class:`AugmentSpec` of ``data.augment``."""
    return AugmentSpec(
        flip_prob=aug.flip_prob,
        jitter_prob=aug.jitter_prob,
        brightness=aug.brightness,
        contrast=aug.contrast,
        saturation=aug.saturation,
        hue=aug.hue,
        grayscale_prob=aug.grayscale_prob,
        blur_prob=aug.blur_prob,
        blur_sigma_min=aug.blur_sigma_min,
        blur_sigma_max=aug.blur_sigma_max,
        mean=aug.mean,
        std=aug.std,
    )
