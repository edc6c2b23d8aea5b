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
    """List the built-in presets, each with its one-line description."""
    from swavctl import config

    names = config.preset_names()
    width = max((len(name) for name in names), default=0)
    for name in names:
        print(f"{name:<{width}}  {config.preset_description(name)}".rstrip())


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name or TOML path; 'defaults' for the built-ins.")],
    as_json: JsonOpt = False,
    as_toml: Annotated[
        bool,
        typer.Option(
            "--toml",
            help="Print the preset as a TOML file to edit and pass back: swavctl pretrain --preset FILE.",
        ),
    ] = False,
) -> None:
    """Show every setting of a preset with its value and description."""
    from swavctl import config

    if as_json and as_toml:
        raise fail("give --json or --toml, not both")
    try:
        settings = config.resolve(preset=None if name == "defaults" else name)
        description = "" if name == "defaults" else config.preset_description(name)
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if as_toml:
        print(f"# swavctl preset: every setting of '{name}'. Edit, then: swavctl pretrain --preset FILE.toml")
        tuned = config.preset_tuned_for(None if name == "defaults" else name)
        print(config.preset_toml(settings, description=description, tuned_for=tuned), end="")
        return
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
