"""The pretraining loop: data, model, optimizer, resume, steps, checkpoints and the final export.

Devices, DDP, autocast and checkpoints are handled here, at the edge; the model and the math
modules know nothing of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from swavctl import dist
from swavctl.config import Settings, to_toml
from swavctl.data.dataset import Batch, pretrain_dataset, pretrain_loader, refuse_skipped, sample_seed
from swavctl.data.demo import resolve_data_path
from swavctl.data.images import list_images, resolve_image_root
from swavctl.data.sampler import EpochBatchSampler, steps_per_epoch
from swavctl.errors import UserError
from swavctl.eval.monitor import KnnMonitor, KnnReading, MonitorError, monitor_split
from swavctl.model.swav import SwAV
from swavctl.queue import EmbeddingQueue, queue_length_per_rank
from swavctl.safe_io import probe_writable, write_text_atomic
from swavctl.train import checkpoint as ckpt
from swavctl.train import rng
from swavctl.train.agreement import agree_on_step_start, read_step
from swavctl.train.build import augment_spec, build_model, build_optimizer, crop_specs
from swavctl.train.device_batch import batch_crops, decode_batch
from swavctl.train.health import CollapseDetector, MetricsLog, code_statistics
from swavctl.train.prefetch import Prefetcher, side_stream
from swavctl.train.profiling import WARMUP_STEPS, maybe_profiler, phase
from swavctl.train.run_dir import (
    RESOLVED_FILE,
    SUMMARY_FILE,
    finished_latest_note,
    incompatible_changes,
    point_latest,
    read_resolved,
    run_lock,
    select_run_dir,
    set_aside_earlier_run,
    settings_diff,
)
from swavctl.train.schedule import learning_rate, schedule_conflicts
from swavctl.train.step import freeze_prototype_grads, grads_finite, swav_loss_from_outputs
from swavctl.train.stop import EXIT_SIGNAL, STOP_SIGNALS, StopFlag
from swavctl.train.sync_batchnorm import convert_sync_batchnorm

# Test hooks (environment variables, read once per run). They exist so the fault tests can make a
# real run fail in a chosen way; they do nothing unless set.
#   SWAVCTL_TEST_NAN_AT="RANK:STEP"    multiply the loss by NaN on RANK at optimizer step STEP (1-based)
#   SWAVCTL_TEST_RAISE_AT="RANK:STEP"  raise RuntimeError on RANK at optimizer step STEP
#   SWAVCTL_TEST_STEP_SLEEP="SECONDS"  sleep after every step (so a test can signal mid-run)
HOOK_NAN = "SWAVCTL_TEST_NAN_AT"
HOOK_RAISE = "SWAVCTL_TEST_RAISE_AT"
HOOK_SLEEP = "SWAVCTL_TEST_STEP_SLEEP"


class Reporter(Protocol):
    """What the loop tells the outside world (the CLI renders it)."""

    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def start(self, total_steps: int, done_steps: int) -> None: ...
    def step(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class QuietReporter:
    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def start(self, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, requeue: str | None = None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.requeue = requeue
        self.exit_code = EXIT_SIGNAL.get(signal.Signals(signum), 128 + signum)
        name = signal.Signals(signum).name
        message = f"stopped by {name} at step {step}; checkpoint {checkpoint}"
        if requeue:
            message += f"; {requeue}"
        super().__init__(message)


class NonFiniteError(Exception):
    """Loss or gradients became NaN/Inf; the last good checkpoint stays."""


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


# ---------------------------------------------------------------------------------------------


def pick_device(settings: Settings) -> torch.device:
    gpus = settings.dist.gpus
    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    if gpus > 0:
        if not torch.cuda.is_available():
            raise UserError(f"--gpus {gpus} asked for, but CUDA is not available (use --gpus 0 for the CPU)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def autocast_dtype(settings: Settings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = full fp32). The CPU always runs fp32."""
    if device.type != "cuda" or settings.train.precision == "fp32":
        return None
    return torch.float16 if settings.train.precision == "fp16" else torch.bfloat16


