"""One evaluation from start to end: load the model, find the labelled data, run a mode, report.

Modes (see ``docs/eval.md``), each in the module named for it and found by name in
:data:`swavctl.eval.modes.REGISTRY`:

- ``linear``: the paper's linear protocol (:mod:`swavctl.eval.linear`);
- ``fast``: a grid of linear probes on cached features, chosen on a held-out part of train
  (:mod:`swavctl.eval.fast`);
- ``knn``: DINO's weighted k-NN (:mod:`swavctl.eval.knn`);
- ``finetune``: the paper's semi-supervised fine-tuning on 1% / 10% of the labels
  (:mod:`swavctl.eval.finetune`).

Writes ``OUT/eval.json`` and ``OUT/confusion.png`` and returns a short summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from swavctl.config import RESOLVED_NAME as RESOLVED_FILE
from swavctl.data.demo import resolve_data_path
from swavctl.distributed import dist
from swavctl.distributed.device import pick_devices
from swavctl.errors import UserError, messages
from swavctl.eval.context import EvalContext, ModeResult
from swavctl.eval.dataset import ImageCache, should_cache
from swavctl.eval.metrics import Accuracy, accuracy
from swavctl.eval.modes import REGISTRY
from swavctl.eval.options import EvalOptions
from swavctl.eval.report import (
    CONFUSION_PNG,
    EVAL_JSON,
    PREDICTIONS_CSV,
    write_confusion_png,
    write_predictions_csv,
)
from swavctl.eval.splits import NoClassesError, discover
from swavctl.eval.views import Geometry, Normalizer, geometry_for
from swavctl.files.atomic import file_sha256, write_json_atomic
from swavctl.reporting import tensorboard_log
from swavctl.reporting.progress import QuietStages, StageReporter
from swavctl.weights.model_io import LoadedModel, load_model, no_recorded_data, run_folder

__all__ = ["EvalOptions", "data_root", "run_eval"]

#: The keys of ``eval.json`` that the summary repeats.
_SUMMARY_KEYS = (
    "mode",
    "top1",
    "top5",
    "top5_k",
    "n_train",
    "n_val",
    "num_classes",
    "out",
    "eval_json",
    "confusion_png",
)


def data_root(options: EvalOptions, loaded: LoadedModel, reporter: StageReporter) -> Path:
    """``--data``, else the dataset recorded in the model's settings; never a guess.

    A model that records none (an imported official one, an export of one) is refused: scoring it
    on data it was not meant for (the demo digits, once) gives a number that means nothing. The
    digits are used only when asked for, with ``--data demo``.
    """
    if options.data is not None:
        return resolve_data_path(options.data)
    recorded = loaded.settings.data.path
    if not recorded:
        raise UserError(no_recorded_data(loaded.source))
    root = resolve_data_path(recorded)
    if not root.exists():
        raise UserError(f"the model's recorded dataset {recorded} does not exist here; pass --data DIR")
    # Pretraining on DIR uses DIR/train when present; evaluation wants DIR itself (train/ and val/).
    if root.name == "train" and (root.parent / "val").is_dir():
        root = root.parent
    return root


def run_eval(
    options: EvalOptions, reporter: StageReporter | None = None, *, device: torch.device | None = None
) -> dict[str, Any]:
    """Run one evaluation in this process; returns the summary (the full record is in ``OUT/eval.json``).

    Under a process group (a worker of ``--gpus N`` / ``--procs N``, torchrun or srun) the ranks
    share the work (:mod:`swavctl.eval.sharding`) on ``device``; rank 0 writes the outputs and
    returns the summary, the other ranks return an empty dict. Multi-process evaluations are
    started by :func:`swavctl.eval.job.run_evaluation`.
    """
    main = dist.is_main()
    report: StageReporter = (reporter or QuietStages()) if main else QuietStages()
    started = time.perf_counter()
    device = device or pick_devices(options.gpus)[0]
    torch.manual_seed(options.seed)
    ctx = _context(options, device, report)
    loaded, split = ctx.loaded, ctx.split
    out = _output_folder(options, loaded)
    geometry = geometry_for(loaded.settings, options.crop_size, options.min_scale)
    report.info(
        f"{options.mode}: {loaded.settings.model.arch} ({loaded.kind} {loaded.source}) on {split.root} "
        f"[{split.layout}]: {len(split.train)} train / {len(split.val)} val images, "
        f"{split.num_classes} classes, "
        f"{geometry.crop} px views (resize {geometry.resize}), device {device}"
    )
    result = REGISTRY[options.mode](ctx, out)
    if result is None or not main:
        return {}
    return _write_results(ctx, out, result, geometry, started)


def _context(options: EvalOptions, device: torch.device, report: StageReporter) -> EvalContext:
    """Load the model onto ``device`` and find the labelled split."""
    model_path = options.model.expanduser()
    if not model_path.exists():
        raise UserError(messages.model_not_found(model_path))
    loaded = load_model(model_path, warn=report.warn)
    # channels_last (NHWC): faster convolutions and pooling on GPUs and CPUs alike (see train.channels_last).
    loaded.model.backbone.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    root = data_root(options, loaded, report)
    try:
        split = discover(root, val_split=options.val_split, seed=options.seed)
    except NoClassesError as exc:
        if options.data is not None:
            raise
        # The folder came from the model: say where it came from and how to give labelled images.
        raise UserError(
            f"{exc}; it is the folder the model was pretrained on, and evaluation needs labels:"
            " give a labelled folder with --data DIR"
        ) from None
    for note in split.notes:
        report.warn(note)
    cache = ImageCache() if should_cache([*split.train, *split.val]) else None
    return EvalContext(
        options=options,
        loaded=loaded,
        split=split,
        device=device,
        normalize=Normalizer(loaded.settings.data.augment.mean, loaded.settings.data.augment.std),
        workers=options.workers if options.workers is not None else loaded.settings.data.workers,
        reporter=report,
        cache=cache,
    )


def _output_folder(options: EvalOptions, loaded: LoadedModel) -> Path:
    """``--out`` or ``<run folder>/eval-<mode>``, created, without a stale ``eval.json``."""
    out = options.out or run_folder(loaded) / f"eval-{options.mode}"
    if out.is_file():
        raise UserError(messages.output_is_file(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            (out / EVAL_JSON).unlink(missing_ok=True)  # written last: the folder's commit marker
    except OSError as exc:
        raise UserError(messages.output_not_writable(out, exc.strerror or exc)) from None
    return out


def _write_results(
    ctx: EvalContext, out: Path, result: ModeResult, geometry: Geometry, started: float
) -> dict[str, Any]:
    """Rank 0: score the mode's result, write the picture, the predictions and ``eval.json`` (last),
    add to the run's TensorBoard events; returns the summary."""
    options, loaded, split = ctx.options, ctx.loaded, ctx.split
    scores, val_labels, val_indices, n_train, extra = result
    extra_summary = extra.pop("summary", {})
    acc = accuracy(scores, val_labels, split.num_classes)
    total = time.perf_counter() - started
    ctx.timings["total"] = total
    sha = file_sha256(loaded.source)
    title = f"{options.mode}: top-1 {100 * acc.top1:.2f}% on {acc.n} val images ({loaded.source.name})"
    write_confusion_png(out / CONFUSION_PNG, acc.confusion, split.classes, title)
    write_predictions_csv(
        out / PREDICTIONS_CSV,
        [split.val[int(i)].path for i in val_indices],
        [split.classes[int(y)] for y in val_labels.cpu()],
        scores.cpu(),
        split.classes,
    )
    record = {**_record(ctx, out, acc, n_train, geometry, sha), **extra}
    write_json_atomic(out / EVAL_JSON, record)
    summary = {k: record[k] for k in _SUMMARY_KEYS}
    summary["seconds"] = round(total, 3)
    summary["model"] = str(loaded.source.resolve())
    summary["model_sha256"] = sha
    summary.update(extra_summary)
    tensorboard_dir = _add_to_tensorboard(loaded, options.mode, acc.top1, acc.top5, ctx.reporter)
    if tensorboard_dir is not None:
        summary["tensorboard"] = str(tensorboard_dir)
    return summary


