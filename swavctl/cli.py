"""The ``swavctl`` command line: parse, build validated settings, call one core function, render."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from swavctl import __version__
from swavctl.errors import UserError

app = typer.Typer(
    name="swavctl",
    help="SwAV self-supervised pretraining, evaluation, cluster inspection and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
presets_app = typer.Typer(help="List and show the built-in presets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")

err = Console(stderr=True, highlight=False, soft_wrap=True)

# Reusable option declarations ------------------------------------------------------------------
DataOpt = Annotated[
    str | None, typer.Option("--data", help="Image folder (train/ is used if present), or 'demo'.")
]
OutOpt = Annotated[str | None, typer.Option("--out", help="Output folder (default: a new folder under runs/).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON summary object on stdout.")]
GpusOpt = Annotated[int | None, typer.Option("--gpus", help="GPUs to use (default: 1 if CUDA is available).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override any setting: --set a.b=value (repeatable).")
]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def version_callback(value: bool) -> None:
    if value:
        print(f"swavctl {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """SwAV self-supervised pretraining, evaluation, cluster inspection and export."""


# pretrain ----------------------------------------------------------------------------------------


@app.command(
    "pretrain",
    epilog="Every setting and its meaning: swavctl presets show NAME. Multi-process: see docs/multi-node.md.",
)
def pretrain_command(
    data: DataOpt = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="Preset name (see 'swavctl presets list') or TOML path.")
    ] = None,
    out: OutOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Number of epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per device.")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="Backbone architecture.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many steps.")] = None,
    gpus: GpusOpt = None,
    procs: Annotated[
        int | None, typer.Option("--procs", help="CPU processes with --gpus 0 (gloo on 127.0.0.1).")
    ] = None,
    overrides: SetOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain a backbone with SwAV; re-running the same command resumes it."""
    from swavctl import config
    from swavctl.progress import RichReporter
    from swavctl.train.loop import Interrupted, NonFiniteError, pretrain

    try:
        settings = config.resolve(
            preset=preset,
            flags={
                "data.path": data,
                "out": out,
                "train.epochs": epochs,
                "train.batch_size": batch_size,
                "model.arch": arch,
                "train.max_steps": max_steps,
                "dist.gpus": gpus,
                "dist.procs": procs,
            },
            overrides=overrides or [],
        )
        _check_arch(settings.model.arch)
        if settings.dist.procs > 1 or (settings.dist.gpus or 0) > 1:
            raise UserError("multi-process pretraining (--gpus N > 1, --procs N > 1) is not yet available")
        summary = pretrain(settings, reporter=RichReporter(quiet=False), fresh=fresh)
    except UserError as exc:
        raise fail(str(exc)) from None
    except Interrupted as exc:
        err.print(f"{exc}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    except NonFiniteError as exc:
        raise fail(str(exc), code=1) from None
    result = summary.as_dict()
    if as_json:
        print(json.dumps(result))
    else:
        err.print(
            f"done: {result['steps']} steps, final loss {result['final_loss']:.4f}, "
            f"{result['samples_per_s']:.1f} samples/s, {result['skipped_images']} skipped files\n"
            f"run folder: {result['out_dir']}\nbackbone: {result['backbone']}",
            markup=False,
        )


def _check_arch(arch: str) -> None:
    from swavctl.model.backbones import available_backbones

    if arch not in available_backbones():
        import difflib

        close = difflib.get_close_matches(arch, available_backbones(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (available: {', '.join(available_backbones())})"
        raise UserError(f"invalid value for 'model.arch': unknown backbone '{arch}'{hint}")


# presets -----------------------------------------------------------------------------------------


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
        raise fail(str(exc)) from None
    values = _flatten(settings.model_dump(mode="json"))
    if as_json:
        print(json.dumps(values))
        return
    table = Table(title=f"preset {name}", show_lines=False)
    table.add_column("setting")
    table.add_column("value")
    table.add_column("description")
    for key, description, _default in config.iter_fields():
        table.add_row(key, json.dumps(values.get(key)), description)
    Console(soft_wrap=False).print(table)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# commands that land with their own issues --------------------------------------------------------


def _not_yet(name: str) -> typer.Exit:
    return fail(f"'swavctl {name}' is not yet available in this version")


@app.command("eval-linear", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_linear_command(ctx: typer.Context) -> None:
    """Evaluate a frozen backbone: linear protocol, fast probe, k-NN, fine-tuning (alias: linear-eval)."""
    raise _not_yet("eval-linear")


@app.command(
    "linear-eval", hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def linear_eval_alias(ctx: typer.Context) -> None:
    """Alias of eval-linear."""
    raise _not_yet("eval-linear")


@app.command("inspect-clusters", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def inspect_clusters_command(ctx: typer.Context) -> None:
    """Prototype assignments, cluster health and browsable pictures (alias: cluster-inspect)."""
    raise _not_yet("inspect-clusters")


@app.command(
    "cluster-inspect", hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def cluster_inspect_alias(ctx: typer.Context) -> None:
    """Alias of inspect-clusters."""
    raise _not_yet("inspect-clusters")


@app.command("export")
def export_command(
    model: Annotated[
        Path | None, typer.Argument(help="Run folder or checkpoint (default: runs/latest).")
    ] = None,
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


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
