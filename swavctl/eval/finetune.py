"""Semi-supervised fine-tuning: the whole network trained on 1% or 10% of the labels.

Caron et al. 2020, Sec. 4.2 / Table 2 and the official ``eval_semisup.py``: the pretrained trunk
plus a new linear head are trained end to end (batch norm in train mode) on a class-balanced
subset of the train labels with

- SGD, momentum 0.9, weight decay 0, batch 256, 20 epochs;
- step decay of both learning rates by 0.2 at epochs 12 and 16;
- 1% of labels: lr 0.02 for the trunk and 5 for the head; 10%: 0.01 and 0.2;
- training views RandomResizedCrop + flip, evaluation on the centre view.

Scaled to other data (:func:`paper_recipe`):

- the batch is ``min(256, subset size)`` and both learning rates follow the linear scaling rule,
  ``lr * batch / 256`` (Goyal et al. 2017), so a 10-image subset is not hit with the full
  batch-256 rates (the head's lr 5 makes a tiny batch diverge);
- by default the run lasts 20 epochs or 200 optimizer steps, whichever is longer: the paper's
  20 epochs over 1% of ImageNet are 1,000 steps, but over a 10-image subset they would be 20;
- the decay points stay at 60% and 80% of the epochs (12 and 16 of 20);
- a fraction other than 0.01 or 0.1 takes the rates of the nearer of the two on a log scale.

The head is initialised N(0, 0.01) with zero bias, like the linear protocol. :func:`run_mode` is
``--mode finetune``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from swavctl.distributed import dist
from swavctl.distributed.sync_batchnorm import convert_sync_batchnorm
from swavctl.errors import UserError
from swavctl.eval.dataset import LabelledImages, make_loader
from swavctl.eval.linear import new_classifier
from swavctl.eval.sharding import (
    chunks,
    cross_entropy_step,
    data_parallel,
    gather_in_order,
    global_sums,
    rank_share,
    this_rank_sampler,
)
from swavctl.eval.splits import label_subset
from swavctl.eval.views import Normalizer
from swavctl.files.atomic import write_text_atomic
from swavctl.reporting.progress import QuietStages, StageReporter

if TYPE_CHECKING:
    from swavctl.eval.context import EvalContext, ModeResult

#: The paper's learning rates (trunk, head) per label fraction, for batch 256.
PAPER_LRS = {0.01: (0.02, 5.0), 0.1: (0.01, 0.2)}
PAPER_BATCH = 256
PAPER_EPOCHS = 20
#: Fewest optimizer steps of a default-length run (see the module docstring).
MIN_STEPS = 200


@dataclass(frozen=True)
class FinetuneRecipe:
    """Hyper-parameters of ``--mode finetune``."""

    epochs: int = 20
    trunk_lr: float = 0.02
    head_lr: float = 5.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    milestones: tuple[float, float] = (0.6, 0.8)  # epochs 12 and 16 of 20
    gamma: float = 0.2

    def milestone_epochs(self) -> list[int]:
        """Epochs after which the learning rates are multiplied by ``gamma``."""
        return sorted({max(1, int(round(m * self.epochs))) for m in self.milestones})


def paper_recipe(
    label_fraction: float,
    *,
    subset_size: int,
    epochs: int | None = None,
    batch_size: int = PAPER_BATCH,
    head_lr: float | None = None,
    weight_decay: float | None = None,
) -> FinetuneRecipe:
    """The paper's recipe for ``label_fraction``, scaled to a subset of ``subset_size`` images.

    Rates of the nearer of 1% / 10% (log scale) times ``batch / 256`` with
    ``batch = min(batch_size, subset_size)``; ``epochs`` if given, else
    ``max(20, ceil(200 / steps per epoch))``. ``head_lr`` and ``weight_decay`` override the
    (scaled) defaults as given.
    """
    nearest = min(PAPER_LRS, key=lambda f: abs(math.log(label_fraction) - math.log(f)))
    trunk, head = PAPER_LRS[nearest]
    batch = max(1, min(batch_size, subset_size))
    scale = batch / PAPER_BATCH
    steps_per_epoch = math.ceil(subset_size / batch)
    return FinetuneRecipe(
        epochs=epochs or max(PAPER_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)),
        trunk_lr=trunk * scale,
        head_lr=head_lr if head_lr is not None else head * scale,
        weight_decay=weight_decay if weight_decay is not None else 0.0,
        batch_size=batch,
    )


class Classifier(nn.Module):
    """Backbone followed by a linear head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


@dataclass
class FinetuneResult:
    val_scores: torch.Tensor  # (M, C) for the readable val images
    val_indices: torch.Tensor  # (M,) their indices in ``val``
    history: list[dict[str, float]] = field(default_factory=list)


