"""Profiling a few training steps: where does a step's time go?

With ``train.profile_steps = N`` (> 0), rank 0 runs :mod:`torch.profiler` over N steps after
:data:`WARMUP_STEPS` steps of this process (so cuDNN autotuning, compilation and the loader's
start are left out) and writes ``OUT/profile/``:

- ``phases.txt``: the loop's phases (:data:`PHASES`, marked with ``record_function``) with their
  CPU time and, on a GPU, the device time of the kernels launched inside each;
- ``ops.txt``: the operators by self time (device time on a GPU, CPU time otherwise);
- ``trace.json``: the Chrome / Perfetto trace of the profiled steps.

Without the setting the phase marks cost one ``record_function`` each per step, which is a few
microseconds when no profiler is active. The ``augment`` phase (decode, then augment or copy to the
device) runs inside ``data_wait`` without prefetching; with ``data.prefetch`` > 0 it runs on the
prefetch thread, which the profiler does not record.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile, record_function

#: Steps of this process before the profiled ones.
WARMUP_STEPS = 3
#: The loop's phase marks, in order.
PHASES = (
    "swavctl.data_wait",
    "swavctl.augment",
    "swavctl.forward",
    "swavctl.loss",
    "swavctl.backward",
    "swavctl.checks",
    "swavctl.optimizer",
    "swavctl.monitor",  # only on the steps the k-NN monitor scores (monitor.knn_data)
    "swavctl.bookkeeping",
)


def phase(name: str) -> AbstractContextManager[Any]:
    """Mark a phase of the step (``name`` without the ``swavctl.`` prefix) for the profiler."""
    full = f"swavctl.{name}"
    if full not in PHASES:
        raise ValueError(f"unknown phase {name!r}")
    return record_function(full)


class StepProfiler:
    """Profiles the ``steps`` steps after ``WARMUP_STEPS``; call :meth:`step` after each step."""

    def __init__(self, out_dir: Path, *, steps: int, device_type: str) -> None:
        self.out_dir = out_dir
        self.device_type = device_type
        self.steps = steps
        self.written = False
        self._done = 0  # steps of this process so far
        activities = [ProfilerActivity.CPU]
        if device_type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profile = profile(activities=activities, record_shapes=False)
        self._active = False
        if WARMUP_STEPS == 0:
            self._start()

    def _start(self) -> None:
        self._profile.start()
        self._active = True

    def step(self) -> None:
        """Mark the end of a training step."""
        self._done += 1
        if self._done == WARMUP_STEPS and not self._active:
            self._start()
        elif self._active and self._done == WARMUP_STEPS + self.steps:
            self._profile.stop()
            self._active = False
            self._write()

    def close(self) -> None:
        """Stop an unfinished profile without writing it (the run ended first)."""
        if self._active:
            self._active = False
            self._profile.stop()

    def _write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        on_device = self.device_type == "cuda"
        sort_key = "self_cuda_time_total" if on_device else "self_cpu_time_total"
        averages = self._profile.key_averages()
        (self.out_dir / "ops.txt").write_text(averages.table(sort_by=sort_key, row_limit=40) + "\n")
        (self.out_dir / "phases.txt").write_text(phase_table(averages, self.steps, on_device=on_device))
        self._profile.export_chrome_trace(str(self.out_dir / "trace.json"))
        self.written = True


def phase_table(averages: Any, steps: int, *, on_device: bool) -> str:
    """Milliseconds per step of each phase mark (CPU, and device time of its kernels on a GPU)."""
    rows = {event.key: event for event in averages if event.key in PHASES}
    header = "phase                  cpu ms/step" + ("  device ms/step" if on_device else "")
    lines = [f"profiled steps: {steps}", header]
    for name in PHASES:
        event = rows.get(name)
        if event is None:
            continue
        cpu = event.cpu_time_total / 1000 / steps
        line = f"{name.removeprefix('swavctl.'):<22} {cpu:11.2f}"
        if on_device:
            # Kernels launched inside the mark (including those of the ops it contains).
            device_us = float(getattr(event, "device_time_total", 0.0) or 0.0)
            line += f"  {device_us / 1000 / steps:14.2f}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def maybe_profiler(out_dir: Path, *, steps: int, device_type: str, main: bool) -> StepProfiler | None:
    """A :class:`StepProfiler` on rank 0 when ``steps`` > 0, else None."""
    if steps <= 0 or not main:
        return None
    return StepProfiler(out_dir, steps=steps, device_type=device_type)
