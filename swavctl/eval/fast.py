"""The fast linear probe: a grid of linear classifiers trained together on cached features.

The paper's linear evaluation re-runs the frozen backbone on fresh crops for 100 epochs. Here
the backbone runs once per image (plus optional augmented passes), and G = |lrs| x |wds|
softmax classifiers are trained at the same time on the cached features. Member g has weights
``W_g`` (d x C) and bias ``b_g``; the grid is stored as one (d, G*C) matrix, so a mini-batch X
(B x d) costs one matmul for the logits of every member and one for their gradients:

    L_g = mean_b CE(X W_g + b_g, y)                (each member its own loss)
    dL_g/dlogits = (softmax(X W_g + b_g) - onehot(y)) / B
    dW_g = X^T dL_g/dlogits + wd_g W_g,  db_g = sum_b dL_g/dlogits + wd_g b_g
    v_g <- momentum v_g + dW_g,  W_g <- W_g - lr_g(t) v_g          (torch.optim.SGD semantics)

with ``lr_g(t) = lr_g * (1 + cos(pi t / T)) / 2`` per step, init N(0, 0.01) and zero bias as in
the paper's protocol. Because the members' losses are separate sums, training them together is
exactly training each alone on the same mini-batches.

The probe is meant to predict the linear protocol's number, so it sees what that protocol sees:
the raw pooled features, batch 256, the same number of epochs (100), the same initialisation and
optimizer. What differs: centre views (plus ``--aug-passes`` training views) computed once
instead of fresh crops every epoch, and the learning rate and weight decay, which are chosen
from a grid wide enough (lr 0.01-10) for any backbone's feature scale instead of fixed at 0.3 /
1e-6. ``standardize=True`` (``--standardize``) first maps every feature dimension to zero mean
and unit variance (fit-part statistics). That changes nothing a linear classifier can represent
(the affine map folds into W and b) but conditions the problem far better: it estimates what a
fully converged linear classifier reaches, which on small data can be several points above the
paper protocol's short schedule on raw features (see docs/eval.md). A member that diverges
(non-finite logits) is never chosen.

The member is chosen by its top-1 on a held-out, class-stratified part of the train split (never
val; ties go to the lower held-out loss), then retrained with its hyper-parameters on the whole
train split, and only that classifier is scored on val. :func:`run_mode` is ``--mode fast``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from swavctl.distributed import dist
from swavctl.errors import UserError
from swavctl.eval.options import DEFAULT_EPOCHS, DEFAULT_LRS, DEFAULT_WDS
from swavctl.eval.splits import holdout_split

if TYPE_CHECKING:
    from swavctl.eval.context import EvalContext, ModeResult


@dataclass
class LinearGrid:
    """G linear classifiers: weight (d, G, C), bias (G, C), and their (lr, wd) (float64, CPU)."""

    weight: torch.Tensor
    bias: torch.Tensor
    lrs: torch.Tensor
    wds: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.bias.shape[0])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, G, C) logits of every member for ``features`` (N, d), one matmul."""
        d, g, c = self.weight.shape
        return (features @ self.weight.reshape(d, g * c)).view(-1, g, c) + self.bias

    def member(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (d, C), bias (C,)) of member ``index``."""
        return self.weight[:, index], self.bias[index]


@dataclass(frozen=True)
class Standardizer:
    """Per-dimension ``(x - mean) / std`` with statistics from the fit features."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor, eps: float = 1e-6) -> Standardizer:
        mean = features.mean(dim=0)
        std = features.std(dim=0, unbiased=False).clamp_min(eps)
        return cls(mean, std)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


