"""The pretraining loop: data, model, optimizer, resume, steps, checkpoints and the final export.

Devices, DDP, autocast and checkpoints are handled here, at the edge; the model and the math
modules know nothing of them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swavctl import dist, provenance, tensorboard_log
from swavctl.config import Settings, to_toml
from swavctl.data.dataset import Batch, pretrain_dataset, pretrain_loader, refuse_skipped, sample_seed
from swavctl.data.sampler import EpochBatchSampler
from swavctl.errors import UserError
from swavctl.eval.monitor import KnnMonitor, KnnReading, MonitorError
from swavctl.init_weights import init_summary, load_init
from swavctl.model.swav import SwAV
from swavctl.queue import EmbeddingQueue
from swavctl.safe_io import write_json_atomic, write_text_atomic
from swavctl.train import checkpoint as ckpt
from swavctl.train import rng
from swavctl.train.agreement import StepReadout, agree_on_step_start, read_step
from swavctl.train.build import build_model, build_optimizer, crop_specs
from swavctl.train.device_batch import batch_crops, decode_batch
from swavctl.train.health import CollapseDetector, MetricsLog, code_statistics, collapsed_loss
from swavctl.train.plan import RunPlan, plan_run
from swavctl.train.precision import autocast_dtype
from swavctl.train.prefetch import Prefetcher, Ready, side_stream
from swavctl.train.profiling import WARMUP_STEPS, maybe_profiler, phase
from swavctl.train.report import QuietReporter, Reporter
from swavctl.train.run_dir import (
    RESOLVED_FILE,
    SUMMARY_FILE,
    incompatible_changes,
    point_latest,
    read_resolved,
    settings_diff,
)
from swavctl.train.schedule import learning_rate
from swavctl.train.step import StepOutputs, freeze_prototype_grads, grads_finite, swav_loss_from_outputs
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


def _export_backbone(
    model: SwAV, path: Path, settings: Settings, step: int, epoch: int, made: dict[str, Any]
) -> None:
    import json

    from swavctl.export import write_export

    write_export(
        model,
        path,
        settings=settings,
        step=step,
        epoch=epoch,
        with_head=False,
        extra={"provenance": json.dumps(made)},
    )


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

    With a process group initialized (see :mod:`swavctl.dist`), every rank calls this; the model
    is wrapped in DDP here, at the edge, and rank 0 alone writes files. ``stop`` is a
    :class:`StopFlag` the caller installed already (a launcher does so before the group exists);
    without one, the handlers are installed for the duration of the loop. The run folder's lock
    (:func:`run_lock`) is released when this returns or raises.

    Raises :class:`UserError` for bad input (on every rank), :class:`Interrupted` after a
    signal-triggered checkpoint, :class:`NonFiniteError` when the loss or gradients stop being
    finite, and :class:`~swavctl.train.checkpoint.CheckpointWriteError` when a checkpoint cannot
    be written (disk full). All ranks raise the same one at the same step.
    """
    reporter = reporter or QuietReporter()
    if settings.log.tensorboard:
        tensorboard_log.require()  # on every rank alike, before anything is listed or built
    hooks = _TestHooks(nan_at=_parse_hook(HOOK_NAN), raise_at=_parse_hook(HOOK_RAISE), sleep_s=_hook_sleep())
    with contextlib.ExitStack() as held:
        plan = plan_run(settings, reporter=reporter, fresh=fresh, held=held)
        run = _Run(plan, reporter, on_step=on_step, hooks=hooks)
        try:
            run.resume()
            if run.resumed_from is None:  # a new run starts from model.init's weights (none: as built)
                load_init(run.model, plan.settings, reporter.info)
            run.open_run_folder()
            run.train(stop)
            return run.finish()
        finally:
            if run.tensorboard is not None:
                run.tensorboard.close()
            reporter.close()  # the terminal back (cursor shown, line ended) however the run ends


@dataclass(frozen=True)
class _TestHooks:
    """The fault tests' hooks (see the constants at the top): all off unless set."""

    nan_at: tuple[int, int] | None  # (rank, step)
    raise_at: tuple[int, int] | None  # (rank, step)
    sleep_s: float


