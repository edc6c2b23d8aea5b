"""The end of a run: the backbone export and ``summary.json``, the run's commit marker, written last."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swavctl.config import Settings
from swavctl.distributed import dist
from swavctl.eval.monitor import KnnReading
from swavctl.files.atomic import write_json_atomic
from swavctl.model.swav import SwAV
from swavctl.train.profiling import WARMUP_STEPS, StepProfiler
from swavctl.train.report import Reporter
from swavctl.train.run_dir import SUMMARY_FILE
from swavctl.train.state import Progress
from swavctl.weights.init_weights import init_summary

BACKBONE_FILE = "backbone.safetensors"


@dataclass
class Summary:
    out_dir: str
    steps: int
    epochs_done: float
    final_loss: float | None
    samples_per_s: float
    skipped_images: int
    images: int
    checkpoint: str | None
    backbone: str | None
    resumed_from_step: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "extra"}
        data.update(self.extra)
        return data


def profile_note(profiler: StepProfiler | None, reporter: Reporter) -> None:
    """Say where the step profile went, or why none was written."""
    if profiler is None:
        return
    if profiler.written:
        reporter.info(f"profile of {profiler.steps} steps: {profiler.out_dir}/phases.txt")
    else:
        reporter.warn(
            f"train.profile_steps={profiler.steps}: the run ended before step "
            f"{WARMUP_STEPS + profiler.steps} of this process, so no profile was written"
        )


def run_summary(
    run_dir: Path,
    progress: Progress,
    settings: Settings,
    *,
    steps_per_epoch: int,
    total_steps: int,
    images: int,
    elapsed: float,
    final_checkpoint: Path | None,
    knn: KnnReading | None,
    made: dict[str, Any],
) -> Summary:
    """The summary of a run that reached ``progress.step``; ``made`` is its provenance record."""
    extra: dict[str, Any] = {
        "world_size": dist.world_size(),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "provenance": made,
        **init_summary(settings),
    }
    if knn is not None:
        extra["knn"] = knn.as_dict()
    step = progress.step
    return Summary(
        out_dir=str(run_dir),
        steps=step,
        epochs_done=step / steps_per_epoch,
        final_loss=progress.last_loss,
        samples_per_s=progress.samples_seen / elapsed if elapsed > 0 else 0.0,
        skipped_images=progress.skipped_images,
        images=images,
        checkpoint=str(final_checkpoint) if final_checkpoint else None,
        backbone=str(run_dir / BACKBONE_FILE),
        resumed_from_step=progress.resumed_from,
        extra=extra,
    )


def write_results(model: SwAV, summary: Summary, settings: Settings, *, steps_per_epoch: int) -> None:
    """Rank 0 exports the backbone, then commits the run with ``summary.json``; all ranks wait."""
    if dist.is_main():
        from swavctl.weights.export import write_export

        write_export(
            model,
            Path(summary.backbone or BACKBONE_FILE),
            settings=settings,
            step=summary.steps,
            epoch=summary.steps // steps_per_epoch,
            with_head=False,
            extra={"provenance": json.dumps(summary.extra["provenance"])},
        )
        write_json_atomic(Path(summary.out_dir) / SUMMARY_FILE, summary.as_dict())
    dist.barrier()
