"""k-NN top-1 during pretraining: the figure ``swavctl eval-linear --mode knn`` gives, as the run goes.

Users of the other SwAV tools see only the loss until pretraining ends (the reference's ninth
complaint). With ``monitor.knn_data`` set, the pretrain loop scores its backbone every
``monitor.knn_every_epochs`` epochs and at the end of the run with DINO's weighted k-NN
(:mod:`swavctl.eval.knn`; Caron et al. 2021, arXiv 2104.14294), on the same centre views,
train/val split, temperature and feature batch as ``eval-linear --mode knn`` with its defaults.
So for the same weights the two figures are the same number.

Scoring leaves the training untouched:

- the backbone runs in eval mode (batch norm reads its running statistics and does not update
  them) without gradients, and returns to train mode;
- torch's random generators are restored afterwards (a DataLoader draws its base seed from them);
- under a process group each rank extracts the features of its share of the images and the
  shares are gathered (:func:`~swavctl.eval.features.extract_features`), so N ranks score what one
  process scores.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from swavctl.config import Settings
from swavctl.data.demo import resolve_data_path
from swavctl.distributed import dist
from swavctl.errors import UserError
from swavctl.eval.dataset import ImageCache, LabelledImages, should_cache
from swavctl.eval.features import extract_features
from swavctl.eval.knn import knn_scores
from swavctl.eval.metrics import accuracy
from swavctl.eval.options import FEATURE_BATCH, KNN_TEMPERATURE, SPLIT_SEED, VAL_SPLIT
from swavctl.eval.splits import EvalSplit, discover
from swavctl.eval.views import Normalizer, geometry_for


class MonitorError(Exception):
    """The monitor cannot score (every image of a split unreadable); the training goes on without it."""


@dataclass(frozen=True)
class KnnReading:
    """One k-NN evaluation of the training backbone."""

    top1: float
    top5: float
    k: int  # the neighbours used (``monitor.knn_k``, capped at the number of train images)
    train_images: int
    val_images: int
    seconds: float
    top5_k: int = 5  # top5 is the top-min(5, classes) accuracy, as eval-linear's top5_k

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def monitor_split(settings: Settings) -> EvalSplit | None:
    """The labelled split of ``monitor.knn_data`` (None when the monitor is off).

    Found as ``eval-linear --data DIR`` finds it, so a bad folder is refused before training starts.
    """
    if not settings.monitor.knn_data:
        return None
    root = resolve_data_path(settings.monitor.knn_data)
    try:
        return discover(root, val_split=VAL_SPLIT, seed=SPLIT_SEED)
    except UserError as exc:
        raise UserError(f"monitor.knn_data: {exc}") from None


class KnnMonitor:
    """Scores a backbone on a labelled split with the weighted k-NN (module docstring)."""

    def __init__(self, settings: Settings, split: EvalSplit, *, device: torch.device, workers: int) -> None:
        self.split = split
        self.k = settings.monitor.knn_k
        self.every_epochs = settings.monitor.knn_every_epochs
        self.device = device
        self.workers = workers
        self.normalize = Normalizer(settings.data.augment.mean, settings.data.augment.std)
        geometry = geometry_for(settings)
        # Small data is decoded once and kept for every evaluation of the run.
        cache = ImageCache() if should_cache([*split.train, *split.val]) else None
        self.train_images = LabelledImages(split.train, geometry, augment=False, seed=SPLIT_SEED, cache=cache)
        self.val_images = LabelledImages(split.val, geometry, augment=False, seed=SPLIT_SEED, cache=cache)

    def due(self, step: int, steps_per_epoch: int, total_steps: int) -> bool:
        """True after the last step of every ``every_epochs``-th epoch, and after the run's last step."""
        if step == total_steps:
            return True
        return step % steps_per_epoch == 0 and (step // steps_per_epoch) % self.every_epochs == 0

    def evaluate(self, backbone: nn.Module, *, feature_dim: int) -> KnnReading:
        """The k-NN top-1 and top-5 of ``backbone`` on the val images; every rank gets the same reading.

        The features are extracted in float32 as ``eval-linear`` extracts them, also when the
        training runs under bf16 autocast: a bf16 extraction moved a demo reading by up to 0.3
        points, and the reading is meant to be eval-linear's number. One fp32 forward pass over a
        k-NN subset is small next to an epoch of training.
        """
        with torch.autocast(self.device.type, enabled=False):  # also inside the training's autocast
            return self._evaluate(backbone, feature_dim)

    def _evaluate(self, backbone: nn.Module, feature_dim: int) -> KnnReading:
        started = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            train_f, train_kept = self._features(backbone, self.train_images, feature_dim)
            val_f, val_kept = self._features(backbone, self.val_images, feature_dim)
        reading: KnnReading | None = None
        if dist.is_main():
            scores = knn_scores(
                train_f,
                self.train_images.labels[train_kept].to(train_f.device),
                val_f,
                num_classes=self.split.num_classes,
                k=self.k,
                temperature=KNN_TEMPERATURE,
            )
            acc = accuracy(scores, self.val_images.labels[val_kept], self.split.num_classes)
            reading = KnnReading(
                top1=acc.top1,
                top5=acc.top5,
                k=min(self.k, int(train_f.shape[0])),
                train_images=int(train_f.shape[0]),
                val_images=acc.n,
                seconds=time.perf_counter() - started,
                top5_k=acc.top5_k,
            )
        shared: KnnReading = dist.broadcast_object(reading)
        return shared

    def _features(
        self, backbone: nn.Module, images: LabelledImages, feature_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return extract_features(
                backbone,
                images,
                normalize=self.normalize,
                device=self.device,
                batch_size=FEATURE_BATCH,
                feature_dim=feature_dim,
                workers=self.workers,
            )
        except ValueError:
            raise MonitorError(
                f"none of the {len(images)} images under {self.split.root} could be decoded"
            ) from None