class _Run:
    """One run of the loop on this rank: the training state, its progress, and its checkpoints.

    The steps, in the order :func:`pretrain` calls them: build the parts (constructor), ``resume``
    from the newest checkpoint, ``open_run_folder``, ``train`` until the last step or a stop, and
    ``finish`` (final checkpoint, export, summary).
    """

    def __init__(
        self, plan: RunPlan, reporter: Reporter, *, on_step: Callable[[int], None] | None, hooks: _TestHooks
    ) -> None:
        settings, device = plan.settings, plan.device
        self.plan, self.settings, self.device = plan, settings, device
        self.reporter, self.on_step = reporter, on_step
        self.world, self.rank = dist.world_size(), dist.rank()
        self.steps_epoch = plan.steps_per_epoch
        self.hooks = hooks

        rng.seed_host(settings.train.seed, self.rank)  # python and numpy: saved in checkpoints, so seeded too
        model = build_model(settings)
        bn_group = settings.dist.sync_batchnorm_group
        # A group of 1 is plain BatchNorm.
        if self.world > 1 and settings.dist.sync_batchnorm and bn_group != 1:
            model = convert_sync_batchnorm(  # type: ignore[assignment]
                model, device_type=device.type, process_group=dist.subgroups(bn_group)
            )
        model.to(device)
        # On the CPU too: NCHW max pooling with indices was 21x slower than NHWC (convnet-tiny, 16 px),
        # and a ResNet-50 step 1.2x slower.
        if settings.train.channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = model
        self.optimizer = build_optimizer(model, settings)
        self.amp_dtype = autocast_dtype(settings, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.queue = (
            EmbeddingQueue(
                len(settings.swav.assignment_crops), plan.queue_per_rank, settings.model.embedding_dim
            ).to(device)
            if plan.queue_per_rank
            else None
        )
        self.health = CollapseDetector(
            settings.model.prototypes,
            tolerance=settings.health.collapse_tolerance,
            patience=settings.health.collapse_patience,
            warmup_steps=round(settings.optim.warmup_epochs * self.steps_epoch),
        )
        # Progress (all ranks alike).
        self.step = 0
        self.skipped_total = 0
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        self.checkpoint_step = -1  # the step of last_checkpoint, when this run wrote or loaded it
        self.last_loss: float | None = None
        self.last_knn: KnnReading | None = None
        self.tensorboard: tensorboard_log.TrainingLog | None = None  # rank 0, with log.tensorboard
        self.samples_seen = 0
        self.total_steps = self.steps_epoch * settings.train.epochs
        if settings.train.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.train.max_steps)
        self.monitor = (
            KnnMonitor(settings, plan.knn_split, device=device, workers=settings.data.workers)
            if plan.knn_split is not None
            else None
        )
        self.started = time.perf_counter()  # again when training starts: samples/s and max_seconds
        self.started_utc = provenance.utc_now()

    def warn_all(self, message: str) -> None:
        """A warning every rank reaches alike: printed once, by rank 0."""
        if dist.is_main():
            self.reporter.warn(message)

    # ----- resume: rank 0 picks the newest checkpoint that verifies; every rank loads that one

    def resume(self) -> None:
        run_dir, settings = self.plan.run_dir, self.settings
        found = ckpt.latest_checkpoint(run_dir, warn=self.reporter.warn) if dist.is_main() else None
        unusable = (
            len(ckpt.list_committed(run_dir / ckpt.CHECKPOINT_DIR)) if dist.is_main() and found is None else 0
        )
        chosen, unusable = dist.broadcast_object((found[0].step if found is not None else None, unusable))
        if chosen is None:
            if unusable:
                # Starting from step 0 here would rewrite the run's metrics and settings over a run
                # that exists: a user who meant to resume must hear it, and choose.
                raise UserError(
                    f"cannot resume {run_dir}: none of its {unusable} committed checkpoint(s) can be used "
                    "(the warnings above say why); nothing was changed there; pass --fresh to set them "
                    "aside and start over, or use another --out"
                )
            return
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

            try:
                previous = from_toml_text(saved, source=str(checkpoint.state_path))
            except UserError as exc:
                raise UserError(
                    f"cannot resume {run_dir}: the settings saved in its checkpoint cannot be read ({exc}); "
                    "nothing was changed in that folder"
                ) from None
        else:
            previous = read_resolved(run_dir)
        if previous is not None:
            incompatible = incompatible_changes(
                previous, settings, old_world=int(state.get("world_size", 1)), new_world=self.world
            )
            if incompatible:
                listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in incompatible.items())
                raise UserError(
                    f"cannot resume {run_dir}: settings changed the meaning of the saved state ({listing}); "
                    "use --fresh to start over or another --out"
                )
            changed = settings_diff(previous, settings)
            if changed:
                self.warn_all("resuming with changed settings: " + ", ".join(sorted(changed)))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.queue is not None and state.get("queues") is not None:
            self.queue.load_state_dict(state["queues"][self.rank])
        self.health.load_state_dict(state["health"])
        saved_rng = state["rng"]
        if isinstance(saved_rng, dict):
            rng.restore(saved_rng)
        elif self.rank < len(saved_rng):
            rng.restore(saved_rng[self.rank])
        step = int(state["step"])
        steps_epoch = self.steps_epoch
        saved_steps_epoch = int(state.get("steps_per_epoch", steps_epoch))
        if saved_steps_epoch != steps_epoch:
            # The world size or the data changed: keep the epoch and the fraction done of it.
            epoch_saved, batch_saved = divmod(step, saved_steps_epoch)
            step = epoch_saved * steps_epoch + batch_saved * steps_epoch // saved_steps_epoch
            self.warn_all(
                f"steps per epoch changed from {saved_steps_epoch} to {steps_epoch} (world size or data "
                f"changed): resuming in epoch {epoch_saved} at batch {step - epoch_saved * steps_epoch}; "
                "this is not an exact continuation of the saved run"
            )
        self.step = self.checkpoint_step = self.resumed_from = step
        self.skipped_total = int(state.get("skipped_images", 0))
        self.last_checkpoint = checkpoint.state_path
        self.reporter.info(f"resuming from {checkpoint.state_path} (step {step})")
        if step < self.total_steps:
            self.reporter.info(self._resume_schedule_line(step, previous))

    def _resume_schedule_line(self, step: int, previous: Settings | None) -> str:
        """The learning rate the run resumes at, and whether the cosine schedule was recomputed."""
        settings = self.settings
        lr = self._lr_at(step)
        epochs, end = settings.train.epochs, self.steps_epoch * settings.train.epochs
        text = f"learning rate at step {step}: {lr:.6g} (cosine to step {end}, {epochs} epochs)"
        if previous is not None and previous.train.epochs != settings.train.epochs:
            text += (
                f"; the schedule is recomputed over {settings.train.epochs} epochs instead of "
                f"{previous.train.epochs}, so the rate rises from where the shorter run left it"
                if settings.train.epochs > previous.train.epochs
                else f"; the schedule is recomputed over {settings.train.epochs} epochs instead of "
                f"{previous.train.epochs}"
            )
        return text

    def _lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) under the current settings."""
        optim = self.settings.optim
        return learning_rate(
            step,
            steps_per_epoch=self.steps_epoch,
            epochs=self.settings.train.epochs,
            base_lr=optim.base_lr,
            final_lr=optim.final_lr,
            warmup_epochs=optim.warmup_epochs,
            start_warmup_lr=optim.start_warmup_lr,
        )

    def open_run_folder(self) -> None:
        """Write the resolved settings, point runs/latest here, and cut the metrics at the step."""
        run_dir = self.plan.run_dir
        if dist.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / RESOLVED_FILE, to_toml(self.settings))
            try:
                point_latest(run_dir)
            except OSError as exc:  # a convenience link: the run does not need it
                self.reporter.warn(f"could not point runs/latest at {run_dir}: {exc.strerror or exc}")
            (run_dir / SUMMARY_FILE).unlink(missing_ok=True)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        if dist.is_main():
            self.metrics.truncate_after(self.step)
            if self.settings.log.tensorboard:
                # Replayed from the metrics just cut at the checkpoint's step: a resume adds no duplicates.
                self.tensorboard = tensorboard_log.TrainingLog(run_dir, self.metrics.path)
        dist.barrier()

    # ----- checkpoints

    def checkpoint_due(self, step_done: int) -> bool:
        """A checkpoint after every epoch's last step and every ``checkpoint.every_steps`` steps."""
        return step_done % self.steps_epoch == 0 or step_done % self.settings.checkpoint.every_steps == 0

    def save(self, reason: str) -> Path | None:
        """Gather every rank's state, let rank 0 write and commit it, and agree on the outcome."""
        if self.checkpoint_step == self.step:
            return self.last_checkpoint
        step, epoch_now = self.step, self.step // self.steps_epoch
        gathered_rng = dist.gather_objects(rng.capture())
        gathered_queue = dist.gather_objects(self.queue.state_dict()) if self.queue is not None else None
        failure: tuple[str, str, int | None] | None = None
        if dist.is_main():
            state = {
                "format": ckpt.FORMAT,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "queues": gathered_queue,
                "health": self.health.state_dict(),
                "rng": gathered_rng,
                "step": step,
                "epoch": epoch_now,
                "steps_per_epoch": self.steps_epoch,
                "world_size": self.world,
                "skipped_images": self.skipped_total,
                "settings": to_toml(self.settings),
                "reason": reason,
            }
            try:
                ckpt.save_checkpoint(
                    self.plan.run_dir, step, epoch_now, state, keep=self.settings.checkpoint.keep
                )
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
        self.last_checkpoint = self.plan.run_dir / ckpt.CHECKPOINT_DIR / f"step-{step:09d}.pt"
        self.checkpoint_step = step
        return self.last_checkpoint

    # ----- the loop

    def train(self, stop: StopFlag | None) -> None:
        """Train until the last step (or ``train.max_seconds``); raise on a stop signal or a bad step."""
        settings, device = self.settings, self.device
        train_model: nn.Module = self.model
        if self.world > 1:
            # Prototype freezing drops the prototypes' gradients *after* backward (they are still
            # used in forward), so DDP never needs find_unused_parameters.
            train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if settings.train.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]
        self.train_model = train_model
        self.crops = crop_specs(settings)
        self.augment = settings.data.augment
        self.dataset = pretrain_dataset(
            self.plan.paths,
            seed=settings.train.seed,
            crops=self.crops,
            augment=self.augment,
            augment_on=settings.data.augment_on,
            device=device,
        )
        prefetch_depth = settings.data.prefetch
        if prefetch_depth is None:
            prefetch_depth = 1 if device.type == "cuda" else 0
        self.prefetch_depth = prefetch_depth
        self.prefetch_stream = side_stream(device) if prefetch_depth > 0 else None  # one for every epoch
        self.warned_cpu_decode = False
        self.started = time.perf_counter()
        self.reporter.start(self.total_steps, self.step, steps_per_epoch=self.steps_epoch)
        self.reporter.info(
            f"{len(self.plan.paths)} images, {self.steps_epoch} steps/epoch, global batch "
            f"{settings.train.batch_size * self.world}, {len(self.crops)} crops "
            f"{settings.data.crop_counts}x{settings.data.crop_sizes}, device {device}, world {self.world}"
        )

        owns_stop = stop is None
        stop_flag = stop or StopFlag()
        if owns_stop:
            stop_flag.install()
        self.profiler = maybe_profiler(
            self.plan.run_dir / "profile",
            steps=settings.train.profile_steps,
            device_type=device.type,
            main=dist.is_main(),
        )
        stop_flag.watching = True  # from here a signal is acted on at the next step boundary
        try:
            while self.step < self.total_steps:
                self._epoch(stop_flag)
        finally:
            # No step boundary is coming: a signal from here on (the launcher's SIGTERM after a peer
            # died in the final barrier) ends this process at once instead of being recorded.
            stop_flag.watching, stop_flag.finished = False, True
            if self.profiler is not None:
                self.profiler.close()
            if owns_stop:
                stop_flag.restore()

    def _epoch(self, stop_flag: StopFlag) -> None:
        """The rest of the current epoch, from the step reached."""
        settings, device = self.settings, self.device
        epoch, batch_in_epoch = divmod(self.step, self.steps_epoch)
        seen_before = self.samples_seen
        sampler = EpochBatchSampler(
            len(self.dataset),
            batch_size=settings.train.batch_size,
            epoch=epoch,
            seed=settings.train.seed,
            rank=self.rank,
            world_size=self.world,
            start_batch=batch_in_epoch,
        )
        loader = pretrain_loader(
            self.dataset,
            sampler,
            workers=settings.data.workers,
            device=device,
            seed=sample_seed(settings.train.seed, epoch, -1 - self.rank),
        )
        dataset, crops, augment = self.dataset, self.crops, self.augment
        channels_last = settings.train.channels_last

        def prepare(batch: Batch, index: int, epoch: int = epoch) -> tuple[Batch, list[torch.Tensor] | None]:
            """Decode, then augment or copy to the device: the crops of the epoch's batch ``index``
            (each image's seeded by its own index, so ``index`` itself changes nothing)."""
            with phase("augment"):
                if batch.images is not None:
                    batch = decode_batch(batch, dataset.paths, device)
                if batch.size == 0:
                    return batch, None
                crops_t = batch_crops(batch, crops, augment, device, settings.train.seed, epoch)
                if channels_last:
                    crops_t = [c.contiguous(memory_format=torch.channels_last) for c in crops_t]
                return batch, crops_t

        wait_start = time.perf_counter()
        prefetcher = Prefetcher(
            iter(loader), prepare, device=device, depth=self.prefetch_depth, stream=self.prefetch_stream
        )
        try:
            while self.step < self.total_steps:
                with phase("data_wait"):
                    try:
                        ready = next(prefetcher)
                    except StopIteration:
                        break
                data_wait = time.perf_counter() - wait_start
                self._one_step(ready, stop_flag, epoch=epoch, data_wait=data_wait)
                wait_start = time.perf_counter()
        finally:
            prefetcher.close()
        del prefetcher, loader
        if (
            batch_in_epoch == 0
            and self.step == (epoch + 1) * self.steps_epoch
            and self.samples_seen == seen_before
        ):
            # A whole epoch of batches whose every file was unreadable (the same on every rank):
            # going on would only save untrained weights that look like a finished run.
            raise UserError(
                f"no image under {self.plan.image_root} could be read in epoch {epoch} ({self.skipped_total} "
                "files skipped); check --data"
            )

    def _one_step(self, ready: Ready, stop_flag: StopFlag, *, epoch: int, data_wait: float) -> None:
        """One step on a prepared batch: agree with the other ranks, then train, log and checkpoint."""
        settings, reporter = self.settings, self.reporter
        batch = ready.batch
        step_start = time.perf_counter()
        if settings.data.on_bad_image == "error":
            refuse_skipped(batch)
        for bad in batch.skipped:
            reporter.warn(f"skipped unreadable file {bad.path}: {bad.reason}")
        if batch.cpu_decoded and not self.warned_cpu_decode:
            self.warned_cpu_decode = True  # once: it can be every batch (nvjpeg missing)
            reporter.warn(
                f"nvjpeg could not decode {batch.cpu_decoded} of a batch's {batch.size} JPEGs; "
                "they were decoded on the CPU (slower; CMYK or unusual JPEGs do this)"
            )
        # One small collective per step: signals, empty batches, the global batch, skips.
        start = agree_on_step_start(stop_flag, batch.size, len(batch.skipped), self.device)
        self.skipped_total += start.skipped
        if start.signals:
            signum = next(s for s in STOP_SIGNALS if s in start.signals)
            path = self.save(f"signal {signal.Signals(signum).name}")
            requeue = None
            if signal.SIGUSR1 in start.signals and dist.is_main() and _in_slurm_job():
                requeue = dist.requeue_slurm_job()  # once, after the checkpoint committed
                reporter.info(requeue)
            raise Interrupted(signum, self.step, path, requeue)
        if start.any_empty:
            # Every file of some rank's batch was unreadable: all ranks skip the step together
            # (the epoch-end checkpoint still comes, as after a trained step).
            self.step += 1
            if self.checkpoint_due(self.step):
                self.save("periodic")
            return
        if self.hooks.raise_at == (self.rank, self.step + 1):
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step + 1} ({HOOK_RAISE})")
        assert ready.crops is not None  # a non-empty batch (empty ones are skipped above)
        lr, out, readout = self._optimize(ready.crops, batch.size, start.images, epoch=epoch)
        self.step += 1
        step = self.step
        self.samples_seen += batch.size * self.world
        loss_value = readout.loss  # over all ranks, as one process on the global batch
        self.last_loss = loss_value
        step_time = time.perf_counter() - step_start
        if readout.time_up and step < self.total_steps:
            reporter.info(f"train.max_seconds reached at step {step}")
            self.total_steps = step  # the monitor's last reading and the final checkpoint come next
        knn: KnnReading | None = None
        if self.monitor is not None and self.monitor.due(step, self.steps_epoch, self.total_steps):
            with phase("monitor"):
                try:
                    knn = self.monitor.evaluate(self.model.backbone, feature_dim=self.model.feature_dim)
                except MonitorError as exc:  # the same on every rank (features are gathered)
                    self.warn_all(f"monitor.knn_data: {exc}; k-NN monitoring stops, training goes on")
                    self.monitor = None
        with phase("bookkeeping"):
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss_value,
                "loss_over_lnk": loss_value / collapsed_loss(settings.model.prototypes),
                "lr": lr,
                "samples_per_s": batch.size * self.world / max(step_time + data_wait, 1e-9),
                "data_wait_fraction": data_wait / max(step_time + data_wait, 1e-9),
                "code_entropy": readout.code_entropy,
                "prototypes_used": readout.prototypes_used,
                "queue_in_use": out.queue_in_use,
                "skipped_images": self.skipped_total,
                "time_utc": provenance.utc_now(),
            }
            if knn is not None:
                self.last_knn = knn
                record["knn_top1"] = knn.top1
                record["knn_top5"] = knn.top5
                reporter.info(
                    f"step {step} ({step / self.steps_epoch:.3g} epochs): {knn.k}-NN top-1 "
                    f"{100 * knn.top1:.2f}% top-{knn.top5_k} {100 * knn.top5:.2f}% "
                    f"on {knn.val_images} val images ({knn.seconds:.1f} s)"
                )
            periodic = step % settings.train.log_every == 0 or step == self.total_steps
            if dist.is_main() and (periodic or knn is not None):
                self.metrics.append(record)
                if self.tensorboard is not None:
                    self.tensorboard.add(record)
            reporter.step(record)
            warning = self.health.update(step, loss_value)
            if warning:
                self.warn_all(warning)
            if self.on_step is not None:
                self.on_step(step)
            if self.checkpoint_due(step):
                self.save("periodic")
        if self.profiler is not None:
            self.profiler.step()
        if self.hooks.sleep_s:
            time.sleep(self.hooks.sleep_s)

    def _optimize(
        self, crops: list[torch.Tensor], batch_size: int, global_images: int, *, epoch: int
    ) -> tuple[float, StepOutputs, StepReadout]:
        """Forward, SwAV loss, backward, checks and the optimizer step: (lr, loss output, readout)."""
        settings, model, step = self.settings, self.model, self.step
        lr = self._lr_at(step)
        sgd = self.optimizer.optim
        for group in sgd.param_groups:
            group["lr"] = lr
        amp_dtype = self.amp_dtype
        with phase("forward"):
            model.normalize_prototypes()
            with torch.autocast(
                self.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                embeddings, scores = self.train_model(crops)
        with phase("loss"):
            out = swav_loss_from_outputs(
                embeddings.float(),
                scores.float(),
                batch_size=batch_size,
                num_crops=len(self.crops),
                assignment_crops=settings.swav.assignment_crops,
                prototypes=model.prototypes.weight,
                temperature=settings.swav.temperature,
                epsilon=settings.swav.epsilon,
                sinkhorn_iterations=settings.swav.sinkhorn_iterations,
                queue=None if epoch < settings.swav.queue_start_epoch else self.queue,
            )
        loss = out.loss
        if global_images != batch_size * self.world:
            # Ranks' batches differ (skipped files): weigh each rank's mean by its share,
            # so DDP's average over ranks is the mean over the global batch.
            loss = loss * (batch_size * self.world / global_images)
        if self.hooks.nan_at == (self.rank, step + 1):
            loss = loss * float("nan")
        scaler = self.scaler
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if step < settings.swav.freeze_prototypes_steps:
                freeze_prototype_grads(model)
        with phase("checks"):
            # Checked on every rank with one collective, before the optimizer touches anything.
            # The step's only read-back to the host (see read_step).
            grads_ok = (
                torch.ones((), dtype=torch.bool, device=self.device)
                if scaler.is_enabled()  # the scaler skips steps with inf/NaN gradients itself
                else grads_finite(model)
            )
            time_up = bool(
                settings.train.max_seconds and time.perf_counter() - self.started > settings.train.max_seconds
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
                f"the last good checkpoint is {self.last_checkpoint or 'none'} "
                "(try a lower optim.base_lr, or train.precision=fp32)"
            )
        with phase("optimizer"):
            if scaler.is_enabled():
                scaler.unscale_(sgd)
                self.optimizer.step(lambda: scaler.step(sgd))  # skipped by the scaler on inf/NaN
                scaler.update()
            else:
                self.optimizer.step()
        return lr, out, readout

    # ----- the end

    def finish(self) -> Summary:
        """The final checkpoint, the backbone export and the summary (``summary.json``, written last)."""
        settings, reporter, step, steps_epoch = self.settings, self.reporter, self.step, self.steps_epoch
        profiler = self.profiler
        if profiler is not None:
            if profiler.written:
                reporter.info(f"profile of {profiler.steps} steps: {profiler.out_dir}/phases.txt")
            else:
                reporter.warn(
                    f"train.profile_steps={profiler.steps}: the run ended before step "
                    f"{WARMUP_STEPS + profiler.steps} of this process, so no profile was written"
                )
        if self.resumed_from is not None and step == self.resumed_from and step >= self.total_steps:
            # The saved run was already at its end (stopped after its last checkpoint, before its summary,
            # or the same command run twice): no step ran here, so the summary takes the loss logged at
            # that step, and the monitor reads the saved weights once, as the uninterrupted run did.
            self.last_loss = dist.broadcast_object(self.metrics.loss_at(step) if dist.is_main() else None)
            if self.monitor is not None:
                try:
                    self.last_knn = self.monitor.evaluate(
                        self.model.backbone, feature_dim=self.model.feature_dim
                    )
                except MonitorError as exc:
                    self.warn_all(f"monitor.knn_data: {exc}; the summary has no k-NN reading")
        final_ckpt = self.save("final")
        elapsed = time.perf_counter() - self.started
        run_dir = self.plan.run_dir
        backbone_path = run_dir / "backbone.safetensors"
        made = provenance.record(
            device=self.device,
            device_count=self.world if self.device.type == "cuda" else 1,
            started=self.started_utc,
        )
        extra: dict[str, Any] = {
            "world_size": self.world,
            "steps_per_epoch": steps_epoch,
            "total_steps": self.total_steps,
            "provenance": made,
            **init_summary(settings),
        }
        if self.last_knn is not None:
            extra["knn"] = self.last_knn.as_dict()
        summary = Summary(
            out_dir=str(run_dir),
            steps=step,
            epochs_done=step / steps_epoch,
            final_loss=self.last_loss,
            samples_per_s=self.samples_seen / elapsed if elapsed > 0 else 0.0,
            skipped_images=self.skipped_total,
            images=len(self.plan.paths),
            checkpoint=str(final_ckpt) if final_ckpt else None,
            backbone=str(backbone_path),
            resumed_from_step=self.resumed_from,
            extra=extra,
        )
        if dist.is_main():
            _export_backbone(self.model, backbone_path, settings, step, step // steps_epoch, made)
            write_json_atomic(run_dir / SUMMARY_FILE, summary.as_dict())
        dist.barrier()
        reporter.close()
        return summary


def _in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID"))


def _ranks_text(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
