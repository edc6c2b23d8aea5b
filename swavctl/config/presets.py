"""Presets: TOML recipes in ``presets/`` (or any TOML file), found by name, extended, validated.

A preset may ``extends`` another (its settings first, this file's on top) and record what its
recipe was tuned for (``[tuned_for]``: the global batch and the number of devices).
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from swavctl.config import method_settings
from swavctl.config.migrations import migrate
from swavctl.config.recorded import NOT_RECORDED
from swavctl.config.schema import Settings
from swavctl.config.tree import deep_merge
from swavctl.config.validation import validate
from swavctl.errors import UserError
from swavctl.files.latest import follow

PRESET_DIRS = (
    Path(__file__).resolve().parents[1] / "presets",  # installed copy (package data)
    Path(__file__).resolve().parents[2] / "presets",  # source checkout
)


def preset_names() -> list[str]:
    """Names of the presets that ship with swavctl."""
    names: set[str] = set()
    for folder in PRESET_DIRS:
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.toml"))
    return sorted(names)


def preset_path(name_or_path: str) -> Path:
    """Resolve a preset name (``demo``) or a TOML path to a file."""
    candidate = follow(Path(name_or_path).expanduser())  # runs/latest/resolved.toml too
    # A file path; a folder of the same name as a preset (a 'demo/' here) does not hide the preset.
    if candidate.suffix == ".toml" or "/" in name_or_path or candidate.is_file():
        if not candidate.is_file():
            raise UserError(f"preset file not found: {candidate}")
        return candidate
    for folder in PRESET_DIRS:
        path = folder / f"{name_or_path}.toml"
        if path.is_file():
            return path
    close = difflib.get_close_matches(name_or_path, preset_names(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; available: {', '.join(preset_names())}"
    raise UserError(f"unknown preset '{name_or_path}'{hint}")


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def preset_description(name_or_path: str) -> str:
    """The preset's one-line ``description`` (that of the preset it extends when it has none)."""
    path = preset_path(name_or_path)
    raw = load_toml(path)
    text = raw.get("description")
    if isinstance(text, str):
        return " ".join(text.split())
    base = raw.get("extends")
    return preset_description(_base_ref(base, path)) if isinstance(base, str) else ""


@dataclass(frozen=True)
class TunedFor:
    """What a recipe was tuned for: the global batch (images per step over all devices) and the
    number of devices. The learning rate, the queue and the prototype freeze of a SwAV recipe are
    tied to its global batch; they are preset metadata (``[tuned_for]``), not settings."""

    global_batch: int
    devices: int


#: The built-in defaults are the paper's 800-epoch recipe: 64 images per GPU on 64 GPUs.
DEFAULTS_TUNED_FOR = TunedFor(global_batch=4096, devices=64)


def _tuned_for(raw: Any, source: str) -> TunedFor | None:
    """A preset's ``[tuned_for]`` table (``global_batch``, ``devices``: whole numbers >= 1)."""
    if raw is None:
        return None
    fix = "'[tuned_for]' needs global_batch and devices, whole numbers >= 1"
    if not isinstance(raw, dict) or set(raw) != {"global_batch", "devices"}:
        raise UserError(f"{source}: {fix}")
    values = [raw["global_batch"], raw["devices"]]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise UserError(f"{source}: {fix}")
    return TunedFor(global_batch=values[0], devices=values[1])


def preset_tuned_for(name_or_path: str | None) -> TunedFor | None:
    """The global batch and devices a preset was tuned for (``None``: the built-in defaults').

    A preset that records no ``[tuned_for]`` has that of the preset it ``extends``; one that
    extends none is unknown (None), as is a preset file that can no longer be read.
    """
    if name_or_path is None:
        return DEFAULTS_TUNED_FOR
    try:
        path = preset_path(name_or_path)
        raw = load_toml(path)
        tuned = _tuned_for(raw.get("tuned_for"), f"preset {path.name}")
    except UserError:
        return None
    if tuned is not None:
        return tuned
    base = raw.get("extends")
    return preset_tuned_for(_base_ref(base, path)) if isinstance(base, str) else None


def _base_ref(base: str, path: Path) -> str:
    """``extends`` names a preset, or a TOML path relative to the extending file's folder."""
    if base.endswith(".toml") or "/" in base:
        return str((path.parent / Path(base).expanduser()).resolve())
    return base


def load_preset(
    name_or_path: str, _seen: tuple[Path, ...] = (), *, by_method: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A preset's settings as a validated nested mapping, with the presets it ``extends`` applied
    first (``extends = "demo"``: the demo's settings, then this file's on top).

    The ``description``, ``extends``, ``tuned_for`` and ``by_method`` keys are the preset's own
    and are not settings. ``by_method``, when given, receives the per-method tables
    (``[by_method.deepcluster-v2.swav]``, :data:`method_settings.BY_METHOD`), each validated on
    top of the preset's values.
    """
    path = preset_path(name_or_path)
    if path.resolve() in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path.resolve()))
        raise UserError(f"preset {path.name}: 'extends' goes round in a circle ({chain})")
    source = f"preset {path.name}"
    tree = migrate(load_toml(path), source=source)
    description = tree.pop("description", None)
    if description is not None and not isinstance(description, str):
        raise UserError(f"{source}: 'description' must be a string")
    _tuned_for(tree.pop("tuned_for", None), source)
    try:
        own = method_settings.split_by_method(tree)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None
    base = tree.pop("extends", None)
    inherited: dict[str, dict[str, Any]] = {}
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{source}: 'extends' must name a preset or a TOML file")
        base_tree = load_preset(_base_ref(base, path), (*_seen, path.resolve()), by_method=inherited)
        tree = deep_merge(base_tree, tree)
    validate(tree, source=source)
    for method, values in deep_merge(inherited, own).items():
        validate(deep_merge(tree, values), source=f"{source} [{method_settings.BY_METHOD}.{method}]")
        if by_method is not None:
            by_method[method] = values
    return tree


def preset_toml(settings: Settings, *, description: str = "", tuned_for: TunedFor | None = None) -> str:
    """``settings`` as a preset file that ``--preset`` reads back to the same settings: every
    setting (``None`` values, which TOML cannot write, are the defaults anyway), headed by the
    description and what the recipe was tuned for."""
    tree = settings.model_dump(mode="json", exclude_none=True, exclude=NOT_RECORDED)
    tree.pop("preset", None)  # which preset a run started from is set by --preset itself
    head: dict[str, Any] = {"description": description} if description else {}
    if tuned_for is not None:
        head["tuned_for"] = {"global_batch": tuned_for.global_batch, "devices": tuned_for.devices}
    return tomli_w.dumps({**head, **tree})
