"""Settings written by an older swavctl, brought to the current schema version one step at a time.

Every file that holds settings (``resolved.toml``, checkpoints, exports, presets) is read through
:func:`migrate`: ``MIGRATIONS[v]`` brings a tree of version ``v`` to ``v + 1``, so a run or an
export made before a settings change still resumes and loads (``tests/fixtures/schema0``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from swavctl.config.schema import SCHEMA_VERSION
from swavctl.errors import UserError


def _v0_to_v1(tree: dict[str, Any]) -> dict[str, Any]:
    """v0 (no ``schema_version``; swavctl 0.1.0 up to commit 5ec31d5) to v1.

    v0 recorded the run folder, ``out``, in ``resolved.toml``, checkpoints and exports, so a
    ``resolved.toml`` passed to ``--preset`` resumed the old run instead of starting a new one. v1
    records no folder: ``out`` is dropped. Nothing else changed.
    """
    tree.pop("out", None)
    return tree


#: ``MIGRATIONS[v]`` brings a tree of version ``v`` to ``v + 1``. A migration touches only the keys
#: it is about, so a file without a version that already uses the new layout (a preset written by
#: hand) passes through unchanged.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1}


def migrate(tree: Mapping[str, Any], source: str = "settings") -> dict[str, Any]:
    """A settings tree of any older schema version (none = 0) brought to :data:`SCHEMA_VERSION`.

    Raises a one-line :class:`UserError` for a version this swavctl does not know (a newer one).
    """
    version = tree.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise UserError(f"{source}: schema_version must be a whole number, got {version!r}")
    if version > SCHEMA_VERSION:
        from swavctl import __version__

        raise UserError(
            f"{source}: settings schema version {version} is newer than this swavctl {__version__} "
            f"reads (up to {SCHEMA_VERSION}); use the swavctl that wrote it, or a newer one"
        )
    migrated = {k: v for k, v in tree.items() if k != "schema_version"}
    for step in range(version, SCHEMA_VERSION):
        migrated = MIGRATIONS[step](migrated)
    migrated["schema_version"] = SCHEMA_VERSION
    return migrated
