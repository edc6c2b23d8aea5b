"""``swavctl presets list|show``."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from swavctl.commands.common import JsonOpt, fail
from swavctl.errors import UserError

presets_app = typer.Typer(help="List and show the built-in presets.", no_args_is_help=True)


@presets_app.command("list")
def presets_list() -> None:
    """List the built-in presets."""
    from swavctl import config

    for name in config.preset_names():
        print(name)


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name or TOML path; 'defaults' for the built-ins.")],
    as_json: JsonOpt = False,
) -> None:
    """Show every setting of a preset with its value and description."""
    from swavctl import config

    try:
        settings = config.resolve(preset=None if name == "defaults" else name)
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    values = config.dotted(settings.model_dump(mode="json"))
    if as_json:
        print(json.dumps(values))
        return
    table = Table(title=f"preset {name}")
    table.add_column("setting", no_wrap=True)
    table.add_column("value")
    table.add_column("description")
    for key, description, _default in config.iter_fields():
        table.add_row(key, json.dumps(values.get(key)), description)
    Console(width=160).print(table)
