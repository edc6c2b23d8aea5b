"""Settings from their four sources, each overriding the one before.

1. the defaults in the models (the paper's ImageNet recipe, arXiv 2006.09882);
2. a preset, ``--preset NAME|PATH`` (:mod:`swavctl.config.presets`);
3. explicit flags (``--data``, ``--epochs``, ...);
4. ``--set a.b=value`` overrides, values parsed as TOML.

A setting that does not apply to the chosen method is refused (or, from a preset without a
``method``, left out with a note).
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from swavctl.config import method_settings
from swavctl.config.presets import load_preset, preset_path
from swavctl.config.schema import RESOLVED_NAME, Settings, method_settings_in_use
from swavctl.config.tree import deep_merge, dotted, drop_path, flat_at, set_path
from swavctl.config.validation import validate
from swavctl.errors import UserError


def resolve(
    *,
    preset: str | None = None,
    base: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    flag_names: Mapping[str, str] | None = None,
    notes: list[str] | None = None,
) -> Settings:
    """Build settings from defaults, a preset, explicit flags (dotted keys) and ``--set`` overrides.

    ``base`` is a settings tree applied after the preset and before the flags: the recipe that
    ``swavctl pretrain --data DIR`` chooses without a preset (:mod:`swavctl.train.auto_recipe`).
    ``flag_names`` maps the dotted keys of ``flags`` to the flags typed (``--epochs``), which then
    name a bad value in the error. Lines worth telling the user (a preset setting not applied)
    are appended to ``notes``.

    A setting that belongs to the preset's data, the k-NN monitor's ``monitor.knn_data``, does not
    follow the preset onto other data: when the data differ from the preset's ``data.path`` and
    neither a flag nor ``--set`` names ``monitor.knn_data``, the monitor is off.

    The preset and the flags are validated as they are applied, so an error names the source
    that caused it; the ``--set`` overrides are validated together.
    """
    tree: dict[str, Any] = {}
    preset_tree: dict[str, Any] = {}
    if preset is not None:
        path = preset_path(preset)
        # A preset is a recipe, not a run folder: an ``out`` in it (an older run's resolved.toml has
        # one) is dropped, so the run goes to --out or a new folder.
        by_method: dict[str, dict[str, Any]] = {}
        preset_tree = load_preset(preset, by_method=by_method)
        preset_tree.pop("out", None)
        method = method_settings.chosen_method(
            preset_tree, flags or {}, [parse_override(t) for t in overrides]
        )
        if by_method.get(method):  # the preset's values for this method, on top of its own
            preset_tree = deep_merge(preset_tree, by_method[method])
            if notes is not None:
                values = ", ".join(f"{k}={v}" for k, v in dotted(by_method[method]).items())
                notes.append(
                    f"preset {preset}: with method '{method}', its [by_method.{method}] values: {values}"
                )
        tree = deep_merge(tree, copy.deepcopy(preset_tree))  # flags must not change preset_tree
        # A run's resolved.toml keeps naming the preset the recipe came from.
        if not isinstance(preset_tree.get("preset"), str) or path.name != RESOLVED_NAME:
            tree["preset"] = preset
    if base:
        tree = deep_merge(tree, copy.deepcopy(dict(base)))
    for key, value in (flags or {}).items():
        if value is not None:
            set_path(tree, key.split("."), value)
    parsed = [parse_override(text) for text in overrides]
    method_note = _method_sources(tree, preset_tree, preset, flags or {}, parsed, flag_names or {})
    if method_note and notes is not None:
        notes.append(method_note)
    validate(tree, source="flags", flag_names=flag_names)
    # The overrides are validated together, so several of them can change related settings at
    # once (e.g. the lengths of all four crop lists).
    for path_parts, value in parsed:
        set_path(tree, path_parts, value)
    explicit = set(explicit_keys(flags, overrides))
    note = _unbind_preset_data(tree, preset_tree, explicit, preset)
    if note and notes is not None:
        notes.append(note)
    return validate(tree, source="--set" if overrides else "settings")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as TOML, falling back to a plain string."""
    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set has an empty key in '{text}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def explicit_keys(flags: Mapping[str, Any] | None, overrides: Sequence[str]) -> frozenset[str]:
    """The dotted keys the user set: flags given a value, and every ``--set`` key."""
    keys = {key for key, value in (flags or {}).items() if value is not None}
    keys.update(".".join(parse_override(text)[0]) for text in overrides)
    return frozenset(keys)


def _method_sources(
    tree: dict[str, Any],
    preset_tree: Mapping[str, Any],
    preset: str | None,
    flags: Mapping[str, Any],
    parsed: Sequence[tuple[list[str], Any]],
    flag_names: Mapping[str, str],
) -> str | None:
    """Refuse a flag, ``--set`` or preset setting that does not apply to the chosen method.

    A flag or ``--set`` naming such a setting is refused whatever its value. A preset that names
    its ``method`` is a recipe for that method: its values (other than the defaults) that do not
    apply to the chosen method are refused too. A preset without ``method`` (``demo``, ``smoke``)
    carries settings for several methods: those that do not apply are left out, with a note (the
    returned line). ``tree`` is changed in place.
    """
    method = method_settings.chosen_method(tree, {}, parsed)  # the flags are in ``tree`` already
    if method not in method_settings.METHODS:
        return None  # refused with the nearest name by validation
    given = [(flag_names.get(k, k), {k: v}) for k, v in flags.items() if v is not None]
    given += [(f"--set {'.'.join(p)}", flat_at(p, v)) for p, v in parsed]
    for source, flat in given:
        for key, reason in method_settings_in_use(method, flat, all_keys=True).items():
            raise UserError(f"{source}: {key} does not apply to method '{method}': {reason}")
    found = method_settings_in_use(method, dotted(preset_tree))
    if not found:
        return None
    key, reason = next(iter(found.items()))
    own = preset_tree.get("method")
    if own is not None or key == "model.prototypes":
        recipe = f" (a {own} recipe)" if own else ""
        raise UserError(f"preset {preset}{recipe}: {key} does not apply to method '{method}': {reason}")
    for key in found:
        drop_path(tree, key.split("."))
    return f"preset {preset}: left out {', '.join(found)}, which method '{method}' does not use"


def _same_data(a: Any, b: Any) -> bool:
    """Whether two ``data.path`` values name the same data: ``demo`` only itself, folders by their
    absolute path (a run's ``resolved.toml`` records ``photos`` as ``/home/me/photos``)."""
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b or "demo" in (a, b):
        return False
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def _unbind_preset_data(
    tree: dict[str, Any], preset_tree: Mapping[str, Any], explicit: set[str], preset: str | None
) -> str | None:
    """Turn off a k-NN monitor that came with the preset when the run's data are not the preset's.

    Returns the line to tell the user (None when nothing changed).
    """
    preset_knn = preset_tree.get("monitor", {}).get("knn_data")
    if not preset_knn or any(key in ("monitor", "monitor.knn_data") for key in explicit):
        return None
    data = tree.get("data", {}).get("path")
    if _same_data(data, preset_tree.get("data", {}).get("path")):
        return None
    del tree["monitor"]["knn_data"]
    return (
        f"no k-NN monitor: preset {preset}'s monitor.knn_data ({preset_knn}) belongs to its data, not "
        f"to {data}; to report a k-NN top-1 on your own labelled data, pass --knn-data DIR "
        "(DIR/train + DIR/val, or DIR/<class>/*)"
    )
