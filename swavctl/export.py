"""Export a model's weights to safetensors, with torchvision key names and string metadata.

The default file holds the backbone only, under torchvision's names, so for the torchvision
architectures::

    m = torchvision.models.resnet50(); m.fc = torch.nn.Identity()
    m.load_state_dict(safetensors.torch.load_file("backbone.safetensors"))   # strict

loads with nothing missing or unexpected. ``with_head=True`` adds the projection head under
``head.*`` and the prototypes under ``prototypes.weight`` (K x D, unit-norm rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from swavctl import __version__
from swavctl.config import Settings
from swavctl.model.swav import SwAV
from swavctl.safe_io import payload_sha256, write_safetensors_atomic

EXPORT_FORMAT = "swavctl-export-1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_tensors(model: SwAV, *, with_head: bool) -> dict[str, torch.Tensor]:
    """The tensors of an export: backbone (torchvision names) and optionally head and prototypes."""
    tensors = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    if with_head:
        tensors.update({f"head.{k}": v.detach().cpu() for k, v in model.head.state_dict().items()})
        tensors["prototypes.weight"] = model.prototypes.weight.detach().cpu()
    return tensors


def export_metadata(
    tensors: dict[str, torch.Tensor],
    *,
    settings: Settings,
    feature_dim: int,
    step: int | None,
    epoch: int | None,
    with_head: bool,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """String-to-string metadata: format, architecture, dimensions, normalisation, provenance, hash."""
    aug = settings.data.augment
    meta = {
        "format": EXPORT_FORMAT,
        "arch": settings.model.arch,
        "feature_dim": str(feature_dim),
        "embedding_dim": str(settings.model.embedding_dim),
        "hidden_dim": str(settings.model.hidden_dim),
        "num_prototypes": str(settings.model.prototypes),
        "contents": "backbone+head" if with_head else "backbone",
        "mean": json.dumps(list(aug.mean)),
        "std": json.dumps(list(aug.std)),
        "crop_size": str(settings.data.crop_sizes[0]),
        "swavctl_version": __version__,
        "settings": settings.model_dump_json(),
        "step": "" if step is None else str(step),
        "epoch": "" if epoch is None else str(epoch),
        "payload_sha256": payload_sha256(tensors),
    }
    meta.update(extra or {})
    return meta


def write_export(
    model: SwAV,
    path: Path,
    *,
    settings: Settings,
    step: int | None,
    epoch: int | None,
    with_head: bool,
    dtype: str = "fp32",
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``model``'s export to ``path`` atomically; returns the metadata written."""
    tensors = export_tensors(model, with_head=with_head)
    target = DTYPES[dtype]
    tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in tensors.items()}
    meta = export_metadata(
        tensors,
        settings=settings,
        feature_dim=model.feature_dim,
        step=step,
        epoch=epoch,
        with_head=with_head,
        extra={k: str(v) for k, v in (extra or {}).items()},
    )
    meta["dtype"] = dtype
    write_safetensors_atomic(path, tensors, meta)
    return meta