def cosine_lr(base: torch.Tensor, step: int, total: int) -> torch.Tensor:
    """``base * (1 + cos(pi * step / total)) / 2``: from base to 0 over ``total`` steps."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


def train_linear_grid(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    lrs: torch.Tensor,
    wds: torch.Tensor,
    epochs: int,
    batch_size: int = 256,
    momentum: float = 0.9,
    seed: int = 0,
    init_std: float = 0.01,
) -> LinearGrid:
    """Train ``len(lrs)`` softmax classifiers together with SGD + momentum + cosine decay.

    ``lrs`` and ``wds`` (G,) give each member's learning rate and weight decay. Mini-batches are
    shuffled with a generator seeded by ``seed`` and shared by all members. Runs on the device and
    in the dtype of ``features``.
    """
    device, dtype = features.device, features.dtype
    n, d = features.shape
    g = int(lrs.numel())
    if wds.numel() != g:
        raise ValueError("lrs and wds must have the same length")
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(d, g, num_classes, generator=gen, dtype=torch.float64) * init_std).to(device, dtype)
    bias = torch.zeros(g, num_classes, device=device, dtype=dtype)
    v_weight = torch.zeros_like(weight)
    v_bias = torch.zeros_like(bias)
    lr_base = lrs.to(device, dtype)
    wd = wds.to(device, dtype)
    labels = labels.to(device).long()
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x, y = features[idx], labels[idx]
            b = x.shape[0]
            logits = (x @ weight.reshape(d, g * num_classes)).view(b, g, num_classes) + bias
            dlogits = logits.softmax(dim=2)
            dlogits[torch.arange(b, device=device), :, y] -= 1.0
            dlogits /= b
            grad_w = (x.T @ dlogits.reshape(b, g * num_classes)).view(d, g, num_classes)
            grad_w += wd.view(1, g, 1) * weight
            grad_b = dlogits.sum(dim=0) + wd.view(g, 1) * bias
            v_weight.mul_(momentum).add_(grad_w)
            v_bias.mul_(momentum).add_(grad_b)
            lr_now = cosine_lr(lr_base, step, total)
            weight -= lr_now.view(1, g, 1) * v_weight
            bias -= lr_now.view(g, 1) * v_bias
            step += 1
    return LinearGrid(weight, bias, lrs.detach().cpu().double(), wds.detach().cpu().double())


@dataclass
class GridChoice:
    """The grid's held-out results and the chosen member."""

    lrs: list[float]
    wds: list[float]
    holdout_top1: list[float]
    holdout_loss: list[float]
    chosen: int

    @property
    def lr(self) -> float:
        return self.lrs[self.chosen]

    @property
    def wd(self) -> float:
        return self.wds[self.chosen]

    def table(self) -> list[dict[str, float]]:
        return [
            {"lr": lr, "weight_decay": wd, "holdout_top1": acc, "holdout_loss": loss}
            for lr, wd, acc, loss in zip(
                self.lrs, self.wds, self.holdout_top1, self.holdout_loss, strict=True
            )
        ]


def choose_member(grid: LinearGrid, features: torch.Tensor, labels: torch.Tensor) -> GridChoice:
    """Score every member on held-out ``features``; the best top-1 wins, ties to the lower loss."""
    labels = labels.to(features.device).long()
    logits = grid.logits(features)  # (N, G, C)
    n, g, c = logits.shape
    finite = torch.isfinite(logits).flatten(start_dim=2).all(dim=2).all(dim=0)  # (G,)
    finite &= torch.isfinite(grid.weight).all(dim=2).all(dim=0) & torch.isfinite(grid.bias).all(dim=1)
    correct = (logits.argmax(dim=2) == labels.view(-1, 1)).double().mean(dim=0)
    loss = F.cross_entropy(
        logits.permute(0, 2, 1).double(), labels.view(-1, 1).expand(n, g), reduction="none"
    ).mean(dim=0)
    correct = torch.where(finite, correct, torch.full_like(correct, -1.0))  # diverged: never chosen
    loss = torch.where(finite & torch.isfinite(loss), loss, torch.full_like(loss, math.inf))
    # Sort by (-top1, loss): lexicographic choice without float tolerance games.
    order = sorted(range(g), key=lambda i: (-float(correct[i]), float(loss[i])))
    return GridChoice(
        lrs=[float(x) for x in grid.lrs.cpu()],
        wds=[float(x) for x in grid.wds.cpu()],
        holdout_top1=[float(x) for x in correct.cpu()],
        holdout_loss=[float(x) for x in loss.cpu()],
        chosen=order[0],
    )


