"""``swavctl eval-linear`` (alias ``linear-eval``): its options are the fields of
:class:`swavctl.eval.options.EvalOptions`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from swavctl.commands.common import GpusOpt, JsonOpt, err, fail, finish
from swavctl.commands.from_options import Flag, given, parameter, takes_options
from swavctl.errors import UserError
from swavctl.errors.messages import DEFAULT_MODEL
from swavctl.eval.options import EvalOptions
from swavctl.files.latest import follow

#: How each option is spelled, in the order of ``--help``.
FLAGS = {
    "model": Flag(metavar="MODEL", unset_is_none=True),
    "data": Flag("--data", "DIR"),
    "mode": Flag("--mode", "MODE"),
    "out": Flag("--out", "DIR"),
    "epochs": Flag("--epochs", "N"),
    "batch_size": Flag("--batch-size", "N"),
    "lr": Flag("--lr", "LR"),
    "weight_decay": Flag("--weight-decay", "WD"),
    "label_fraction": Flag("--label-fraction", "F"),
    "k": Flag("--k", "K"),
    "temperature": Flag("--temperature", "T"),
    "aug_passes": Flag("--aug-passes", "N"),
    "holdout": Flag("--holdout", "F"),
    "standardize": Flag("--standardize"),
    "fast_lrs": Flag("--fast-lrs", "LR,LR,...", as_text=True),
    "fast_wds": Flag("--fast-wds", "WD,WD,...", as_text=True),
    "val_split": Flag("--val-split", "F"),
    "crop_size": Flag("--crop-size", "PX"),
    "min_scale": Flag("--min-scale", "S"),
    "seed": Flag("--seed", "N"),
    "workers": Flag("--workers", "N"),
    "gpus": Flag(alias=GpusOpt),
    "procs": Flag("--procs", "N"),
}


@takes_options(EvalOptions, FLAGS, extra=[parameter("as_json", JsonOpt, False)])
def eval_linear_command(**values: Any) -> None:
    """Evaluate a backbone: fast probe, paper's linear protocol, k-NN, fine-tuning (alias: linear-eval)."""
    # --gpus N (N > 1) starts N worker processes, --gpus 0 --procs N as many CPU workers; they
    # share the images and rank 0 reports (swavctl.distributed.launch, swavctl.eval.sharding).
    from swavctl.errors.messages import check_output_folder
    from swavctl.weights.containers import check_model_file

    # Paths through runs/latest (a pointer file) read as the run folder it names.
    model: Path = follow(values["model"] or DEFAULT_MODEL)
    out: Path | None = None if values["out"] is None else follow(values["out"])
    try:
        # A missing or malformed MODEL is refused before torch and torchvision are imported.
        check_model_file(model)
        if out is not None:
            check_output_folder(out)
        options = EvalOptions(**{**given(values, FLAGS), "model": model, "out": out})
        from swavctl.eval.job import run_evaluation

        outcome = run_evaluation(options)
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    finish(outcome, lambda summary: _print_summary(summary, as_json=values["as_json"]))


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
