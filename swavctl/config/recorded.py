"""The settings a run records (``resolved.toml``, checkpoints, exports), written and read back.

What is read back is migrated (:mod:`swavctl.config.migrations`) and validated first.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import tomli_w

from swavctl.config.migrations import migrate
from swavctl.config.schema import Settings
from swavctl.config.validation import validate
from swavctl.errors import UserError

#: Settings a run does not record (in resolved.toml, checkpoints, exports): where it writes.
NOT_RECORDED = {"out"}


def recorded_json(settings: Settings) -> str:
    """The settings as JSON, as an export's metadata records them (no ``out``)."""
    return settings.model_dump_json(exclude=NOT_RECORDED)


def to_toml(settings: Settings) -> str:
    """The settings as TOML (``None`` values are omitted, as TOML has no null; ``out`` is not written)."""
    return tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True, exclude=NOT_RECORDED))


def from_toml_text(text: str, source: str) -> Settings:
    """Settings from the TOML a run wrote (``resolved.toml``, a checkpoint's), migrated and validated."""
    try:
        return read_tree(tomllib.loads(text), source=source)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML: {exc}") from None


def read_tree(tree: Mapping[str, Any], source: str) -> Settings:
    """Settings read back from a file (resolved.toml, a checkpoint, an export): migrated, validated."""
    return validate(migrate(tree, source), source=source)
