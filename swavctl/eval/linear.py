"""The paper's linear evaluation: a linear classifier on the frozen backbone's pooled features.

Caron et al. 2020, Sec. 4.1 and the official ``eval_linear.py``:

- the backbone is frozen and in eval mode (batch norm uses its running statistics);
- the classifier is ``Linear(d, C)`` with weights ~ N(0, 0.01) and zero bias;
- SGD, momentum 0.9, lr 0.3, weight decay 1e-6 (on every parameter), batch 256,
  cosine decay to 0 over 100 epochs, stepped once per epoch (``CosineAnnealingLR``);
- training views: RandomResizedCrop + horizontal flip, fresh every epoch; evaluation views: resize
  then centre crop (see :mod:`swavctl.eval.views`).

The official script reports the best epoch on val, which selects on the test data. Here the
reported number is the final epoch's; the best epoch is kept in the history and labelled as
selected on val. Val features come from a frozen, deterministic view, so they are computed once
and every epoch's classifier is scored on them. :func:`run_mode` is ``--mode linear``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from swavctl.eval.dataset import LabelledImages, make_loader
from swavctl.eval.features import backbone_features
from swavctl.eval.metrics import topk_correct
from swavctl.eval.options import DEFAULT_EPOCHS
from swavctl.eval.sharding import cross_entropy_step, data_parallel, global_sums, this_rank_sampler
from swavctl.eval.views import Normalizer
from swavctl.reporting.progress import QuietStages, StageReporter

if TYPE_CHECKING:
    from swavctl.eval.context import EvalContext, ModeResult


@dataclass(frozen=True)
class LinearRecipe:
    """The paper's linear-evaluation hyper-parameters (defaults) for ``--mode linear``."""

    epochs: int = 100
    lr: float = 0.3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    batch_size: int = 256
    init_std: float = 0.01


@dataclass
class LinearResult:
    """The final classifier's val scores and the per-epoch history."""

    val_scores: torch.Tensor  # (N_val, C), final epoch
    history: list[dict[str, float]] = field(default_factory=list)
    classifier: nn.Linear | None = None


def new_classifier(feature_dim: int, num_classes: int, init_std: float, seed: int) -> nn.Linear:
    """``Linear(d, C)`` with N(0, init_std) weights and zero bias (seeded)."""
    layer = nn.Linear(feature_dim, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(num_classes, feature_dim, generator=gen) * init_std)
        layer.bias.zero_()
    return layer


def linear_protocol(
    backbone: nn.Module,
    train: LabelledImages,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    feature_dim: int,
    num_classes: int,
    recipe: LinearRecipe,
    normalize: Normalizer,
    device: torch.device,
    seed: int,
    workers: int = 0,
    reporter: StageReporter | None = None,
) -> LinearResult:
    """Train the linear classifier on fresh training views of ``train`` for ``recipe.epochs`` epochs.

    ``train`` must yield training views (``augment=True``); ``val_features`` are the frozen
    backbone's centre-view features of val. Returns the final epoch's val scores and a history of
    (epoch, lr, train loss, val top-1, val top-5) per epoch.

    Under a process group every rank trains on its part of each global batch and the classifier
    is wrapped in DDP (see :mod:`swavctl.eval.sharding`); every rank returns the same result,
    equal to a single process's up to the order of float sums.
    """
    report: StageReporter = reporter or QuietStages()
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    classifier = new_classifier(feature_dim, num_classes, recipe.init_std, seed).to(device)
    trained = data_parallel(classifier, device)  # DDP under a process group
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.epochs, eta_min=0)
    sampler = this_rank_sampler(len(train), batch_size=recipe.batch_size, seed=seed)
    loader = make_loader(train, batch_sampler=sampler, workers=workers, pin_memory=device.type == "cuda")
    labels_all = train.labels.to(device)
    val_labels = val_labels.to(device)
    history: list[dict[str, float]] = []
    steps = len(sampler)
    with report.stage("linear", recipe.epochs * steps) as advance:
        for epoch in range(recipe.epochs):
            train.set_epoch(epoch)
            sampler.set_epoch(epoch)
            trained.train()
            total_loss, seen = 0.0, 0
            lr_now = optimizer.param_groups[0]["lr"]
            for batch in loader:
                if batch.images is not None:
                    features = backbone_features(
                        backbone, batch.images.to(device, non_blocking=True), normalize
                    )
                else:  # nothing readable here (or nothing for this rank): still join the step
                    features = torch.zeros(0, feature_dim, device=device)
                targets = labels_all[batch.indices.to(device)]
                loss_sum = cross_entropy_step(trained, features, targets, optimizer)
                if loss_sum is not None:
                    total_loss += loss_sum
                    seen += targets.numel()
                advance(1, f"epoch {epoch + 1}/{recipe.epochs} loss {total_loss / max(1, seen):.3f}")
            scheduler.step()
            total_loss, seen_all = global_sums([total_loss, float(seen)], device)
            classifier.eval()
            with torch.no_grad():
                scores = classifier(val_features)
            history.append(
                {
                    "epoch": epoch + 1,
                    "lr": lr_now,
                    "train_loss": total_loss / max(1.0, seen_all),
                    "val_top1": float(topk_correct(scores, val_labels, 1).float().mean()),
                    "val_top5": float(topk_correct(scores, val_labels, 5).float().mean()),
                }
            )
    with torch.no_grad():
        final = classifier(val_features)
    return LinearResult(val_scores=final, history=history, classifier=classifier)


def run_mode(ctx: EvalContext, out: Path) -> ModeResult:
    """``--mode linear``: :func:`linear_protocol` with the paper's recipe (or the options' overrides)."""
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
