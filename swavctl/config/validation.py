"""Validating a settings tree into :class:`~swavctl.config.schema.Settings`, with one-line errors.

A typo anywhere, nested keys included, is refused with the dotted path and the nearest valid key;
a bad value that came from a flag is reported under that flag. Also the field catalogue (for
``--help`` and ``presets show``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from swavctl.config.schema import Settings
from swavctl.errors import UserError


def validate(
    tree: Mapping[str, Any], source: str = "settings", flag_names: Mapping[str, str] | None = None
) -> Settings:
    """Validate a nested mapping into :class:`Settings`, or raise a one-line :class:`UserError`.

    ``flag_names`` maps dotted keys to the flags that set them (``train.epochs`` -> ``--epochs``),
    so that a bad value is reported under the flag the user typed.
    """
    try:
        return Settings.model_validate(dict(tree))
    except ValidationError as exc:
        raise UserError(_format_error(exc, source, flag_names)) from None


def _valid_keys(model: type[BaseModel], path: Sequence[str]) -> list[str]:
    current: type[BaseModel] = model
    for part in path:
        field = current.model_fields.get(part)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        current = field.annotation
    return list(current.model_fields)


def iter_fields(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """Yield (dotted key, description, default) for every leaf setting."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        key = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_fields(annotation, key + ".")
        else:
            default = field.get_default(call_default_factory=True)
            yield key, field.description or "", default


def _format_error(error: ValidationError, source: str, flag_names: Mapping[str, str] | None = None) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"] if not isinstance(p, int)]
    dotted = ".".join(loc) or "(root)"
    flag = (flag_names or {}).get(dotted)
    if flag is not None and first["type"] != "extra_forbidden":
        # A value the user typed as a flag is reported under that flag, not the setting's key.
        message = f"invalid value for {flag}: {first['msg']}"
        if "input" in first and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
        return message
    if first["type"] == "extra_forbidden":
        candidates = _valid_keys(Settings, loc[:-1])
        close = difflib.get_close_matches(loc[-1], candidates, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join([*loc[:-1], close[0]])}'?" if close else ""
        if not close and candidates:
            hint = f"; valid keys here: {', '.join(candidates)}"
        message = f"unknown setting '{dotted}'{hint}"
    else:
        message = f"invalid value for '{dotted}': {first['msg']}"
        if "input" in first and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
    more = len(error.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return f"{source}: {message}"
