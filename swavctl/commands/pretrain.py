"""``swavctl pretrain``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from swavctl.commands.common import DataOpt, GpusOpt, JsonOpt, OutOpt, SetOpt, err, fail, finish
from swavctl.errors import UserError
from swavctl.files.latest import follow

if TYPE_CHECKING:
    from swavctl.config import Settings

#: The setting each flag sets, so that a bad value is reported under the flag that was typed.
_FLAG_NAMES = {
    "data.path": "--data",
    "out": "--out",
    "method": "--method",
    "train.epochs": "--epochs",
    "train.batch_size": "--batch-size",
    "model.arch": "--arch",
    "model.init": "--init",
    "train.max_steps": "--max-steps",
    "dist.gpus": "--gpus",
    "dist.procs": "--procs",
    "monitor.knn_data": "--knn-data",
    "log.tensorboard": "--tensorboard",
}


#: The longer options, named here to keep the command's signature short.
MethodOpt = Annotated[
    str | None,
    typer.Option(
        "--method",
        help="Training method: swav (default), deepcluster-v2 or sela-v2 (see docs/methods.md).",
    ),
]
InitOpt = Annotated[
    str | None,
    typer.Option(
        "--init",
        metavar="PATH",
        help="Start from these weights (model.init): a swavctl run, checkpoint or export, an official "
        "SwAV .pth.tar, or a torchvision state dict; read when the run starts, not on resume.",
    ),
]
KnnDataOpt = Annotated[
    str | None,
    typer.Option(
        "--knn-data",
        metavar="DIR",
        help="Labelled folder (or 'demo') to report a k-NN top-1 at epoch ends (monitor.*).",
    ),
]
TensorboardOpt = Annotated[
    bool,
    typer.Option(
        "--tensorboard",
        help="Also write TensorBoard events into RUN/tb/ (log.tensorboard; needs swavctl[tensorboard]).",
    ),
]


def pretrain_command(
    data: DataOpt = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="Preset name (see 'swavctl presets list') or TOML path.")
    ] = None,
    out: OutOpt = None,
    method: MethodOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Number of epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per device.")] = None,
    arch: Annotated[
        str | None,
        typer.Option("--arch", help="Backbone architecture (default with --init: the weights' own)."),
    ] = None,
    init: InitOpt = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many steps.")] = None,
    gpus: GpusOpt = None,
    procs: Annotated[
        int | None, typer.Option("--procs", help="CPU processes with --gpus 0 (gloo on 127.0.0.1).")
    ] = None,
    knn_data: KnnDataOpt = None,
    overrides: SetOpt = None,
    tensorboard: TensorboardOpt = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain a backbone with SwAV, DeepCluster-v2 or SeLa-v2 (--method); re-running it resumes.

    Without --preset, the recipe is chosen from the data and the devices (one line says which).
    """
    # --gpus N (N > 1) starts N worker processes (NCCL), --gpus 0 --procs N as many CPU workers
    # (gloo); under torchrun or SLURM srun each process is one worker (swavctl.distributed.launch).
    flags = {
        "data.path": data,
        "out": out,
        "method": method,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "model.arch": arch,
        "model.init": init,
        "train.max_steps": max_steps,
        "dist.gpus": gpus,
        "dist.procs": procs,
        "monitor.knn_data": knn_data,
        "log.tensorboard": True if tensorboard else None,
    }
    try:
        settings, notes = _resolve(preset, flags, overrides or [])
        _check_data_folder(settings.data.path)
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    from swavctl.distributed import dist, outcomes
    from swavctl.train.job import run_pretrain

    env = dist.detect_env()
    for note in notes if env is None or env.rank == 0 else []:  # once, not once per worker
        err.print(note, markup=False)
    try:
        settings = _ready(settings, arch=arch, init=init, overrides=overrides or [])
        outcome = run_pretrain(settings, fresh=fresh)
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if outcome.status == outcomes.INTERRUPTED and outcome.report:
        # True whatever stopped it: the folder holds the last checkpoint, and the same settings
        # find it again (runs/latest, unfinished, or the same --out). --fresh would set it aside.
        again = (
            "re-run the same command without --fresh to resume"
            if fresh
            else "re-run the same command to resume"
        )
        outcome.message = f"{outcome.message}; {again}"
    finish(outcome, lambda summary: _print_summary(summary, settings=settings, as_json=as_json))


