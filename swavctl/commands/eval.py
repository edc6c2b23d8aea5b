"""``swavctl eval-linear`` (alias ``linear-eval``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from swavctl.commands.common import GpusOpt, JsonOpt, err, fail, finish
from swavctl.errors import UserError
from swavctl.errors.messages import DEFAULT_MODEL
from swavctl.files.latest import follow


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{name} expects comma-separated numbers, got '{text}'") from None
    if not values:
        raise UserError(f"{name} expects at least one number")
    return values


def eval_linear_command(
    model: Annotated[
        Path | None,
        typer.Argument(
            metavar="MODEL",
            help="Run folder, checkpoint (.pt) or export (.safetensors) (default: runs/latest).",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            metavar="DIR",
            help="ImageFolder with train/ and val/, or one folder (split by --val-split), or 'demo' "
            "(default: the dataset recorded in the model; a model that records none needs --data).",
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option("--mode", metavar="MODE", help="fast (default), linear, knn or finetune."),
    ] = "fast",
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", help="Output folder (default: <run folder>/eval-<mode>/)."),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            metavar="N",
            help="Epochs (default: linear 100, fast 100, finetune max(20, 200 steps)).",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", metavar="N", help="Batch size (paper: 256).")
    ] = 256,
    lr: Annotated[
        float | None,
        typer.Option("--lr", metavar="LR", help="linear: learning rate (0.3); finetune: head learning rate."),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option("--weight-decay", metavar="WD", help="linear: weight decay (1e-6); finetune: (0)."),
    ] = None,
    label_fraction: Annotated[
        float | None,
        typer.Option(
            "--label-fraction", metavar="F", help="finetune: fraction of train labels (0.01 or 0.1)."
        ),
    ] = None,
    k: Annotated[int, typer.Option("--k", metavar="K", help="knn: number of neighbours.")] = 20,
    temperature: Annotated[
        float, typer.Option("--temperature", metavar="T", help="knn: vote temperature.")
    ] = 0.07,
    aug_passes: Annotated[
        int,
        typer.Option("--aug-passes", metavar="N", help="fast: extra augmented feature passes over train."),
    ] = 0,
    holdout: Annotated[
        float,
        typer.Option("--holdout", metavar="F", help="fast: fraction of train held out to choose the probe."),
    ] = 0.2,
    standardize: Annotated[
        bool,
        typer.Option("--standardize", help="fast: standardise features first (estimates a converged probe)."),
    ] = False,
    fast_lrs: Annotated[
        str | None,
        typer.Option(
            "--fast-lrs", metavar="LR,LR,...", help="fast: comma-separated learning rates of the grid."
        ),
    ] = None,
    fast_wds: Annotated[
        str | None,
        typer.Option(
            "--fast-wds", metavar="WD,WD,...", help="fast: comma-separated weight decays of the grid."
        ),
    ] = None,
    val_split: Annotated[
        float,
        typer.Option("--val-split", metavar="F", help="Val fraction when the data has no train/ and val/."),
    ] = 0.2,
    crop_size: Annotated[
        int | None,
        typer.Option(
            "--crop-size", metavar="PX", help="Evaluation crop side (default: the pretraining crop size)."
        ),
    ] = None,
    min_scale: Annotated[
        float | None,
        typer.Option(
            "--min-scale",
            metavar="S",
            help="linear/finetune: smallest training-crop area (default: the paper's 0.08, scaled like "
            "the model's pretraining crops).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", metavar="N", help="Seed for splits, subsets, crops and initialisation.")
    ] = 0,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", metavar="N", help="Loader worker processes (default: the model's setting)."
        ),
    ] = None,
    gpus: GpusOpt = None,
    procs: Annotated[
        int, typer.Option("--procs", metavar="N", help="CPU processes with --gpus 0 (gloo on 127.0.0.1).")
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a backbone: fast probe, paper's linear protocol, k-NN, fine-tuning (alias: linear-eval)."""
    # --gpus N (N > 1) starts N worker processes, --gpus 0 --procs N as many CPU workers; they
    # share the images and rank 0 reports (swavctl.distributed.launch, swavctl.eval.sharding).
    from swavctl.errors.messages import check_output_folder
    from swavctl.weights.containers import check_model_file

    # Paths through runs/latest (a pointer file) read as the run folder it names.
    model, out = follow(model or DEFAULT_MODEL), (None if out is None else follow(out))
    try:
        # A missing or malformed MODEL is refused before torch and torchvision are imported.
        check_model_file(model)
        if out is not None:
            check_output_folder(out)
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    from swavctl.eval import fast as fast_mod
    from swavctl.eval.job import run_evaluation
    from swavctl.eval.run import EvalOptions

    try:
        options = EvalOptions(
            model=model,
            data=data,
            mode=mode,
            out=out,
            val_split=val_split,
            seed=seed,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            k=k,
            temperature=temperature,
            label_fraction=label_fraction,
            aug_passes=aug_passes,
            holdout=holdout,
            standardize=standardize,
            fast_lrs=_floats(fast_lrs, "--fast-lrs") or fast_mod.DEFAULT_LRS,
            fast_wds=_floats(fast_wds, "--fast-wds") or fast_mod.DEFAULT_WDS,
            crop_size=crop_size,
            min_scale=min_scale,
            gpus=gpus,
            procs=procs,
            workers=workers,
        )
        outcome = run_evaluation(options)
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    finish(outcome, lambda summary: _print_summary(summary, as_json=as_json))


def _print_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
    else:
        err.print(
            f"{summary['mode']}: top-1 {100 * summary['top1']:.2f}%  top-{summary['top5_k']} "
            f"{100 * summary['top5']:.2f}%  ({summary['n_val']} val images, {summary['seconds']:.1f} s)\n"
            f"wrote {summary['eval_json']} and {summary['confusion_png']}",
            markup=False,
        )
