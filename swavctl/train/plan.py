"""What a pretraining run settles before it builds anything: device, data, run folder, warnings.

Every rank calls :func:`plan_run`; rank 0 chooses and locks the run folder and the others follow,
so bad input is refused on every rank alike, before a model exists.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from swavctl.config import Settings
from swavctl.config.method_settings import DEEPCLUSTER_V2, SWAV
from swavctl.data.demo import resolve_data_path
from swavctl.data.sampler import steps_per_epoch
from swavctl.distributed import dist
from swavctl.distributed.device import pick_devices
from swavctl.errors import UserError, messages
from swavctl.eval.monitor import monitor_split
from swavctl.eval.splits import EvalSplit
from swavctl.files.atomic import probe_writable
from swavctl.files.image_folder import list_images, resolve_image_root
from swavctl.objective.queue import queue_length_per_rank
from swavctl.train.precision import check_precision
from swavctl.train.recipe_fit import batch_mismatch_note
from swavctl.train.report import Reporter
from swavctl.train.run_dir import (
    finished_latest_note,
    run_lock,
    select_run_dir,
    set_aside_earlier_run,
    unfinished_latest_note,
)
from swavctl.train.schedule import schedule_conflicts


def busy_cpu_note(load_average: float, cores: int, threads: int) -> str | None:
    """A warning when torch's CPU threads will compete with other work for too few cores.

    Measured on the 2-core demo machine under a load of 3 to 6: two torch threads spin-waiting on
    each other ran the demo's steps about 4 times slower than one thread (8 min 22 s for 365 steps,
    then 62 s for the other 185 with OMP_NUM_THREADS=1; 2.7 times in docs/benchmarks.md's earlier
    measurement: 6 min 24 s against about 140 s). None when
    torch uses one thread, or when the load (the last minute's runnable tasks, before this run
    adds its own) is below the core count.
    """
    if threads <= 1 or load_average < cores:
        return None
    return (
        f"the CPU is busy (load average {load_average:.1f} on {cores} cores) and torch uses {threads} "
        "threads, which then spin-wait on each other; OMP_NUM_THREADS=1 can run several times faster"
    )


def data_paths(settings: Settings, reporter: Reporter) -> tuple[Path, list[Path]]:
    if not settings.data.path:
        raise UserError("no data: pass --data DIR (or --data demo, or --preset demo)")
    folder, used_train = resolve_image_root(resolve_data_path(settings.data.path))
    if used_train:
        reporter.info(f"found train/ in {folder.parent}: pretraining on {folder}")
    paths = list_images(folder)
    if settings.data.max_images:
        paths = paths[: settings.data.max_images]
    return folder, paths


def _unwritable(run_dir: Path) -> str | None:
    """Why files cannot be written in ``run_dir`` (None when they can); a new folder is left absent."""
    existed = run_dir.exists()
    try:
        probe_writable(run_dir)
        if not existed:
            run_dir.rmdir()  # made for real once the run starts
    except OSError as exc:
        if run_dir.is_file():
            return messages.output_is_file(run_dir)
        return messages.output_not_writable(run_dir, exc.strerror or exc)
    return None


@dataclass
class RunPlan:
    """What a run settles before it builds anything: device, data, run folder, schedule."""

    settings: Settings  # with ``out`` set to the run folder
    device: torch.device
    image_root: Path
    paths: list[Path]
    knn_split: EvalSplit | None  # the k-NN monitor's labelled data
    steps_per_epoch: int
    run_dir: Path
    queue_per_rank: int


def plan_run(settings: Settings, *, reporter: Reporter, fresh: bool, held: contextlib.ExitStack) -> RunPlan:
    """Check the input, choose and lock the run folder, and warn about the schedule (every rank)."""
    world = dist.world_size()

    def warn_all(message: str) -> None:
        if dist.is_main():
            reporter.warn(message)

    device = pick_devices(settings.dist.gpus)[0]
    check_precision(settings, device)
    if device.type == "cpu" and dist.is_main() and hasattr(os, "getloadavg"):
        busy = busy_cpu_note(os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads() * world)
        if busy:
            reporter.warn(busy)
    image_root, paths = data_paths(settings, reporter)
    knn_split = monitor_split(settings)  # a bad monitor.knn_data is refused before anything starts
    global_batch = settings.train.batch_size * world
    steps_epoch = steps_per_epoch(len(paths), settings.train.batch_size, world)
    if steps_epoch == 0:
        raise UserError(
            f"{len(paths)} images under {image_root} are fewer than one global batch of {global_batch}; "
            "lower --batch-size"
        )

    if dist.is_main():
        note = finished_latest_note(settings, fresh=fresh) or unfinished_latest_note(settings, fresh=fresh)
        if note:
            reporter.info(note)
    run_dir, reused = select_run_dir(settings, fresh=fresh)
    # Rank 0 decides the folder (it may be a new time-stamped one); the others follow.
    run_dir, reused = dist.broadcast_object((run_dir, reused))
    settings = settings.model_copy(update={"out": str(run_dir)})
    problem = dist.broadcast_object(_unwritable(run_dir) if dist.is_main() else None)
    if problem:
        raise UserError(problem)
    in_use = None
    if dist.is_main():
        try:
            held.enter_context(run_lock(run_dir, reporter.warn))  # one run per folder, until it ends
        except UserError as exc:
            in_use = str(exc)
    in_use = dist.broadcast_object(in_use)
    if in_use:
        raise UserError(in_use)
    if reused:
        reporter.info(f"re-running the unfinished run in {run_dir}")
    if fresh and dist.is_main():
        aside = set_aside_earlier_run(run_dir)
        if aside is not None:
            reporter.warn(f"--fresh: the earlier run's files moved to {aside}")
    dist.barrier()

    queue_per_rank = queue_length_per_rank(settings, world, warn_all)
    for conflict in schedule_conflicts(
        steps_per_epoch=steps_epoch,
        epochs=settings.train.epochs,
        warmup_epochs=settings.optim.warmup_epochs,
        # DeepCluster-v2's prototypes never take a gradient: its freeze setting is unused.
        freeze_prototypes_steps=0
        if settings.method == DEEPCLUSTER_V2
        else settings.swav.freeze_prototypes_steps,
        queue_length=settings.swav.queue_length,
        queue_start_epoch=settings.swav.queue_start_epoch,
    ):
        warn_all(conflict)
    batch_note = batch_mismatch_note(
        settings.preset, batch_size=settings.train.batch_size, world=world, arch=settings.model.arch
    )
    if batch_note:
        warn_all(batch_note)
    prototypes = settings.model.prototypes  # SwAV's one set (several are the other methods')
    online = settings.method == SWAV  # the others' codes are over the whole bank, not the batch
    if online and isinstance(prototypes, int) and global_batch + settings.swav.queue_length < prototypes:
        warn_all(
            f"global batch {global_batch} + queue {settings.swav.queue_length} < {prototypes} "
            "prototypes: the equal-partition constraint cannot fill every prototype each step and clusters "
            "will go empty; use a larger batch, a queue, or fewer prototypes"
        )
    return RunPlan(settings, device, image_root, paths, knn_split, steps_epoch, run_dir, queue_per_rank)
