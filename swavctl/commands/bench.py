"""``swavctl bench data|step``: is my loader the bottleneck, and how many workers do I need?"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from swavctl.commands.common import DataOpt, GpusOpt, JsonOpt, SetOpt, err, fail
from swavctl.errors import UserError
from swavctl.errors.messages import check_trainable_prototypes

bench_app = typer.Typer(
    help="Measure the pretrain loader and the training step separately (samples/s).", no_args_is_help=True
)

PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset", metavar="NAME|PATH", help="Preset name (see 'swavctl presets list') or TOML path."
    ),
]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", metavar="N", help="Images per device.")]
ArchOpt = Annotated[str | None, typer.Option("--arch", metavar="NAME", help="Backbone architecture.")]


def _settings(preset: str | None, flags: dict[str, Any], overrides: list[str] | None) -> Any:
    from swavctl import config
    from swavctl.model.backbones import check_backbone_name

    settings = config.resolve(preset=preset, flags=flags, overrides=overrides or [])
    check_backbone_name(settings.model.arch)
    return settings


def _worker_counts(text: str | None) -> list[int]:
    if text is None:
        return []
    try:
        counts = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UserError(f"--workers expects comma-separated integers like 0,2,4, got '{text}'") from None
    if not counts or any(c < 0 for c in counts):
        raise UserError(f"--workers expects non-negative integers, got '{text}'")
    return counts


@bench_app.command("data")
def bench_data_command(
    data: DataOpt = None,
    preset: PresetOpt = None,
    workers: Annotated[
        str | None,
        typer.Option(
            "--workers",
            metavar="N,N,...",
            help="Worker counts to try, comma-separated (default: data.workers).",
        ),
    ] = None,
    batches: Annotated[
        int, typer.Option("--batches", metavar="N", help="Batches timed per worker count.")
    ] = 20,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", help="Batches before timing starts.")] = 2,
    max_seconds: Annotated[
        float | None,
        typer.Option("--max-seconds", metavar="S", help="Stop timing a worker count after this long."),
    ] = None,
    decode_in_workers: Annotated[
        bool,
        typer.Option(
            "--decode-in-workers", help="With data.augment_on=device on a GPU: decode JPEGs in the workers."
        ),
    ] = False,
    batch_size: BatchOpt = None,
    gpus: GpusOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure the pretrain loader alone (multi-crop samples/s) and report the number of workers needed."""
    from swavctl.bench.data import ENOUGH, bench_data
    from swavctl.reporting.progress import RichReporter

    try:
        counts = _worker_counts(workers)
        settings = _settings(
            preset, {"data.path": data, "train.batch_size": batch_size, "dist.gpus": gpus}, overrides
        )
        result = bench_data(
            settings,
            workers=counts,
            batches=batches,
            warmup=warmup,
            max_seconds=max_seconds,
            decode_in_workers=decode_in_workers,
            reporter=RichReporter(),
        )
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if as_json:
        print(json.dumps(result.as_dict()))
    else:
        err.print(
            f"best: {result.best_workers} workers, {result.best_samples_per_s:.1f} samples/s "
            f"({result.crops} crops, batch {result.batch_size}, augment on {result.augment_on}, "
            f"decode in {result.decode}, "
            f"device {result.device}; the fewest workers within {1 - ENOUGH:.0%} of the fastest)",
            markup=False,
        )


@bench_app.command("step")
def bench_step_command(
    preset: PresetOpt = None,
    steps: Annotated[int, typer.Option("--steps", metavar="N", help="Steps timed.")] = 10,
    warmup: Annotated[
        int, typer.Option("--warmup", metavar="N", help="Untimed steps first (compilation, caches).")
    ] = 2,
    max_seconds: Annotated[
        float | None, typer.Option("--max-seconds", metavar="S", help="Stop timing after this long.")
    ] = None,
    batch_size: BatchOpt = None,
    arch: ArchOpt = None,
    gpus: GpusOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure training steps alone on synthetic crops: forward/backward and Sinkhorn + loss separately."""
    from swavctl.bench.step import bench_step

    try:
        settings = _settings(
            preset, {"train.batch_size": batch_size, "model.arch": arch, "dist.gpus": gpus}, overrides
        )
        check_trainable_prototypes("swav", settings.model.prototypes)  # the step is SwAV's: one set
        result = bench_step(settings, steps=steps, warmup=warmup, max_seconds=max_seconds)
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if as_json:
        print(json.dumps(result.as_dict()))
    else:
        mfu = f", MFU {result.mfu:.1%} of {result.peak_tflops:.0f} TFLOP/s" if result.mfu is not None else ""
        err.print(
            f"{result.arch} {result.crops} batch {result.batch_size} on {result.device} ({result.precision}"
            f"{', channels_last' if result.channels_last else ''}{', compiled' if result.compile else ''}): "
            f"{result.samples_per_s:.1f} samples/s{mfu}\n"
            f"  step {result.step_ms:.1f} ms = forward/backward/optimizer "
            f"{result.forward_backward_ms:.1f} ms "
            f"({result.forward_backward_samples_per_s:.1f} samples/s) + Sinkhorn and loss "
            f"{result.sinkhorn_loss_ms:.1f} ms ({result.sinkhorn_loss_samples_per_s:.1f} samples/s)"
            + (f", with a full queue of {result.queue_rows} rows" if result.queue_rows else ""),
            markup=False,
        )
