"""``swavctl eval-linear`` (alias ``linear-eval``)."""

from __future__ import annotations

import typer

from swavctl.commands.common import fail


def eval_linear_command(ctx: typer.Context) -> None:
    """Evaluate a frozen backbone: linear protocol, fast probe, k-NN, fine-tuning (alias: linear-eval)."""
    raise fail("'swavctl eval-linear' is not yet available in this version")
