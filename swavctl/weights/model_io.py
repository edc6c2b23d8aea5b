"""Load a trained model from whatever a user points at: a run folder, a checkpoint or an export.

Weights are always loaded strictly; a mismatch is a :class:`UserError` that names the missing and
unexpected keys, never a silent partial load. Pickle checkpoints are read with
``torch.load(weights_only=True)`` only; safetensors files are validated from their header before
any tensor is read, and their keys and shapes are checked against the architecture (built on the
meta device, so no memory is spent) before a model is allocated. NaN/Inf weights are refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swavctl.config import Settings, from_toml_text, read_tree
from swavctl.data.demo import DEMO_NAME
from swavctl.errors import UserError, messages
from swavctl.files import latest
from swavctl.files.atomic import file_sha256, make_parent
from swavctl.model.swav import SwAV
from swavctl.weights import checkpoint as ckpt
from swavctl.weights.containers import is_safetensors
from swavctl.weights.pickles import load_pickle_weights
from swavctl.weights.safetensors_io import (
    assert_finite,
    payload_sha256,
    read_safetensors,
    read_safetensors_metadata,
)

#: A backbone-only export still gets a (random) head built from its settings; refuse settings
#: declaring a head larger than this many elements (or 4x the backbone), which a real one never is.
_MAX_HEAD_ELEMENTS = 2**26


@dataclass
class LoadedModel:
    """A SwAV model in eval mode, with where it came from."""

    model: SwAV
    settings: Settings
    has_head: bool  # False for a backbone-only export: head and prototypes are then random
    step: int | None
    epoch: int | None
    source: Path
    kind: str  # "checkpoint" or "export"


def no_recorded_data(source: Path) -> str:
    """The error for a model that records no dataset (eval-linear and inspect-clusters say the same)."""
    return (
        f"{source} records no dataset (an imported model, or an export of one); pass --data DIR "
        f"(a labelled image folder), or --data {DEMO_NAME} for the built-in digits"
    )


def _short(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... {len(keys) - limit} more' if len(keys) > limit else ''}]"


def _check_state(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str, source: Path
) -> None:
    """Every key accounted for, every shape equal; else a UserError listing the offenders."""
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


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: Path) -> None:
    expected = module.state_dict()
    _check_state(expected, state, what, source)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def resolve_model_path(path: Path, warn: Callable[[str], None] | None = None) -> Path:
    """A run folder becomes its newest verified checkpoint (or its export).

    A newer checkpoint that does not verify (truncated, altered) is skipped, with ``warn(message)``
    naming it and why, as pretrain's resume does: the weights used are then an older step's.
    """
    path = latest.follow(Path(path).expanduser())
    if not path.exists():
        raise UserError(messages.model_not_found(path))
    if path.is_dir():
        committed = ckpt.list_committed(path / ckpt.CHECKPOINT_DIR)
        for checkpoint in reversed(committed):
            reason = ckpt.verify(checkpoint)
            if reason is None:
                return checkpoint.state_path
            if warn is not None:
                warn(f"skipping checkpoint {checkpoint.state_path}: {reason}")
        for name in ("model.safetensors", "backbone.safetensors"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path} holds no committed checkpoint and no export")
    return path


def load_model(path: Path, warn: Callable[[str], None] | None = None) -> LoadedModel:
    """Load a run folder, a checkpoint (``.pt``) or an export (``.safetensors``) into a SwAV model.

    The model is on the CPU, in fp32 and in eval mode. Exports made by ``swavctl export`` and
    official checkpoints imported with ``swavctl export --from-official`` load alike.
    """
    source = resolve_model_path(Path(path), warn)
    if source.suffix == ".json" and source.with_suffix(".pt").is_file():
        raise UserError(f"{source} is a checkpoint's manifest, not weights; pass {source.with_suffix('.pt')}")
    if is_safetensors(source):
        return _load_export(source)
    return checkpoint_model(load_pickle_weights(source), source)


def is_checkpoint(obj: Any) -> bool:
    """Whether an unpickled object is laid out as a swavctl checkpoint (``model`` and ``settings``)."""
    return isinstance(obj, dict) and "model" in obj and "settings" in obj


def checkpoint_model(state: Any, source: Path) -> LoadedModel:
    """The model of a swavctl checkpoint already read from ``source`` (with ``weights_only``).

    Its settings are migrated and validated, its weights' keys and shapes checked against them on
    the meta device before a model is allocated, and NaN/Inf refused.
    """
    if not is_checkpoint(state):
        raise UserError(
            f"{source} is not a swavctl checkpoint (no model or settings); for an official SwAV "
            "checkpoint use 'swavctl export --from-official'"
        )
    weights = state["model"]
    if (
        not isinstance(state["settings"], str)
        or not isinstance(weights, dict)
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())
    ):
        raise UserError(f"{source} is not a swavctl checkpoint (malformed model or settings)")
    settings = from_toml_text(state["settings"], source=str(source))
    assert_finite(weights, source=str(source))
    meta_model = _build(settings, meta=True, source=source)
    _check_state(meta_model.state_dict(), weights, "checkpoint", source)
    model = _build(settings, source=source)
    _strict_load(model, weights, "checkpoint", source)
    model.eval()
    step, epoch = _int_or_none(state.get("step")), _int_or_none(state.get("epoch"))
    return LoadedModel(model, settings, True, step, epoch, source, "checkpoint")


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _build(settings: Settings, *, meta: bool = False, source: Path | None = None) -> SwAV:
    """The SwAV model ``settings`` describes (on the meta device: shapes only, no memory)."""
    from swavctl.model.backbones import check_backbone_name

    try:
        check_backbone_name(settings.model.arch)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    args = (
        settings.model.arch,
        settings.model.hidden_dim,
        settings.model.embedding_dim,
        settings.model.prototypes,
    )
    if meta:
        with torch.device("meta"):
            return SwAV(*args)
    return SwAV(*args)


def _numel(state: dict[str, torch.Tensor]) -> int:
    return sum(math.prod(v.shape) for v in state.values())


def _load_export(source: Path) -> LoadedModel:
    from swavctl.weights.export import EXPORT_FORMAT, FORMAT_VERSION, HEAD_PREFIX

    tensors, meta = read_safetensors(source)
    fmt = meta.get("format", EXPORT_FORMAT)
    if fmt == f"{EXPORT_FORMAT}-1":  # written before format_version existed
        fmt, meta = EXPORT_FORMAT, {**meta, "format_version": "1"}
    if fmt != EXPORT_FORMAT:
        raise UserError(f"{source}: metadata format {fmt!r} is not {EXPORT_FORMAT!r}")
    version = meta.get("format_version", "1")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise UserError(
            f"{source}: export format version {version!r} is newer than this swavctl reads "
            f"({FORMAT_VERSION}); upgrade swavctl"
        )
    if "settings" not in meta:
        raise UserError(
            f"{source}: no swavctl settings in its metadata; import its weights (torchvision or "
            f"official SwAV key names) with "
            f"'swavctl export --from-official {source} --arch ARCH --out NEW.safetensors'"
        )
    try:
        tree = json.loads(meta["settings"])
    except (ValueError, RecursionError):
        raise UserError(f"{source}: its settings metadata is not valid JSON") from None
    if not isinstance(tree, dict):
        raise UserError(f"{source}: its settings metadata is not a JSON object")
    settings = read_tree(tree, source=f"{source} metadata")
    stated = meta.get("payload_sha256")
    if stated and payload_sha256(tensors) != stated:
        raise UserError(f"{source}: tensors do not match the metadata's payload_sha256 (altered or corrupt)")
    assert_finite(tensors, source=str(source))

    backbone = {k: v for k, v in tensors.items() if not k.startswith((HEAD_PREFIX, "prototypes."))}
    head = {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    protos = {k[len("prototypes.") :]: v for k, v in tensors.items() if k.startswith("prototypes.")}
    if not backbone:
        raise UserError(f"{source} holds no backbone weights")
    has_head = bool(head) or bool(protos)

    # Keys and shapes first, against a model on the meta device: a file whose settings declare a
    # huge model is refused before anything is allocated.
    skeleton = _build(settings, meta=True, source=source)
    _check_state(skeleton.backbone.state_dict(), backbone, "backbone", source)
    if has_head:
        _check_state(skeleton.head.state_dict(), head, "projection head", source)
        _check_state(skeleton.prototypes.state_dict(), protos, "prototypes", source)
    else:
        head_elements = _numel(skeleton.head.state_dict()) + _numel(skeleton.prototypes.state_dict())
        if head_elements > max(_MAX_HEAD_ELEMENTS, 4 * _numel(backbone)):
            raise UserError(
                f"{source}: its settings declare a head of {head_elements} elements for a backbone of "
                f"{_numel(backbone)}; refusing implausible metadata"
            )

    model = _build(settings, source=source)
    _strict_load(model.backbone, backbone, "backbone", source)
    if has_head:
        _strict_load(model.head, head, "projection head", source)
        _strict_load(model.prototypes, protos, "prototypes", source)
    model.eval()
    return LoadedModel(
        model,
        settings,
        has_head,
        _int_or_none(meta.get("step")),
        _int_or_none(meta.get("epoch")),
        source,
        "export",
    )


def run_folder(loaded: LoadedModel) -> Path:
    """The run folder a model came from, where its default outputs go.

    ``RUN`` for a checkpoint in ``RUN/checkpoints/`` (and for a run folder, which resolves to
    one); otherwise the folder holding the file (a checkpoint copied elsewhere, an export).
    """
    if loaded.kind == "checkpoint" and loaded.source.parent.name == ckpt.CHECKPOINT_DIR:
        return loaded.source.parent.parent
    return loaded.source.parent


def _check_default_target(out: Path, *, step: int | None, contents: str, dtype: str) -> None:
    """Refuse to replace, by default, an export of another model state (``--out`` says where else).

    Re-exporting the same state (the same step, contents and dtype) replaces the file; exporting
    an older checkpoint must not silently replace the run's final ``backbone.safetensors``.
    """
    if not out.exists():
        return
    try:
        meta = read_safetensors_metadata(out)
    except Exception:  # noqa: BLE001 - whatever it is, it is not ours to replace
        meta = {}
    ours = {"step": "" if step is None else str(step), "contents": contents, "dtype": dtype}
    theirs = {key: meta.get(key) for key in ours}
    if theirs != ours:
        held = ", ".join(f"{key} {value or '?'}" for key, value in theirs.items())
        wanted = ", ".join(f"{key} {value or '?'}" for key, value in ours.items())
        raise UserError(
            f"{out} already holds another export ({held}; this one: {wanted}); "
            "pass --out FILE.safetensors to write it elsewhere"
        )


def export_run(
    model_path: Path,
    *,
    out: Path | None,
    with_head: bool,
    dtype: str,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export the model at ``model_path`` (run folder, checkpoint or export) to safetensors.

    Default ``out``: ``backbone.safetensors`` (``model.safetensors`` with the head) in the run
    folder. Returns a JSON-able summary.
    """
    from swavctl.weights.export import DTYPES, write_export

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if out is not None and out.suffix != ".safetensors":
        raise UserError(f"--out should end in .safetensors, got {out}")
    loaded = load_model(model_path, warn)
    if with_head and not loaded.has_head:
        raise UserError(f"{loaded.source} has no projection head or prototypes to export")
    default_out = out is None
    if out is None:
        out = run_folder(loaded) / ("model.safetensors" if with_head else "backbone.safetensors")
    if out.exists() and out.resolve() == loaded.source.resolve():
        raise UserError(f"the export would overwrite its own source {out}; pass --out OTHER.safetensors")
    if default_out:
        contents = "backbone+head" if with_head else "backbone"
        _check_default_target(out, step=loaded.step, contents=contents, dtype=dtype)
    make_parent(out)
    extra = {"source_file": loaded.source.name, "source_sha256": file_sha256(loaded.source)}
    if loaded.kind == "export":
        # Re-exporting an export keeps where the weights came from (e.g. an official import)
        # and what is known of the head it was trained with.
        source_meta = read_safetensors_metadata(loaded.source)
        for key in ("source", "source_file", "source_sha256"):
            if source_meta.get(key):
                extra[key] = source_meta[key]
        if not loaded.has_head:
            for key in ("num_prototypes", "prototype_sets"):
                if key in source_meta:
                    extra[key] = source_meta[key]
    meta = write_export(
        loaded.model,
        out,
        settings=loaded.settings,
        step=loaded.step,
        epoch=loaded.epoch,
        with_head=with_head,
        dtype=dtype,
        extra=extra,
        source=str(loaded.source),
    )
    return {
        "path": str(out),
        "source": str(loaded.source),
        "arch": meta["arch"],
        "contents": meta["contents"],
        "dtype": dtype,
        "tensors": len(loaded.model.backbone.state_dict())
        + (len(loaded.model.head.state_dict()) + len(loaded.model.prototype_sets) if with_head else 0),
        "step": loaded.step,
        "epoch": loaded.epoch,
        "payload_sha256": meta["payload_sha256"],
    }
