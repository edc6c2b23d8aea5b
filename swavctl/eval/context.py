"""What every evaluation mode works with: the loaded model, the split, the device, and two helpers.

A mode (:mod:`swavctl.eval.modes`) is a function ``run_mode(ctx, out)`` that returns a
:data:`ModeResult` on rank 0: the val scores (N, C), the val labels (N,), the val indices (N,),
the number of train images used, and the mode's own fields of ``eval.json`` (its ``summary``
entry goes to the printed summary). Modes that only extract features (knn, fast) return None on
the other ranks once the features are gathered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swavctl.errors import UserError
from swavctl.eval.dataset import ImageCache, LabelledImages
from swavctl.eval.features import extract_features
from swavctl.eval.options import EvalOptions
from swavctl.eval.splits import EvalSplit
from swavctl.eval.views import Normalizer, geometry_for
from swavctl.reporting.progress import StageReporter
from swavctl.weights.model_io import LoadedModel

ModeResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, dict[str, Any]]


@dataclass
class EvalContext:
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


#: A mode: ``run_mode(ctx, out)`` (``out``: the output folder, for files of its own).
Mode = Callable[[EvalContext, Path], ModeResult | None]