def _resolve(preset: str | None, flags: dict[str, Any], overrides: list[str]) -> tuple[Settings, list[str]]:
    """The settings from the preset (or the automatic recipe), the flags and ``--set``, with the
    lines to print; ``--out`` and ``--init`` are checked first, before torch is imported."""
    from swavctl import config
    from swavctl.errors.messages import check_output_folder

    out, init = flags["out"], flags["model.init"]
    if out is not None:
        flags["out"] = str(follow(Path(out)))  # --out runs/latest: the run folder it names
        check_output_folder(flags["out"])  # before torch is imported, as are the settings
    if init is not None:
        from swavctl.errors.messages import init_not_found
        from swavctl.weights.containers import check_model_file

        init_path = follow(Path(init).expanduser())
        if not init_path.exists():
            raise UserError(init_not_found(init))
        check_model_file(init_path)  # a malformed file is refused before torch is imported
    notes: list[str] = []
    settings = config.resolve(
        preset=preset, flags=flags, overrides=overrides, flag_names=_FLAG_NAMES, notes=notes
    )
    if preset is None and settings.data.path:
        # No preset: a recipe chosen from the data and the devices, told in one line.
        from swavctl.train.survey import auto_recipe

        recipe_flags = dict(flags)
        named = {".".join(config.parse_override(text)[0]) for text in overrides}
        if settings.model.init and flags["model.arch"] is None and "model.arch" not in named:
            from swavctl.weights.init_weights import arch_of_init

            # Built around the init weights' architecture (RN50 weights make an RN50 run).
            recipe_flags["model.arch"] = arch_of_init(settings.model.init)
        choice = auto_recipe(flags=recipe_flags, overrides=overrides, flag_names=_FLAG_NAMES)
        settings = choice.settings
        notes.extend([choice.line, *choice.warnings])
    return settings, notes


def _check_data_folder(path: str | None) -> None:
    """Refuse a missing data folder, a file, or a folder without images before torch is imported
    (the run lists the folder again when it plans its epochs). The demo folder is made on first use."""
    from swavctl.data.demo import DEMO_NAME, resolve_data_path
    from swavctl.files.image_folder import resolve_image_root

    if path and path != DEMO_NAME:
        resolve_image_root(resolve_data_path(path))


def _ready(settings: Settings, *, arch: str | None, init: str | None, overrides: list[str]) -> Settings:
    """The settings checked and completed for the run: the backbone's name, the init weights
    (``model.init``) read, the data paths anchored."""
    from swavctl import config
    from swavctl.data.demo import anchored_data_path
    from swavctl.model.backbones import check_backbone_name

    typed = arch is not None and settings.model.arch == arch  # not changed by --set
    arch_where = "--arch" if typed else "'model.arch'"
    check_backbone_name(settings.model.arch, arch_where)
    if settings.model.init:
        from swavctl.weights.init_weights import resolve_init

        named = {".".join(config.parse_override(text)[0]) for text in overrides}
        settings = resolve_init(
            settings,
            arch_where=arch_where if arch is not None or "model.arch" in named else None,
            where="--init" if init is not None and settings.model.init == init else "model.init",
            warn=lambda message: err.print(f"warning: {message}", markup=False),
        )
    return settings.model_copy(
        update={
            "data": settings.data.model_copy(update={"path": anchored_data_path(settings.data.path)}),
            "monitor": settings.monitor.model_copy(
                update={"knn_data": anchored_data_path(settings.monitor.knn_data)}
            ),
        }
    )


def _print_summary(result: dict[str, object], *, settings: Settings, as_json: bool) -> None:
    from swavctl.train.run_dir import continue_advice

    if as_json:
        print(json.dumps(result))
        return
    loss = result["final_loss"]
    loss_text = "n/a" if loss is None else f"{float(loss):.4f}"  # type: ignore[arg-type]
    knn = result.get("knn")
    knn_text = f", {knn['k']}-NN top-1 {100 * knn['top1']:.2f}%" if isinstance(knn, dict) else ""
    err.print(
        f"done: {result['steps']} steps, final loss {loss_text}{knn_text}, "
        f"{float(result['samples_per_s']):.1f} samples/s, {result['skipped_images']} skipped reads of "  # type: ignore[arg-type]
        "unreadable files\n"
        f"run folder: {result['out_dir']}\nbackbone: {result['backbone']}",
        markup=False,
    )
    total = result.get("total_steps")
    spe = result.get("steps_per_epoch")
    if isinstance(total, int) and isinstance(spe, int) and total < spe * settings.train.epochs:
        # It stopped before its last epoch (train.max_steps or train.max_seconds).
        advice = continue_advice(Path(str(result["out_dir"])), settings, dict(result))
        if advice:
            err.print(
                f"stopped at step {result['steps']} of {spe * settings.train.epochs}; {advice}", markup=False
            )
