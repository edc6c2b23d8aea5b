"""One evaluation from start to end: load the model, find the labelled data, run a mode, report.

Modes (see ``docs/eval.md``):

- ``linear``: the paper's linear protocol (:mod:`swavctl.eval.linear`);
- ``fast``: a grid of linear probes on cached features, chosen on a held-out part of train
  (:mod:`swavctl.eval.fast`);
- ``knn``: DINO's weighted k-NN (:mod:`swavctl.eval.knn`);
- ``finetune``: the paper's semi-supervised fine-tuning on 1% / 10% of the labels
  (:mod:`swavctl.eval.finetune`).

Writes ``OUT/eval.json`` and ``OUT/confusion.png`` and returns a short summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from swavctl.config import RESOLVED_NAME as RESOLVED_FILE
from swavctl.data.demo import resolve_data_path
from swavctl.distributed import dist
from swavctl.errors import UserError, messages
from swavctl.eval import fast as fast_mod
from swavctl.eval.dataset import ImageCache, LabelledImages, should_cache
from swavctl.eval.features import FEATURE_BATCH, extract_features
from swavctl.eval.finetune import finetune, paper_recipe
from swavctl.eval.knn import KNN_K, KNN_TEMPERATURE, knn_scores
from swavctl.eval.linear import LinearRecipe, linear_protocol
from swavctl.eval.metrics import accuracy
from swavctl.eval.report import (
    CONFUSION_PNG,
    EVAL_JSON,
    PREDICTIONS_CSV,
    write_confusion_png,
    write_predictions_csv,
)
from swavctl.eval.splits import SPLIT_SEED, VAL_SPLIT, EvalSplit, discover, holdout_split, label_subset
from swavctl.eval.views import Normalizer, geometry_for
from swavctl.files.atomic import file_sha256, write_json_atomic, write_text_atomic
from swavctl.reporting import tensorboard_log
from swavctl.reporting.progress import QuietStages, StageReporter
from swavctl.weights.model_io import LoadedModel, load_model, no_recorded_data, run_folder

MODES = ("fast", "linear", "knn", "finetune")
DEFAULT_EPOCHS = {"linear": 100, "fast": 100}  # finetune: see finetune.paper_recipe


@dataclass
class EvalOptions:
    """Everything ``swavctl eval-linear`` accepts (None = the mode's default)."""

    model: Path = Path("runs/latest")
    data: str | None = None
    mode: str = "fast"
    out: Path | None = None
    val_split: float = VAL_SPLIT
    seed: int = SPLIT_SEED
    epochs: int | None = None
    batch_size: int = FEATURE_BATCH
    lr: float | None = None
    weight_decay: float | None = None
    k: int = KNN_K
    temperature: float = KNN_TEMPERATURE
    label_fraction: float | None = None
    aug_passes: int = 0
    holdout: float = 0.2
    standardize: bool = False
    fast_lrs: tuple[float, ...] = fast_mod.DEFAULT_LRS
    fast_wds: tuple[float, ...] = fast_mod.DEFAULT_WDS
    crop_size: int | None = None
    min_scale: float | None = None
    gpus: int | None = None
    procs: int = 1
    workers: int | None = None

    def to_json(self) -> str:
        """The options as JSON (for the worker processes of a multi-process evaluation)."""
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> EvalOptions:
        raw = json.loads(text)
        raw["model"] = Path(raw["model"])
        raw["out"] = None if raw["out"] is None else Path(raw["out"])
        raw["fast_lrs"], raw["fast_wds"] = tuple(raw["fast_lrs"]), tuple(raw["fast_wds"])
        return cls(**raw)

    def check(self) -> None:
        """Raise :class:`UserError` for values no mode accepts."""
        if self.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.mode == "finetune" and self.label_fraction is None:
            raise UserError("--mode finetune needs --label-fraction (the paper's: 0.01 or 0.1)")
        if self.label_fraction is not None and self.mode != "finetune":
            raise UserError("--label-fraction only applies to --mode finetune")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise UserError(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if self.epochs is not None and self.epochs < 1:
            raise UserError("--epochs must be at least 1")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.k < 1:
            raise UserError("--k must be at least 1")
        if self.temperature <= 0:
            raise UserError("--temperature must be positive")
        if self.aug_passes < 0:
            raise UserError("--aug-passes must be 0 or more")
        if not 0 < self.holdout < 1:
            raise UserError(f"--holdout must be in (0, 1), got {self.holdout}")
        if self.crop_size is not None and self.crop_size < 1:
            raise UserError("--crop-size must be positive")
        if self.min_scale is not None and not 0 < self.min_scale <= 1:
            raise UserError(f"--min-scale must be in (0, 1], got {self.min_scale}")
        if not self.fast_lrs or not self.fast_wds or min(self.fast_lrs) <= 0 or min(self.fast_wds) < 0:
            raise UserError("the fast grid needs positive learning rates and non-negative weight decays")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UserError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.workers is not None and self.workers < 0:
            raise UserError("--workers must be 0 or more")
        if self.gpus is not None and self.gpus < 0:
            raise UserError("--gpus must be 0 or more")
        if self.procs < 1:
            raise UserError("--procs must be at least 1")

    @property
    def resolved_epochs(self) -> int | None:
        """``--epochs`` or the mode's default (None: knn has none, finetune's depends on the subset)."""
        return self.epochs or DEFAULT_EPOCHS.get(self.mode)


@dataclass
class _Context:
    options: EvalOptions
    loaded: LoadedModel
    split: EvalSplit
    device: torch.device
    normalize: Normalizer
    workers: int
    reporter: StageReporter
    cache: ImageCache | None
    timings: dict[str, float] = field(default_factory=dict)

    def images(self, which: str, *, augment: bool, indices: Any = None) -> LabelledImages:
        samples = self.split.train if which == "train" else self.split.val
        if indices is not None:
            samples = [samples[int(i)] for i in indices]
        geometry = geometry_for(self.loaded.settings, self.options.crop_size, self.options.min_scale)
        return LabelledImages(samples, geometry, augment=augment, seed=self.options.seed, cache=self.cache)

    def features(self, dataset: LabelledImages, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features on the device, their labels on the device, their dataset indices on the CPU)."""
        start = time.perf_counter()
        try:
            feats, kept = extract_features(
                self.loaded.model.backbone,
                dataset,
                normalize=self.normalize,
                device=self.device,
                batch_size=self.options.batch_size,
                feature_dim=self.loaded.model.feature_dim,
                workers=self.workers,
                reporter=self.reporter,
                name=name,
            )
        except ValueError:
            raise UserError(f"none of the {len(dataset)} {name} images could be decoded") from None
        self.timings["features"] = self.timings.get("features", 0.0) + time.perf_counter() - start
        if kept.numel() < len(dataset):  # the same on every rank: the indices are gathered
            lost = sorted(set(range(len(dataset))) - set(kept.tolist()))
            names = ", ".join(str(dataset.samples[i].path) for i in lost[:5])
            more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
            self.reporter.warn(f"{name}: skipped {len(lost)} unreadable file(s): {names}{more}")
        return feats, dataset.labels[kept].to(self.device), kept


def pick_device(gpus: int | None) -> torch.device:
    """CUDA when asked for (or by default when available), else the CPU."""
    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    if gpus == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(messages.not_enough_gpus(gpus, 0))
    return torch.device("cuda", torch.cuda.current_device())


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
    options.check()
    started = time.perf_counter()
    device = device or pick_device(options.gpus)
    torch.manual_seed(options.seed)
    model_path = options.model.expanduser()
    if not model_path.exists():
        raise UserError(messages.model_not_found(model_path))
    loaded = load_model(model_path, warn=report.warn)
    # channels_last (NHWC): faster convolutions and pooling on GPUs and CPUs alike (see train.channels_last).
    loaded.model.backbone.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    root = data_root(options, loaded, report)
    split = discover(root, val_split=options.val_split, seed=options.seed)
    for note in split.notes:
        report.warn(note)
    cache = ImageCache() if should_cache([*split.train, *split.val]) else None
    ctx = _Context(
        options=options,
        loaded=loaded,
        split=split,
        device=device,
        normalize=Normalizer(loaded.settings.data.augment.mean, loaded.settings.data.augment.std),
        workers=options.workers if options.workers is not None else loaded.settings.data.workers,
        reporter=report,
        cache=cache,
    )
    out = options.out or run_folder(loaded) / f"eval-{options.mode}"
    if out.is_file():
        raise UserError(messages.output_is_file(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            (out / EVAL_JSON).unlink(missing_ok=True)  # written last: the folder's commit marker
    except OSError as exc:
        raise UserError(messages.output_not_writable(out, exc.strerror or exc)) from None
    geometry = geometry_for(loaded.settings, options.crop_size, options.min_scale)
    report.info(
        f"{options.mode}: {loaded.settings.model.arch} ({loaded.kind} {loaded.source}) on {split.root} "
        f"[{split.layout}]: {len(split.train)} train / {len(split.val)} val images, "
        f"{split.num_classes} classes, "
        f"{geometry.crop} px views (resize {geometry.resize}), device {device}"
    )
    runner = {"fast": _run_fast, "linear": _run_linear, "knn": _run_knn, "finetune": _run_finetune}[
        options.mode
    ]
    result = runner(ctx, out)
    if result is None or not main:
        return {}
    scores, val_labels, val_indices, n_train, extra = result
    extra_summary = extra.pop("summary", {})
    acc = accuracy(scores, val_labels, split.num_classes)
    total = time.perf_counter() - started
    ctx.timings["total"] = total
    sha = file_sha256(loaded.source)
    per_class = {name: acc.per_class[i] for i, name in enumerate(split.classes)}
    title = f"{options.mode}: top-1 {100 * acc.top1:.2f}% on {acc.n} val images ({loaded.source.name})"
    write_confusion_png(out / CONFUSION_PNG, acc.confusion, split.classes, title)
    write_predictions_csv(
        out / PREDICTIONS_CSV,
        [split.val[int(i)].path for i in val_indices],
        [split.classes[int(y)] for y in val_labels.cpu()],
        scores.cpu(),
        split.classes,
    )
    record: dict[str, Any] = {
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
        "per_class_accuracy": per_class,
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
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
            "epochs": options.resolved_epochs,
            "geometry": geometry.as_dict(),
            "normalize": {"mean": list(ctx.normalize.mean), "std": list(ctx.normalize.std)},
            "device": str(device),
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
        **extra,
    }
    write_json_atomic(out / EVAL_JSON, record)
    summary_keys = (
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
    summary = {k: record[k] for k in summary_keys}
    summary["seconds"] = round(total, 3)
    summary["model"] = str(loaded.source.resolve())
    summary["model_sha256"] = sha
    summary.update(extra_summary)
    tensorboard_dir = _add_to_tensorboard(loaded, options.mode, acc.top1, acc.top5, report)
    if tensorboard_dir is not None:
        summary["tensorboard"] = str(tensorboard_dir)
    return summary


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


# ---------------------------------------------------------------------------------------------
# Modes: each returns (val scores (N, C), val labels (N,), val indices (N,), train images used,
# extra record fields)
# on rank 0; knn and fast return None on the other ranks once the features are gathered.

_ModeResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, dict[str, Any]]


def _run_knn(ctx: _Context, out: Path) -> _ModeResult | None:
    o = ctx.options
    train_f, train_y, _ = ctx.features(ctx.images("train", augment=False), "train features")
    val_f, val_y, val_idx = ctx.features(ctx.images("val", augment=False), "val features")
    if not dist.is_main():
        return None
    start = time.perf_counter()
    scores = knn_scores(
        train_f, train_y, val_f, num_classes=ctx.split.num_classes, k=o.k, temperature=o.temperature
    )
    ctx.timings["classifier"] = time.perf_counter() - start
    k = min(o.k, train_f.shape[0])
    extra = {"knn": {"k": k, "temperature": o.temperature}, "summary": {"k": k}}
    return scores, val_y, val_idx, int(train_f.shape[0]), extra


def _run_fast(ctx: _Context, out: Path) -> _ModeResult | None:
    o = ctx.options
    c = ctx.split.num_classes
    views = [("train features", ctx.images("train", augment=False))]
    for p in range(o.aug_passes):
        dataset = ctx.images("train", augment=True)
        dataset.set_epoch(p)
        views.append((f"augmented pass {p + 1}/{o.aug_passes}", dataset))
    feats, labels, indices = [], [], []
    for name, dataset in views:
        f, y, kept = ctx.features(dataset, name)
        feats.append(f)
        labels.append(y)
        indices.append(kept)
    val_f, val_y, val_idx = ctx.features(ctx.images("val", augment=False), "val features")
    if not dist.is_main():
        return None
    start = time.perf_counter()
    # Hold out a class-stratified part of the train images (by image, so none of the augmented
    # views of a held-out image is fitted on); only their centre views are scored.
    _, held_idx = holdout_split([s.label for s in ctx.split.train], o.holdout, o.seed)
    held_set = torch.as_tensor(held_idx, dtype=torch.int64)
    is_held = [torch.isin(kept, held_set).to(ctx.device) for kept in indices]
    if not bool(is_held[0].any()) or all(bool(h.all()) for h in is_held):
        raise UserError(f"too few train images ({len(ctx.split.train)}) for a --holdout of {o.holdout:g}")
    with ctx.reporter.stage(f"fast grid ({len(o.fast_lrs) * len(o.fast_wds)} probes)", 2, "fits") as advance:
        probe = fast_mod.fast_probe(
            feats,
            labels,
            is_held,
            val_f,
            num_classes=c,
            lrs=o.fast_lrs,
            wds=o.fast_wds,
            epochs=o.epochs or DEFAULT_EPOCHS["fast"],
            batch_size=o.batch_size,
            seed=o.seed,
            standardize=o.standardize,
            advance=advance,
        )
    if probe.scores is None:
        raise UserError("every probe of the fast grid diverged; try smaller --fast-lrs or --standardize")
    choice, refit, scores = probe.choice, probe.refit, probe.scores
    if not refit:
        ctx.reporter.warn(
            "the chosen probe diverged when retrained on all of train; using the fit-part probe"
        )
    epochs = probe.epochs
    ctx.timings["classifier"] = time.perf_counter() - start
    chosen = {"lr": choice.lr, "weight_decay": choice.wd, "holdout_top1": choice.holdout_top1[choice.chosen]}
    extra = {
        "fast": {
            "epochs": epochs,
            "aug_passes": o.aug_passes,
            "holdout_fraction": o.holdout,
            "n_fit": probe.n_fit,
            "n_holdout": probe.n_holdout,
            "standardized": o.standardize,
            "refit_on_all_train": refit,
            "chosen": chosen,
            "grid": choice.table(),
        },
        "summary": {"chosen": chosen},
    }
    return scores, val_y, val_idx, int(feats[0].shape[0]), extra


def _run_linear(ctx: _Context, out: Path) -> _ModeResult:
    o = ctx.options
    defaults = LinearRecipe()
    recipe = LinearRecipe(
        epochs=o.epochs or DEFAULT_EPOCHS["linear"],
        lr=o.lr if o.lr is not None else defaults.lr,
        weight_decay=o.weight_decay if o.weight_decay is not None else defaults.weight_decay,
        batch_size=o.batch_size,
    )
    val_f, val_y, val_idx = ctx.features(ctx.images("val", augment=False), "val features")
    start = time.perf_counter()
    train = ctx.images("train", augment=True)
    result = linear_protocol(
        ctx.loaded.model.backbone,
        train,
        val_f,
        val_y,
        feature_dim=ctx.loaded.model.feature_dim,
        num_classes=ctx.split.num_classes,
        recipe=recipe,
        normalize=ctx.normalize,
        device=ctx.device,
        seed=o.seed,
        workers=ctx.workers,
        reporter=ctx.reporter,
    )
    ctx.timings["classifier"] = time.perf_counter() - start
    best = best_epoch_on_val(result.history)
    best_epoch = {
        "epoch": int(best["epoch"]),
        "top1": best["val_top1"],
        "top5": best["val_top5"],
        "note": "best epoch selected on val (the official script's number; optimistic); "
        "top1/top5 are the final epoch's",
    }
    extra = {
        "linear": {
            "recipe": asdict(recipe),
            "history": result.history,
            "best_epoch_selected_on_val": best_epoch,
        },
        "summary": {"best_epoch_selected_on_val": {"epoch": best_epoch["epoch"], "top1": best_epoch["top1"]}},
    }
    return result.val_scores, val_y, val_idx, len(train), extra


def best_epoch_on_val(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch the official ``eval_linear.py`` reports: the highest val top-1, the *first* epoch
    to reach it on a tie (it replaces its best only when ``top1 > best``), with that epoch's top-5."""
    return max(history, key=lambda h: (h["val_top1"], -h["epoch"]))


def _run_finetune(ctx: _Context, out: Path) -> _ModeResult:
    o = ctx.options
    assert o.label_fraction is not None
    labels = [s.label for s in ctx.split.train]
    subset, notes = label_subset(labels, o.label_fraction, o.seed)
    for note in notes:
        ctx.reporter.warn(note)
    ctx.reporter.info(
        f"finetune: {len(subset)} of the {len(labels)} train images keep their labels "
        f"(--label-fraction {o.label_fraction:g}, balanced over classes; listed in subset.txt)"
    )
    subset_file = out / "subset.txt"
    if dist.is_main():
        lines = [f"{ctx.split.train[int(i)].path}\t{ctx.split.classes[labels[int(i)]]}" for i in subset]
        write_text_atomic(subset_file, "".join(f"{line}\n" for line in lines))
    recipe = paper_recipe(
        o.label_fraction,
        subset_size=len(subset),
        epochs=o.epochs,
        batch_size=o.batch_size,
        head_lr=o.lr,
        weight_decay=o.weight_decay,
    )
    train = ctx.images("train", augment=True, indices=subset)
    val = ctx.images("val", augment=False)
    start = time.perf_counter()
    try:
        result = finetune(
            ctx.loaded.model.backbone,
            train,
            val,
            feature_dim=ctx.loaded.model.feature_dim,
            num_classes=ctx.split.num_classes,
            recipe=recipe,
            normalize=ctx.normalize,
            device=ctx.device,
            seed=o.seed,
            workers=ctx.workers,
            reporter=ctx.reporter,
        )
    except FloatingPointError as exc:
        raise UserError(f"{exc}; try a lower head learning rate with --lr") from None
    ctx.timings["classifier"] = time.perf_counter() - start
    per_class_counts = [0] * ctx.split.num_classes
    for i in subset:
        per_class_counts[labels[int(i)]] += 1
    val_y = val.labels[result.val_indices.cpu()].to(ctx.device)
    extra = {
        "finetune": {
            "label_fraction": o.label_fraction,
            "subset_size": len(subset),
            "subset_per_class": dict(zip(ctx.split.classes, per_class_counts, strict=True)),
            "subset_file": str(subset_file),
            "recipe": {**asdict(recipe), "milestone_epochs": recipe.milestone_epochs()},
            "history": result.history,
        },
        "summary": {"label_fraction": o.label_fraction, "subset_size": len(subset)},
    }
    return result.val_scores, val_y, result.val_indices.cpu(), len(subset), extra
