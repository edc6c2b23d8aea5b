"""``swavctl export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from swavctl.commands.common import JsonOpt, err, fail
from swavctl.errors import UserError


def export_command(
    model: Annotated[Path | None, typer.Argument(help="Run folder or checkpoint (default: runs/latest).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output .safetensors file.")] = None,
    with_head: Annotated[bool, typer.Option("--with-head", help="Include projection head and prototypes.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, bf16 or fp16.")] = "fp32",
    as_json: JsonOpt = False,
) -> None:
    """Export a run's weights to safetensors (backbone under torchvision's key names)."""
    from swavctl.model_io import export_run

    try:
        result = export_run(model or Path("runs/latest"), out=out, with_head=with_head, dtype=dtype)
    except UserError as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(result))
    else:
        err.print(f"wrote {result['path']} ({result['tensors']} tensors, {result['contents']})", markup=False)