def finetune(
    backbone: nn.Module,
    train: LabelledImages,
    val: LabelledImages,
    *,
    feature_dim: int,
    num_classes: int,
    recipe: FinetuneRecipe,
    normalize: Normalizer,
    device: torch.device,
    seed: int,
    workers: int = 0,
    reporter: StageReporter | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``backbone`` with a new head on ``train`` (the label subset); score val.

    ``train`` must yield training views; ``val`` centre views. The caller's backbone is not
    modified. Returns the val scores of the final epoch (model in eval mode) with the indices of
    the val images they belong to, and a history of the training loss per epoch.

    Under a process group every rank trains on its part of each global batch, with the batch
    norms synchronized over ranks and the model in DDP (see :mod:`swavctl.eval.sharding`), and
    scores its share of val; every rank returns the same result, equal to a single process's up
    to the order of float sums.
    """
    trunk = copy.deepcopy(backbone).to(device)
    for p in trunk.parameters():
        p.requires_grad_(True)
    classifier = Classifier(trunk, new_classifier(feature_dim, num_classes, 0.01, seed).to(device))
    model: nn.Module = classifier
    if dist.is_distributed():  # batch statistics over the global batch, as one process has them
        model = convert_sync_batchnorm(model, device_type=device.type)
    optimizer = torch.optim.SGD(
        [
            {"params": trunk.parameters(), "lr": recipe.trunk_lr},
            {"params": classifier.head.parameters(), "lr": recipe.head_lr},
        ],
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    history = _train(
        data_parallel(model, device), optimizer, train, recipe, normalize, device, seed, workers, reporter
    )
    model.eval()
    val_scores, val_indices = _score(model, val, normalize, num_classes, device, workers)
    return FinetuneResult(val_scores=val_scores, val_indices=val_indices, history=history)


def _train(
    trained: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: LabelledImages,
    recipe: FinetuneRecipe,
    normalize: Normalizer,
    device: torch.device,
    seed: int,
    workers: int,
    reporter: StageReporter | None,
) -> list[dict[str, float]]:
    """``recipe.epochs`` epochs of SGD with the step decay; returns the loss history per epoch."""
    report: StageReporter = reporter or QuietStages()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, recipe.milestone_epochs(), gamma=recipe.gamma)
    # BatchNorm in train mode cannot use a batch of one: such a trailing batch is dropped.
    sampler = this_rank_sampler(
        len(train), batch_size=min(recipe.batch_size, len(train)), seed=seed, drop_single=True
    )
    loader = make_loader(train, batch_sampler=sampler, workers=workers, pin_memory=device.type == "cuda")
    labels_all = train.labels.to(device)
    history: list[dict[str, float]] = []
    with report.stage("finetune", recipe.epochs * len(sampler)) as advance:
        for epoch in range(recipe.epochs):
            train.set_epoch(epoch)
            sampler.set_epoch(epoch)
            trained.train()
            total, seen = 0.0, 0
            for batch in loader:
                if batch.images is not None:
                    inputs = normalize(batch.images.to(device, non_blocking=True))
                else:  # nothing readable here (or nothing for this rank): still join the step
                    inputs = torch.zeros(0, 3, train.geometry.crop, train.geometry.crop, device=device)
                targets = labels_all[batch.indices.to(device)]
                # BatchNorm in train mode needs 2 images: a global batch of 1 is skipped.
                loss_sum = cross_entropy_step(trained, inputs, targets, optimizer, min_count=2)
                if loss_sum is not None:
                    total += loss_sum
                    seen += targets.numel()
                advance(1, f"epoch {epoch + 1}/{recipe.epochs} loss {total / max(1, seen):.3f}")
            total, seen_all = global_sums([total, float(seen)], device)
            if not math.isfinite(total):
                raise FloatingPointError(f"fine-tuning diverged at epoch {epoch + 1} (loss {total})")
            history.append(
                {
                    "epoch": epoch + 1,
                    "trunk_lr": optimizer.param_groups[0]["lr"],
                    "train_loss": total / max(1.0, seen_all),
                }
            )
            scheduler.step()
    return history


@torch.no_grad()
def _score(
    model: nn.Module,
    val: LabelledImages,
    normalize: Normalizer,
    num_classes: int,
    device: torch.device,
    workers: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Val scores (M, C) of the readable images, in val order, with their indices (M,)."""
    scores: list[torch.Tensor] = [torch.empty(0, num_classes, device=device)]
    order: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)]
    share = rank_share(len(val), dist.rank(), dist.world_size())
    val_loader = make_loader(val, batch_sampler=chunks(share, 256), workers=workers)
    for batch in val_loader:
        if batch.images is not None:
            scores.append(model(normalize(batch.images.to(device))).float())
            order.append(batch.indices)
    return gather_in_order(torch.cat(scores), torch.cat(order))


def run_mode(ctx: EvalContext, out: Path) -> ModeResult:
    """``--mode finetune``: a class-balanced label subset (listed in ``OUT/subset.txt``), then
    :func:`finetune` with :func:`paper_recipe`."""
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