def _data_paths(settings: Settings, reporter: Reporter) -> tuple[Path, list[Path]]:
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
        return f"cannot write the run folder {run_dir}: {exc.strerror or exc}"
    return None


def _export_backbone(model: SwAV, path: Path, settings: Settings, step: int, epoch: int) -> None:
    from swavctl.export import write_export

    write_export(model, path, settings=settings, step=step, epoch=epoch, with_head=False)


def _parse_hook(name: str) -> tuple[int, int] | None:
    """A ``RANK:STEP`` test hook from the environment (see the constants at the top), or None."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        rank_text, step_text = text.split(":")
        return int(rank_text), int(step_text)
    except ValueError:
        raise UserError(f"{name} must be RANK:STEP, got {text!r}") from None


def _hook_sleep() -> float:
    text = os.environ.get(HOOK_SLEEP, "").strip()
    try:
        return float(text) if text else 0.0
    except ValueError:
        raise UserError(f"{HOOK_SLEEP} must be a number of seconds, got {text!r}") from None


def pretrain(
    settings: Settings,
    *,
    reporter: Reporter | None = None,
    fresh: bool = False,
    on_step: Callable[[int], None] | None = None,
    stop: StopFlag | None = None,
) -> Summary:
    """Run (or resume) SwAV pretraining with ``settings``; returns the run's summary.

    See :func:`_pretrain`; the run folder's lock (:func:`run_lock`) is released when it returns
    or raises.
    """
    with contextlib.ExitStack() as held:
        return _pretrain(settings, reporter=reporter, fresh=fresh, on_step=on_step, stop=stop, held=held)


def _pretrain(
    settings: Settings,
    *,
    reporter: Reporter | None,
    fresh: bool,
    on_step: Callable[[int], None] | None,
    stop: StopFlag | None,
    held: contextlib.ExitStack,
) -> Summary:
    """Run (or resume) SwAV pretraining with ``settings``; returns the run's summary.

    With a process group initialized (see :mod:`swavctl.dist`), every rank calls this; the model
    is wrapped in DDP here, at the edge, and rank 0 alone writes files. ``stop`` is a
    :class:`StopFlag` the caller installed already (a launcher does so before the group exists);
    without one, the handlers are installed for the duration of the loop.

    Raises :class:`UserError` for bad input (on every rank), :class:`Interrupted` after a
    signal-triggered checkpoint, :class:`NonFiniteError` when the loss or gradients stop being
    finite, and :class:`~swavctl.train.checkpoint.CheckpointWriteError` when a checkpoint cannot
    be written (disk full). All ranks raise the same one at the same step.
    """
    reporter = reporter or QuietReporter()
    world, rank = dist.world_size(), dist.rank()

    def warn_all(message: str) -> None:
        """A warning every rank reaches alike: printed once, by rank 0."""
        if dist.is_main():
            reporter.warn(message)

    device = pick_device(settings)
    if device.type == "cpu" and dist.is_main() and hasattr(os, "getloadavg"):
        busy = busy_cpu_note(os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads() * world)
        if busy:
            reporter.warn(busy)
    hook_nan, hook_raise, hook_sleep = _parse_hook(HOOK_NAN), _parse_hook(HOOK_RAISE), _hook_sleep()
    image_root, paths = _data_paths(settings, reporter)
    knn_split = monitor_split(settings)  # a bad monitor.knn_data is refused before anything starts
    global_batch = settings.train.batch_size * world
    steps_epoch = steps_per_epoch(len(paths), settings.train.batch_size, world)
    if steps_epoch == 0:
        raise UserError(
            f"{len(paths)} images under {image_root} are fewer than one global batch of {global_batch}; "
            "lower --batch-size"
        )

    if dist.is_main():
        note = finished_latest_note(settings, fresh=fresh)
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
        freeze_prototypes_steps=settings.swav.freeze_prototypes_steps,
        queue_length=settings.swav.queue_length,
        queue_start_epoch=settings.swav.queue_start_epoch,
    ):
        warn_all(conflict)
    if global_batch + settings.swav.queue_length < settings.model.prototypes:
        warn_all(
            f"global batch {global_batch} + queue {settings.swav.queue_length} < {settings.model.prototypes} "
            "prototypes: the equal-partition constraint cannot fill every prototype each step and clusters "
            "will go empty; use a larger batch, a queue, or fewer prototypes"
        )

    # ----- model and optimizer
    rng.seed_host(settings.train.seed, rank)  # python and numpy: saved in checkpoints, so seeded too
    model = build_model(settings)
    bn_group = settings.dist.sync_batchnorm_group
    if world > 1 and settings.dist.sync_batchnorm and bn_group != 1:  # a group of 1 is plain BatchNorm
        model = convert_sync_batchnorm(  # type: ignore[assignment]
            model, device_type=device.type, process_group=dist.subgroups(bn_group)
        )
    model.to(device)
    # On the CPU too: NCHW max pooling with indices was 21x slower than NHWC (convnet-tiny, 16 px),
    # and a ResNet-50 step 1.2x slower.
    channels_last = settings.train.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = build_optimizer(model, settings)
    sgd = optimizer.optim
    amp_dtype = autocast_dtype(settings, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    queue = (
        EmbeddingQueue(len(settings.swav.assignment_crops), queue_per_rank, settings.model.embedding_dim).to(
            device
        )
        if queue_per_rank
        else None
    )
    health = CollapseDetector(
        settings.model.prototypes,
        tolerance=settings.health.collapse_tolerance,
        patience=settings.health.collapse_patience,
        warmup_steps=round(settings.optim.warmup_epochs * steps_epoch),
    )

    # ----- resume: rank 0 picks the newest checkpoint that verifies; every rank loads that one
    step = 0
    skipped_total = 0
    resumed_from: int | None = None
    last_checkpoint: Path | None = None
    found = ckpt.latest_checkpoint(run_dir, warn=reporter.warn) if dist.is_main() else None
    chosen = dist.broadcast_object(found[0].step if found is not None else None)
    if chosen is not None:
        if found is not None:
            checkpoint, state = found
        else:
            checkpoint = ckpt.checkpoint_at(run_dir, chosen)
            state = ckpt.load_state(checkpoint.state_path)
        saved = state.get("settings")
        # The checkpoint's own settings decide what its state means: resolved.toml is rewritten at
        # every start, and an edited (or, before atomic writes, a truncated) one must not. It is
        # only the fallback for a checkpoint that carries no settings.
        previous: Settings | None
        if isinstance(saved, str):
            from swavctl.config import from_toml_text

            previous = from_toml_text(saved, source=str(checkpoint.state_path))
        else:
            previous = read_resolved(run_dir)
        if previous is not None:
            incompatible = incompatible_changes(
                previous, settings, old_world=int(state.get("world_size", 1)), new_world=world
            )
            if incompatible:
                listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in incompatible.items())
                raise UserError(
                    f"cannot resume {run_dir}: settings changed the meaning of the saved state ({listing}); "
                    "use --fresh to start over or another --out"
                )
            changed = settings_diff(previous, settings)
            if changed:
                warn_all("resuming with changed settings: " + ", ".join(sorted(changed)))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if queue is not None and state.get("queues") is not None:
            queue.load_state_dict(state["queues"][rank])
        health.load_state_dict(state["health"])
        saved_rng = state["rng"]
        if isinstance(saved_rng, dict):
            rng.restore(saved_rng)
        elif rank < len(saved_rng):
            rng.restore(saved_rng[rank])
        step = int(state["step"])
        saved_steps_epoch = int(state.get("steps_per_epoch", steps_epoch))
        if saved_steps_epoch != steps_epoch:
            # The world size or the data changed: keep the epoch and the fraction done of it.
            epoch_saved, batch_saved = divmod(step, saved_steps_epoch)
            step = epoch_saved * steps_epoch + batch_saved * steps_epoch // saved_steps_epoch
            warn_all(
                f"steps per epoch changed from {saved_steps_epoch} to {steps_epoch} (world size or data "
                f"changed): resuming in epoch {epoch_saved} at batch {step - epoch_saved * steps_epoch}; "
                "this is not an exact continuation of the saved run"
            )
        skipped_total = int(state.get("skipped_images", 0))
        resumed_from = step
        last_checkpoint = checkpoint.state_path
        reporter.info(f"resuming from {checkpoint.state_path} (step {step})")
        del state

    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / RESOLVED_FILE, to_toml(settings))
        try:
            point_latest(run_dir)
        except OSError as exc:  # a convenience link: the run does not need it
            reporter.warn(f"could not point runs/latest at {run_dir}: {exc.strerror or exc}")
        (run_dir / SUMMARY_FILE).unlink(missing_ok=True)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    if dist.is_main():
        metrics.truncate_after(step)
    dist.barrier()

    train_model: nn.Module = model
    if world > 1:
        # Prototype freezing drops the prototypes' gradients *after* backward (they are still
        # used in forward), so DDP never needs find_unused_parameters.
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if settings.train.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    crops = crop_specs(settings)
    augment = augment_spec(settings.data.augment)
    dataset = pretrain_dataset(
        paths,
        seed=settings.train.seed,
        crops=crops,
        augment=augment,
        augment_on=settings.data.augment_on,
        device=device,
    )

    total_steps = steps_epoch * settings.train.epochs
    if settings.train.max_steps is not None:
        total_steps = min(total_steps, settings.train.max_steps)
    num_crops = len(crops)
    bs = settings.train.batch_size
    prefetch_depth = settings.data.prefetch
    if prefetch_depth is None:
        prefetch_depth = 1 if device.type == "cuda" else 0
    prefetch_stream = side_stream(device) if prefetch_depth > 0 else None  # one for every epoch
    last_loss: float | None = None
    monitor = (
        KnnMonitor(settings, knn_split, device=device, workers=settings.data.workers)
        if knn_split is not None
        else None
    )
    last_knn: KnnReading | None = None
    warned_cpu_decode = False
    checkpoint_step = step if resumed_from is not None else -1
    samples_seen = 0
    started = time.perf_counter()
    reporter.start(total_steps, step)
    reporter.info(
        f"{len(paths)} images, {steps_epoch} steps/epoch, global batch {global_batch}, "
        f"{num_crops} crops {settings.data.crop_counts}x{settings.data.crop_sizes}, "
        f"device {device}, world {world}"
    )

    def checkpoint_due(step_done: int) -> bool:
        """A checkpoint after every epoch's last step and every ``checkpoint.every_steps`` steps."""
        return step_done % steps_epoch == 0 or step_done % settings.checkpoint.every_steps == 0

    def save(epoch_now: int, reason: str) -> Path | None:
        """Gather every rank's state, let rank 0 write and commit it, and agree on the outcome."""
        nonlocal last_checkpoint, checkpoint_step
        if checkpoint_step == step:
            return last_checkpoint
        gathered_rng = dist.gather_objects(rng.capture())
        gathered_queue = dist.gather_objects(queue.state_dict()) if queue is not None else None
        failure: tuple[str, str, int | None] | None = None
        if dist.is_main():
            state = {
                "format": ckpt.FORMAT,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "queues": gathered_queue,
                "health": health.state_dict(),
                "rng": gathered_rng,
                "step": step,
                "epoch": epoch_now,
                "steps_per_epoch": steps_epoch,
                "world_size": world,
                "skipped_images": skipped_total,
                "settings": to_toml(settings),
                "reason": reason,
            }
            try:
                ckpt.save_checkpoint(run_dir, step, epoch_now, state, keep=settings.checkpoint.keep)
            except ckpt.CheckpointWriteError as exc:
                failure = ("write", str(exc), exc.errno)
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                if not dist.is_distributed():
                    raise
                failure = (
                    "other",
                    f"rank 0 could not save the checkpoint: {type(exc).__name__}: {exc}",
                    None,
                )
        # Doubles as the barrier: no rank goes on before the commit (or the failure) is known.
        failure = dist.broadcast_object(failure)
        if failure is not None:
            kind, message, errno = failure
            if kind == "write":
                raise ckpt.CheckpointWriteError(message, errno)
            raise RuntimeError(message)
        last_checkpoint = run_dir / ckpt.CHECKPOINT_DIR / f"step-{step:09d}.pt"
        checkpoint_step = step
        return last_checkpoint

    owns_stop = stop is None
    stop_flag = stop or StopFlag()
    if owns_stop:
        stop_flag.install()
    profiler = maybe_profiler(
        run_dir / "profile", steps=settings.train.profile_steps, device_type=device.type, main=dist.is_main()
    )
    stop_flag.watching = True  # from here a signal is acted on at the next step boundary
    try:
        while step < total_steps:
            epoch, batch_in_epoch = divmod(step, steps_epoch)
            seen_before = samples_seen
            sampler = EpochBatchSampler(
                len(dataset),
                batch_size=bs,
                epoch=epoch,
                seed=settings.train.seed,
                rank=rank,
                world_size=world,
                start_batch=batch_in_epoch,
            )
            active_queue = None if epoch < settings.swav.queue_start_epoch else queue
            loader = pretrain_loader(
                dataset,
                sampler,
                workers=settings.data.workers,
                device=device,
                seed=sample_seed(settings.train.seed, epoch, -1 - rank),
            )

            def prepare(
                batch: Batch, index: int, epoch: int = epoch, first_step: int = step
            ) -> tuple[Batch, list[torch.Tensor] | None]:
                """Decode, then augment or copy to the device: the crops of step first_step + index."""
                with phase("augment"):
                    if batch.images is not None:
                        batch = decode_batch(batch, dataset.paths, device)
                    if batch.size == 0:
                        return batch, None
                    crops_t = batch_crops(
                        batch, crops, augment, device, settings.train.seed, epoch, first_step + index, rank
                    )
                    if channels_last:
                        crops_t = [c.contiguous(memory_format=torch.channels_last) for c in crops_t]
                    return batch, crops_t

            wait_start = time.perf_counter()
            prefetcher = Prefetcher(
                iter(loader), prepare, device=device, depth=prefetch_depth, stream=prefetch_stream
            )
            try:
                while step < total_steps:
                    with phase("data_wait"):
                        try:
                            ready = next(prefetcher)
                        except StopIteration:
                            break
                    batch = ready.batch
                    data_wait = time.perf_counter() - wait_start
                    step_start = time.perf_counter()
                    if settings.data.on_bad_image == "error":
                        refuse_skipped(batch)
                    for bad in batch.skipped:
                        reporter.warn(f"skipped unreadable file {bad.path}: {bad.reason}")
                    if batch.cpu_decoded and not warned_cpu_decode:
                        warned_cpu_decode = True  # once: it can be every batch (nvjpeg missing)
                        reporter.warn(
                            f"nvjpeg could not decode {batch.cpu_decoded} of a batch's {batch.size} JPEGs; "
                            "they were decoded on the CPU (slower; CMYK or unusual JPEGs do this)"
                        )
                    # One small collective per step: signals, empty batches, the global batch, skips.
                    start = agree_on_step_start(stop_flag, batch.size, len(batch.skipped), device)
                    signals, any_empty = start.signals, start.any_empty
                    skipped_total += start.skipped
                    if signals:
                        signum = next(s for s in STOP_SIGNALS if s in signals)
                        path = save(step // steps_epoch, f"signal {signal.Signals(signum).name}")
                        requeue = None
                        if signal.SIGUSR1 in signals and dist.is_main() and _in_slurm_job():
                            requeue = dist.requeue_slurm_job()  # once, after the checkpoint committed
                            reporter.info(requeue)
                        raise Interrupted(signum, step, path, requeue)
                    if any_empty:
                        # Every file of some rank's batch was unreadable: all ranks skip the step together
                        # (the epoch-end checkpoint still comes, as after a trained step).
                        step += 1
                        if checkpoint_due(step):
                            save(step // steps_epoch, "periodic")
                        wait_start = time.perf_counter()
                        continue
                    if hook_raise is not None and hook_raise == (rank, step + 1):
                        raise RuntimeError(
                            f"injected failure on rank {rank} at step {step + 1} ({HOOK_RAISE})"
                        )
                    assert ready.crops is not None  # a non-empty batch (empty ones are skipped above)
                    crops_t = ready.crops
                    lr = learning_rate(
                        step,
                        steps_per_epoch=steps_epoch,
                        epochs=settings.train.epochs,
                        base_lr=settings.optim.base_lr,
                        final_lr=settings.optim.final_lr,
                        warmup_epochs=settings.optim.warmup_epochs,
                        start_warmup_lr=settings.optim.start_warmup_lr,
                    )
                    for group in sgd.param_groups:
                        group["lr"] = lr
                    with phase("forward"):
                        model.normalize_prototypes()
                        with torch.autocast(
                            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                        ):
                            embeddings, scores = train_model(crops_t)
                    with phase("loss"):
                        out = swav_loss_from_outputs(
                            embeddings.float(),
                            scores.float(),
                            batch_size=batch.size,
                            num_crops=num_crops,
                            assignment_crops=settings.swav.assignment_crops,
                            prototypes=model.prototypes.weight,
                            temperature=settings.swav.temperature,
                            epsilon=settings.swav.epsilon,
                            sinkhorn_iterations=settings.swav.sinkhorn_iterations,
                            queue=active_queue,
                        )
                    loss = out.loss
                    if start.images != batch.size * world:
                        # Ranks' batches differ (skipped files): weigh each rank's mean by its share,
                        # so DDP's average over ranks is the mean over the global batch.
                        loss = loss * (batch.size * world / start.images)
                    if hook_nan is not None and hook_nan == (rank, step + 1):
                        loss = loss * float("nan")
                    with phase("backward"):
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        if step < settings.swav.freeze_prototypes_steps:
                            freeze_prototype_grads(model)
                    with phase("checks"):
                        # Checked on every rank with one collective, before the optimizer touches anything.
                        # The step's only read-back to the host (see read_step).
                        grads_ok = (
                            torch.ones((), dtype=torch.bool, device=device)
                            if scaler.is_enabled()  # the scaler skips steps with inf/NaN gradients itself
                            else grads_finite(model)
                        )
                        time_up = bool(
                            settings.train.max_seconds
                            and time.perf_counter() - started > settings.train.max_seconds
                        )
                        readout = read_step(loss, grads_ok, code_statistics(out.codes[0]), time_up=time_up)
                    if readout.bad_loss or readout.bad_grads:
                        what = (
                            f"non-finite loss on rank {_ranks_text(readout.bad_loss)}"
                            if readout.bad_loss
                            else f"non-finite gradients on rank {_ranks_text(readout.bad_grads)}"
                        )
                        raise NonFiniteError(
                            f"{what} at step {step + 1}; stopped before the optimizer step, on every rank; "
                            f"the last good checkpoint is {last_checkpoint or 'none'} "
                            "(try a lower optim.base_lr, or train.precision=fp32)"
                        )
                    with phase("optimizer"):
                        if scaler.is_enabled():
                            scaler.unscale_(sgd)
                            optimizer.step(lambda: scaler.step(sgd))  # skipped by the scaler on inf/NaN
                            scaler.update()
                        else:
                            optimizer.step()
                    step += 1
                    samples_seen += batch.size * world
                    loss_value = readout.loss  # over all ranks, as one process on the global batch
                    last_loss = loss_value
                    step_time = time.perf_counter() - step_start
                    if readout.time_up and step < total_steps:
                        reporter.info(f"train.max_seconds reached at step {step}")
                        total_steps = step  # the monitor's last reading and the final checkpoint come next
                    knn: KnnReading | None = None
                    if monitor is not None and monitor.due(step, steps_epoch, total_steps):
                        with phase("monitor"):
                            try:
                                knn = monitor.evaluate(model.backbone, feature_dim=model.feature_dim)
                            except MonitorError as exc:  # the same on every rank (features are gathered)
                                warn_all(f"monitor.knn_data: {exc}; k-NN monitoring stops, training goes on")
                                monitor = None
                    with phase("bookkeeping"):
                        record = {
                            "step": step,
                            "epoch": epoch,
                            "loss": loss_value,
                            "loss_over_lnk": loss_value / math.log(settings.model.prototypes),
                            "lr": lr,
                            "samples_per_s": batch.size * world / max(step_time + data_wait, 1e-9),
                            "data_wait_fraction": data_wait / max(step_time + data_wait, 1e-9),
                            "code_entropy": readout.code_entropy,
                            "prototypes_used": readout.prototypes_used,
                            "queue_in_use": out.queue_in_use,
                            "skipped_images": skipped_total,
                        }
                        if knn is not None:
                            last_knn = knn
                            record["knn_top1"] = knn.top1
                            record["knn_top5"] = knn.top5
                            reporter.info(
                                f"step {step} ({step / steps_epoch:.3g} epochs): {knn.k}-NN top-1 "
                                f"{100 * knn.top1:.2f}% top-{knn.top5_k} {100 * knn.top5:.2f}% "
                                f"on {knn.val_images} val images ({knn.seconds:.1f} s)"
                            )
                        periodic = step % settings.train.log_every == 0 or step == total_steps
                        if dist.is_main() and (periodic or knn is not None):
                            metrics.append(record)
                        reporter.step(record)
                        warning = health.update(step, loss_value)
                        if warning:
                            warn_all(warning)
                        if on_step is not None:
                            on_step(step)
                        if checkpoint_due(step):
                            save(step // steps_epoch, "periodic")
                    if profiler is not None:
                        profiler.step()
                    if hook_sleep:
                        time.sleep(hook_sleep)
                    wait_start = time.perf_counter()
            finally:
                prefetcher.close()
            del prefetcher, loader
            if batch_in_epoch == 0 and step == (epoch + 1) * steps_epoch and samples_seen == seen_before:
                # A whole epoch of batches whose every file was unreadable (the same on every rank):
                # going on would only save untrained weights that look like a finished run.
                raise UserError(
                    f"no image under {image_root} could be read in epoch {epoch} ({skipped_total} files "
                    "skipped); check --data"
                )
    finally:
        # No step boundary is coming: a signal from here on (the launcher's SIGTERM after a peer
        # died in the final barrier) ends this process at once instead of being recorded.
        stop_flag.watching, stop_flag.finished = False, True
        if profiler is not None:
            profiler.close()
        if owns_stop:
            stop_flag.restore()
    if profiler is not None:
        if profiler.written:
            reporter.info(f"profile of {profiler.steps} steps: {profiler.out_dir}/phases.txt")
        else:
            reporter.warn(
                f"train.profile_steps={profiler.steps}: the run ended before step "
                f"{WARMUP_STEPS + profiler.steps} of this process, so no profile was written"
            )
    if resumed_from is not None and step == resumed_from and step >= total_steps:
        # The saved run was already at its end (stopped after its last checkpoint, before its summary,
        # or the same command run twice): no step ran here, so the summary takes the loss logged at
        # that step, and the monitor reads the saved weights once, as the uninterrupted run did.
        last_loss = dist.broadcast_object(metrics.loss_at(step) if dist.is_main() else None)
        if monitor is not None:
            try:
                last_knn = monitor.evaluate(model.backbone, feature_dim=model.feature_dim)
            except MonitorError as exc:
                warn_all(f"monitor.knn_data: {exc}; the summary has no k-NN reading")
    final_ckpt = save(step // steps_epoch, "final")
    elapsed = time.perf_counter() - started
    backbone_path = run_dir / "backbone.safetensors"
    summary = Summary(
        out_dir=str(run_dir),
        steps=step,
        epochs_done=step / steps_epoch,
        final_loss=last_loss,
        samples_per_s=samples_seen / elapsed if elapsed > 0 else 0.0,
        skipped_images=skipped_total,
        images=len(paths),
        checkpoint=str(final_ckpt) if final_ckpt else None,
        backbone=str(backbone_path),
        resumed_from_step=resumed_from,
        extra={"world_size": world, **({"knn": last_knn.as_dict()} if last_knn is not None else {})},
    )
    if dist.is_main():
        _export_backbone(model, backbone_path, settings, step, step // steps_epoch)
        write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary.as_dict(), indent=1) + "\n")
    dist.barrier()
    reporter.close()
    return summary


def _in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID"))


def _ranks_text(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