def _record(
    ctx: EvalContext, out: Path, acc: Accuracy, n_train: int, geometry: Geometry, sha: str
) -> dict[str, Any]:
    """The fields of ``eval.json`` that every mode has (the mode adds its own)."""
    options, loaded, split = ctx.options, ctx.loaded, ctx.split
    return {
        "mode": options.mode,
        "top1": acc.top1,
        "top5": acc.top5,
        "top5_k": acc.top5_k,
        "n_train": n_train,
        "n_val": acc.n,
        "n_images": {
            "train": len(split.train),
            "val": len(split.val),
            "train_used": n_train,
            "val_scored": acc.n,
        },
        "num_classes": split.num_classes,
        "classes": split.classes,
        "per_class_accuracy": {name: acc.per_class[i] for i, name in enumerate(split.classes)},
        "confusion": acc.confusion.tolist(),
        "model": {
            "path": str(loaded.source.resolve()),  # not through the moving runs/latest link
            "kind": loaded.kind,
            "sha256": sha,
            "arch": loaded.settings.model.arch,
            "feature_dim": loaded.model.feature_dim,
            "step": loaded.step,
            "epoch": loaded.epoch,
        },
        "data": {"root": str(split.root), "layout": split.layout, "notes": split.notes},
        "settings": {
            **options.model_dump(mode="json"),
            "epochs": options.resolved_epochs,
            "geometry": geometry.as_dict(),
            "normalize": {"mean": list(ctx.normalize.mean), "std": list(ctx.normalize.std)},
            "device": str(ctx.device),
            "world_size": dist.world_size(),
            "threads_per_process": torch.get_num_threads(),
            "workers": ctx.workers,
        },
        "model_settings": loaded.settings.model_dump(mode="json"),
        "seconds": ctx.timings,
        "out": str(out),
        "eval_json": str(out / EVAL_JSON),
        "confusion_png": str(out / CONFUSION_PNG),
        "predictions_csv": str(out / PREDICTIONS_CSV),
    }


def _add_to_tensorboard(
    loaded: LoadedModel, mode: str, top1: float, top5: float, report: StageReporter
) -> Path | None:
    """Add top-1/top-5 to the model's run's TensorBoard events (``RUN/tb``) at the model's step,
    when that run was trained with ``log.tensorboard``; returns the event folder, or None."""
    if not loaded.settings.log.tensorboard:
        return None
    folder = run_folder(loaded)
    if not (folder / RESOLVED_FILE).is_file():  # a checkpoint or export copied out of its run
        return None
    if not tensorboard_log.available():
        report.warn(
            f"the run logs to TensorBoard but tensorboard is not installed: {tensorboard_log.INSTALL_HINT}"
        )
        return None
    step = loaded.step if loaded.step is not None else 0
    return tensorboard_log.add_eval(folder, mode, step, {"top1": top1, "top5": top5})
