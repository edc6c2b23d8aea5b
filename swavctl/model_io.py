"""Load a trained model from whatever a user points at: a run folder, a checkpoint or an export.

Weights are always loaded strictly; a mismatch is a :class:`UserError` that names the missing and
unexpected keys, never a silent partial load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swavctl.config import Settings, from_toml_text, validate
from swavctl.errors import UserError
from swavctl.model.swav import SwAV
from swavctl.train import checkpoint as ckpt


@dataclass
class LoadedModel:
    """A SwAV model in eval mode, with where it came from."""

    model: SwAV
    settings: Settings
    has_head: bool
    step: int | None
    epoch: int | None
    source: Path
    kind: str  # "checkpoint" or "export"


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source}: {what} does not match the architecture: "
            f"missing keys {_short(missing)}; unexpected keys {_short(unexpected)}"
        )
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"{source}: {what} shape mismatch for {len(wrong)} key(s), e.g. {k}: "
            f"file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        )
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def _short(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... {len(keys) - limit} more' if len(keys) > limit else ''}]"


def resolve_model_path(path: Path) -> Path:
    """A run folder becomes its newest verified checkpoint (or its backbone export)."""
    path = path.expanduser()
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if path.is_dir():
        committed = ckpt.list_committed(path / ckpt.CHECKPOINT_DIR)
        for checkpoint in reversed(committed):
            if ckpt.verify(checkpoint) is None:
                return checkpoint.state_path
        for name in ("model.safetensors", "backbone.safetensors"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path} holds no committed checkpoint and no export")
    return path


def load_model(path: Path) -> LoadedModel:
    """Load a run folder, a checkpoint (``.pt``) or an export (``.safetensors``) into a SwAV model."""
    source = resolve_model_path(path)
    if source.suffix == ".safetensors":
        return _load_export(source)
    state = ckpt.load_state(source)
    if "model" not in state or "settings" not in state:
        raise UserError(f"{source} is not a swavctl checkpoint (no model or settings)")
    settings = from_toml_text(state["settings"], source=str(source))
    model = _build(settings)
    _strict_load(model, state["model"], "checkpoint", source)
    model.eval()
    return LoadedModel(model, settings, True, int(state["step"]), int(state["epoch"]), source, "checkpoint")


def _build(settings: Settings) -> SwAV:
    return SwAV(
        settings.model.arch, settings.model.hidden_dim, settings.model.embedding_dim, settings.model.prototypes
    )


def _load_export(source: Path) -> LoadedModel:
    from swavctl.safe_io import read_safetensors

    tensors, meta = read_safetensors(source)
    if "settings" not in meta:
        raise UserError(f"{source}: no swavctl settings in its metadata; convert it with 'swavctl export'")
    try:
        settings = validate(json.loads(meta["settings"]), source=f"{source} metadata")
    except ValueError:
        raise UserError(f"{source}: its settings metadata is not valid JSON") from None
    model = _build(settings)
    backbone = {k: v for k, v in tensors.items() if not k.startswith(("head.", "prototypes."))}
    if not backbone:
        raise UserError(f"{source} holds no backbone weights")
    _strict_load(model.backbone, backbone, "backbone", source)
    head = {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
    has_head = bool(head) or "prototypes.weight" in tensors
    if has_head:
        _strict_load(model.head, head, "projection head", source)
        _strict_load(model.prototypes, {"weight": tensors["prototypes.weight"]} if "prototypes.weight" in tensors
                     else {}, "prototypes", source)
    model.eval()
    step = int(meta["step"]) if meta.get("step") else None
    epoch = int(meta["epoch"]) if meta.get("epoch") else None
    return LoadedModel(model, settings, has_head, step, epoch, source, "export")


def export_run(model_path: Path, *, out: Path | None, with_head: bool, dtype: str) -> dict[str, Any]:
    """Export the model at ``model_path`` (run folder or checkpoint) to safetensors."""
    from swavctl.export import DTYPES, write_export

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    loaded = load_model(model_path)
    if with_head and not loaded.has_head:
        raise UserError(f"{loaded.source} has no projection head or prototypes to export")
    if out is None:
        run_dir = loaded.source.parent.parent if loaded.kind == "checkpoint" else loaded.source.parent
        out = run_dir / ("model.safetensors" if with_head else "backbone.safetensors")
    if out.suffix != ".safetensors":
        raise UserError(f"--out should end in .safetensors, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = write_export(
        loaded.model,
        out,
        settings=loaded.settings,
        step=loaded.step,
        epoch=loaded.epoch,
        with_head=with_head,
        dtype=dtype,
    )
    return {
        "path": str(out),
        "source": str(loaded.source),
        "contents": meta["contents"],
        "dtype": dtype,
        "tensors": len(loaded.model.backbone.state_dict()) + (
            len(loaded.model.head.state_dict()) + 1 if with_head else 0
        ),
        "payload_sha256": meta["payload_sha256"],
    }
