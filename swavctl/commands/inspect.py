"""``swavctl inspect-clusters`` (alias ``cluster-inspect``)."""

from __future__ import annotations

import typer

from swavctl.commands.common import fail


def inspect_clusters_command(ctx: typer.Context) -> None:
    """Prototype assignments, cluster health and browsable pictures (alias: cluster-inspect)."""
    raise fail("'swavctl inspect-clusters' is not yet available in this version")
