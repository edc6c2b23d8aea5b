"""``swavctl pretrain``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from swavctl.commands.common import DataOpt, GpusOpt, JsonOpt, OutOpt, SetOpt, err, fail
from swavctl.errors import UserError


def pretrain_command(
    data: DataOpt = None,
    preset: Annotated[
        str | None, typer.Option("--preset", metavar="NAME|PATH", help="Preset name (see 'swavctl presets list') or TOML path.")
    ] = None,
    out: OutOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", metavar="N", help="Number of epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", metavar="N", help="Images per device.")] = None,
    arch: Annotated[str | None, typer.Option("--arch", metavar="NAME", help="Backbone architecture.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", metavar="N", help="Stop after this many steps.")] = None,
    gpus: GpusOpt = None,
    procs: Annotated[
        int | None, typer.Option("--procs", metavar="N", help="CPU processes with --gpus 0 (gloo on 127.0.0.1).")
    ] = None,
    overrides: SetOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain a backbone with SwAV; re-running the same command resumes it."""
    from swavctl import config
    from swavctl.model.backbones import check_backbone_name
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
        check_backbone_name(settings.model.arch)
        if settings.dist.procs > 1 or (settings.dist.gpus or 0) > 1:
            raise UserError("multi-process pretraining (--gpus N > 1, --procs N > 1) is not yet available")
        summary = pretrain(settings, reporter=RichReporter(), fresh=fresh)
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
        loss = "n/a" if result["final_loss"] is None else f"{result['final_loss']:.4f}"
        err.print(
            f"done: {result['steps']} steps, final loss {loss}, "
            f"{result['samples_per_s']:.1f} samples/s, {result['skipped_images']} skipped files\n"
            f"run folder: {result['out_dir']}\nbackbone: {result['backbone']}",
            markup=False,
        )
