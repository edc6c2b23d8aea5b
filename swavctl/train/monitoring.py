"""Monitoring during pretraining: the k-NN monitor's readings, when they are due, and their lines.

With ``monitor.knn_data`` set, the backbone is scored by :class:`~swavctl.eval.monitor.KnnMonitor`
after the epochs it is due and after the run's last step; each reading goes into that step's
metrics line and one progress line. A split that cannot be scored (every image unreadable) stops
the monitoring with a warning, and the training goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from swavctl.config import Settings
from swavctl.eval.monitor import KnnMonitor, KnnReading, MonitorError
from swavctl.eval.splits import EvalSplit
from swavctl.model.swav import SwAV
from swavctl.train.profiling import phase


class Monitoring:
    """The run's k-NN monitor (none without ``monitor.knn_data``) and its latest reading.

    ``warn_all`` is a warning every rank reaches alike (the features are gathered, so a
    :class:`MonitorError` is the same on every rank).
    """

    def __init__(
        self,
        settings: Settings,
        split: EvalSplit | None,
        *,
        device: torch.device,
        warn_all: Callable[[str], None],
    ) -> None:
        self.monitor = (
            KnnMonitor(settings, split, device=device, workers=settings.data.workers)
            if split is not None
            else None
        )
        self.warn_all = warn_all
        self.last: KnnReading | None = None

    def after_step(
        self, model: SwAV, step: int, *, steps_per_epoch: int, total_steps: int
    ) -> KnnReading | None:
        """The reading after ``step`` when one is due, else None."""
        if self.monitor is None or not self.monitor.due(step, steps_per_epoch, total_steps):
            return None
        with phase("monitor"):
            return self._read(model, "k-NN monitoring stops, training goes on")

    def final_reading(self, model: SwAV) -> None:
        """Score the saved weights once (a run resumed at its end, where no step ran)."""
        if self.monitor is not None:
            self.last = self._read(model, "the summary has no k-NN reading") or self.last

    def _read(self, model: SwAV, consequence: str) -> KnnReading | None:
        assert self.monitor is not None
        try:
            return self.monitor.evaluate(model.backbone, feature_dim=model.feature_dim)
        except MonitorError as exc:
            self.warn_all(f"monitor.knn_data: {exc}; {consequence}")
            self.monitor = None
            return None

    def record(self, reading: KnnReading, record: dict[str, Any], *, step: int, steps_per_epoch: int) -> str:
        """Keep ``reading`` as the latest, add it to the step's metrics ``record``, and return its
        progress line."""
        self.last = reading
        record["knn_top1"] = reading.top1
        record["knn_top5"] = reading.top5
        return (
            f"step {step} ({step / steps_per_epoch:.3g} epochs): {reading.k}-NN top-1 "
            f"{100 * reading.top1:.2f}% top-{reading.top5_k} {100 * reading.top5:.2f}% "
            f"on {reading.val_images} val images ({reading.seconds:.1f} s)"
        )