def grid_axes(lrs: tuple[float, ...], wds: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The Cartesian product of learning rates and weight decays as two (G,) tensors."""
    lr_list = [lr for lr in lrs for _ in wds]
    wd_list = [wd for _ in lrs for wd in wds]
    return torch.tensor(lr_list, dtype=torch.float64), torch.tensor(wd_list, dtype=torch.float64)


@dataclass
class ProbeResult:
    """What :func:`fast_probe` found: the val scores of the chosen probe (None when every member
    diverged), the grid's held-out results, whether the chosen (lr, wd) was retrained on all of
    train (False: it diverged there, and the fit-part member scored val), and the sizes."""

    scores: torch.Tensor | None
    choice: GridChoice
    refit: bool
    epochs: int
    n_fit: int
    n_holdout: int


def fast_probe(
    feats: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    is_held: Sequence[torch.Tensor],
    val_features: torch.Tensor,
    *,
    num_classes: int,
    lrs: tuple[float, ...] = DEFAULT_LRS,
    wds: tuple[float, ...] = DEFAULT_WDS,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    standardize: bool = False,
    advance: Callable[..., None] | None = None,
) -> ProbeResult:
    """The fast probe of the module docstring on cached features.

    ``feats[v]``, ``labels[v]`` and ``is_held[v]`` (a bool mask) are view ``v`` of the train
    images; view 0 is the centre view, and only its held-out rows are scored to choose. The grid
    is fitted on the rows not held out of every view; the chosen (lr, wd) is then retrained on all
    rows, and that classifier scores ``val_features``. ``advance(1)`` is called after each of the
    two fits.
    """
    fit_f = torch.cat([f[~h] for f, h in zip(feats, is_held, strict=True)])
    fit_y = torch.cat([y[~h] for y, h in zip(labels, is_held, strict=True)])
    held_f, held_y = feats[0][is_held[0]], labels[0][is_held[0]]
    all_f, all_y = torch.cat(list(feats)), torch.cat(list(labels))
    if standardize:
        std_fit, std_all = Standardizer.fit(fit_f), Standardizer.fit(all_f)
        fit_f, held_f = std_fit(fit_f), std_fit(held_f)
        all_f, val_features = std_all(all_f), std_all(val_features)
    lr_axis, wd_axis = grid_axes(lrs, wds)
    common = {"num_classes": num_classes, "epochs": epochs, "batch_size": batch_size, "seed": seed}
    grid = train_linear_grid(fit_f, fit_y, lrs=lr_axis, wds=wd_axis, **common)  # type: ignore[arg-type]
    choice = choose_member(grid, held_f, held_y)
    sizes = {"epochs": epochs, "n_fit": int(fit_f.shape[0]), "n_holdout": int(held_f.shape[0])}
    if choice.holdout_top1[choice.chosen] < 0:
        return ProbeResult(None, choice, False, **sizes)
    if advance is not None:
        advance(1, f"chosen lr {choice.lr:g} wd {choice.wd:g}")
    chosen_lr = torch.tensor([choice.lr], dtype=torch.float64)
    chosen_wd = torch.tensor([choice.wd], dtype=torch.float64)
    final = train_linear_grid(all_f, all_y, lrs=chosen_lr, wds=chosen_wd, **common)  # type: ignore[arg-type]
    if advance is not None:
        advance(1)
    refit = bool(torch.isfinite(final.weight).all() and torch.isfinite(final.bias).all())
    if refit:
        return ProbeResult(final.logits(val_features)[:, 0], choice, True, **sizes)
    weight, bias = grid.member(choice.chosen)
    return ProbeResult(val_features @ weight + bias, choice, False, **sizes)


def run_mode(ctx: EvalContext, out: Path) -> ModeResult | None:
    """``--mode fast``: cached features of train (centre views plus ``--aug-passes`` augmented
    passes) and val, then :func:`fast_probe` on rank 0."""
    o = ctx.options
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
    probe = _probe(ctx, feats, labels, indices, val_f)
    ctx.timings["classifier"] = time.perf_counter() - start
    assert probe.scores is not None
    choice = probe.choice
    chosen = {"lr": choice.lr, "weight_decay": choice.wd, "holdout_top1": choice.holdout_top1[choice.chosen]}
    extra = {
        "fast": {
            "epochs": probe.epochs,
            "aug_passes": o.aug_passes,
            "holdout_fraction": o.holdout,
            "n_fit": probe.n_fit,
            "n_holdout": probe.n_holdout,
            "standardized": o.standardize,
            "refit_on_all_train": probe.refit,
            "chosen": chosen,
            "grid": choice.table(),
        },
        "summary": {"chosen": chosen},
    }
    return probe.scores, val_y, val_idx, int(feats[0].shape[0]), extra


def _probe(
    ctx: EvalContext, feats: list[Any], labels: list[Any], indices: list[Any], val_f: torch.Tensor
) -> ProbeResult:
    """Hold out part of train, fit the grid, choose and refit (see the module docstring)."""
    o = ctx.options
    # Hold out a class-stratified part of the train images (by image, so none of the augmented
    # views of a held-out image is fitted on); only their centre views are scored.
    _, held_idx = holdout_split([s.label for s in ctx.split.train], o.holdout, o.seed)
    held_set = torch.as_tensor(held_idx, dtype=torch.int64)
    is_held = [torch.isin(kept, held_set).to(ctx.device) for kept in indices]
    if not bool(is_held[0].any()) or all(bool(h.all()) for h in is_held):
        raise UserError(f"too few train images ({len(ctx.split.train)}) for a --holdout of {o.holdout:g}")
    with ctx.reporter.stage(f"fast grid ({len(o.fast_lrs) * len(o.fast_wds)} probes)", 2, "fits") as advance:
        probe = fast_probe(
            feats,
            labels,
            is_held,
            val_f,
            num_classes=ctx.split.num_classes,
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
    if not probe.refit:
        ctx.reporter.warn(
            "the chosen probe diverged when retrained on all of train; using the fit-part probe"
        )
    return probe
