"""The pretraining loop: :func:`pretrain` runs a :class:`Trainer`, whose step is :meth:`Trainer.train_step`.

A run, top to bottom: plan it (:mod:`~swavctl.train.plan`: device, data, run folder), build the
trainer (model, optimizer, objective and the collaborators below), resume from the newest
checkpoint, open the run folder, train epoch by epoch until the last step or a stop, and finish
(final checkpoint, backbone export, summary). The collaborators, one file each:

- :mod:`~swavctl.objective`: the method's codes, loss and memory (SwAV and its queue,
  DeepCluster-v2 and SeLa-v2 and their memory bank);
- :mod:`~swavctl.train.state`: what a checkpoint holds, saving it and resuming from it;
- :mod:`~swavctl.train.pipeline`: the per-epoch data pipeline;
- :mod:`~swavctl.distributed.stop` and :mod:`~swavctl.train.faults`: the stop signals and the injected
  faults, handed in by the caller;
- :mod:`~swavctl.train.monitoring`: the k-NN monitor;
- :mod:`~swavctl.train.summary`: the end-of-run export and summary.

Devices, DDP and autocast are applied at the edge (:mod:`~swavctl.train.build`); the model and the
math modules know nothing of them.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from swavctl.config import Settings, to_toml
from swavctl.data.dataset import Batch
from swavctl.distributed import dist
from swavctl.distributed.agreement import StepReadout, agree_on_step_start, grads_finite, read_step
from swavctl.distributed.outcomes import NON_FINITE, ReportedFailure
from swavctl.distributed.stop import Interrupted, StopFlag, first_stop_signal, in_slurm_job
from swavctl.errors import UserError
from swavctl.eval.monitor import KnnReading
from swavctl.files.atomic import write_text_atomic
from swavctl.objective import ObjectiveOutput, StepInputs, build_objective
from swavctl.reporting import provenance, tensorboard_log
from swavctl.train import rng
from swavctl.train.build import build_model_on, build_optimizer, wrap_for_training
from swavctl.train.faults import FaultHooks
from swavctl.train.health import CollapseDetector, MetricsLog, code_statistics, collapsed_loss
from swavctl.train.monitoring import Monitoring
from swavctl.train.pipeline import DataPipeline
from swavctl.train.plan import RunPlan, plan_run
from swavctl.train.precision import autocast_dtype
from swavctl.train.prefetch import Ready
from swavctl.train.profiling import maybe_profiler, phase
from swavctl.train.report import QuietReporter, Reporter
from swavctl.train.run_dir import RESOLVED_FILE, SUMMARY_FILE, point_latest
from swavctl.train.schedule import LrSchedule
from swavctl.train.state import Parts, Progress, TrainingState
from swavctl.train.summary import Summary, profile_note, run_summary, write_results
from swavctl.weights.init_weights import load_init

__all__ = ["Interrupted", "NonFiniteError", "Summary", "Trainer", "pretrain"]


class NonFiniteError(ReportedFailure):
    """Loss or gradients became NaN/Inf; the last good checkpoint stays."""

    status = NON_FINITE


def pretrain(
    settings: Settings,
    *,
    reporter: Reporter | None = None,
    fresh: bool = False,
    on_step: Callable[[int], None] | None = None,
    stop: StopFlag | None = None,
    faults: FaultHooks | None = None,
) -> Summary:
    """Run (or resume) pretraining with ``settings``; returns the run's summary.

    With a process group initialized (see :mod:`swavctl.distributed.dist`), every rank calls this; the model
    is wrapped in DDP here, at the edge, and rank 0 alone writes files. ``stop`` is a
    :class:`StopFlag` the caller installed already (a launcher does so before the group exists);
    without one, the handlers are installed for the duration of the loop. ``faults`` are the
    fault tests' injected failures (:class:`FaultHooks`, none by default). The run folder's lock
    (:func:`run_lock`) is released when this returns or raises.

    Raises :class:`UserError` for bad input (on every rank), :class:`Interrupted` after a
    signal-triggered checkpoint, :class:`NonFiniteError` when the loss or gradients stop being
    finite, and :class:`~swavctl.weights.checkpoint.CheckpointWriteError` when a checkpoint cannot
    be written (disk full). All ranks raise the same one at the same step.
    """
    reporter = reporter or QuietReporter()
    if settings.log.tensorboard:
        tensorboard_log.require()  # on every rank alike, before anything is listed or built
    with contextlib.ExitStack() as held:
        plan = plan_run(settings, reporter=reporter, fresh=fresh, held=held)
        trainer = Trainer(plan, reporter, stop=stop, on_step=on_step, faults=faults or FaultHooks())
        try:
            trainer.state.resume(trainer.schedule, trainer.total_steps)
            if trainer.progress.resumed_from is None:
                # A new run starts from model.init's weights (none: as built); a resume never does.
                load_init(trainer.model, plan.settings, reporter.info)
            trainer.open_run_folder()
            trainer.train()
            return trainer.finish()
        finally:
            if trainer.tensorboard is not None:
                trainer.tensorboard.close()
            reporter.close()  # the terminal back (cursor shown, line ended) however the run ends


@dataclass(frozen=True)
class StepResult:
    """What one trained step gives the bookkeeping."""

    lr: float
    output: ObjectiveOutput
    readout: StepReadout


class Trainer:
    """One run of the loop on this rank: the parts, the collaborators, and the steps.

    The steps, in the order :func:`pretrain` calls them: build everything (constructor),
    ``state.resume`` from the newest checkpoint, ``open_run_folder``, ``train`` until the last
    step or a stop, and ``finish`` (final checkpoint, export, summary).
    """

    def __init__(
        self,
        plan: RunPlan,
        reporter: Reporter,
        *,
        stop: StopFlag | None,
        on_step: Callable[[int], None] | None,
        faults: FaultHooks,
    ) -> None:
        settings, device = plan.settings, plan.device
        self.plan, self.settings, self.device = plan, settings, device
        self.reporter, self.on_step, self.faults = reporter, on_step, faults
        self.owns_stop = stop is None  # then installed for the duration of train()
        self.stop = stop or StopFlag()
        self.world, self.rank = dist.world_size(), dist.rank()
        self.steps_epoch = plan.steps_per_epoch
        self.total_steps = self.steps_epoch * settings.train.epochs
        if settings.train.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.train.max_steps)

        rng.seed_host(settings.train.seed, self.rank)  # python and numpy: saved in checkpoints, so seeded too
        self.model = build_model_on(settings, device)
        self.optimizer = build_optimizer(self.model, settings)
        self.amp_dtype = autocast_dtype(settings, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.objective = build_objective(
            settings,
            queue_per_rank=plan.queue_per_rank,
            device=device,
            steps_per_epoch=self.steps_epoch,
            dataset_size=len(plan.paths),
        )
        self.health = CollapseDetector(
            settings.model.prototypes,
            tolerance=settings.health.collapse_tolerance,
            patience=settings.health.collapse_patience,
            warmup_steps=round(settings.optim.warmup_epochs * self.steps_epoch),
        )
        self.schedule = LrSchedule(settings, self.steps_epoch)
        self.progress = Progress()
        parts = Parts(self.model, self.optimizer, self.scaler, self.objective, self.health)
        self.state = TrainingState(
            settings,
            plan.run_dir,
            parts,
            self.progress,
            steps_per_epoch=self.steps_epoch,
            reporter=reporter,
            warn_all=self.warn_all,
        )
        self.monitoring = Monitoring(settings, plan.knn_split, device=device, warn_all=self.warn_all)
        self.train_model = wrap_for_training(self.model, settings, device)
        self.pipeline = DataPipeline(
            settings, plan.paths, device=device, rank=self.rank, world=self.world, reporter=reporter
        )
        self.metrics = MetricsLog(plan.run_dir / "metrics.jsonl")
        self.tensorboard: tensorboard_log.TrainingLog | None = None  # rank 0, with log.tensorboard
        self.profiler = maybe_profiler(
            plan.run_dir / "profile",
            steps=settings.train.profile_steps,
            device_type=device.type,
            main=dist.is_main(),
        )
        self.started = time.perf_counter()  # again when training starts: samples/s and max_seconds
        self.started_utc = provenance.utc_now()

    def warn_all(self, message: str) -> None:
        """A warning every rank reaches alike: printed once, by rank 0."""
        if dist.is_main():
            self.reporter.warn(message)

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
            self.metrics.truncate_after(self.progress.step)
            if self.settings.log.tensorboard:
                # Replayed from the metrics just cut at the checkpoint's step: a resume adds no duplicates.
                self.tensorboard = tensorboard_log.TrainingLog(run_dir, self.metrics.path)
        dist.barrier()

    # ----- the loop

    def train(self) -> None:
        """Train until the last step (or ``train.max_seconds``); raise on a stop signal or a bad step."""
        settings, stop = self.settings, self.stop
        self.started = time.perf_counter()
        self.reporter.start(self.total_steps, self.progress.step, steps_per_epoch=self.steps_epoch)
        self.reporter.info(
            f"{len(self.plan.paths)} images, {self.steps_epoch} step{'' if self.steps_epoch == 1 else 's'}"
            f" per epoch, global batch "
            f"{settings.train.batch_size * self.world}, {len(self.pipeline.crops)} crops "
            f"{settings.data.crop_counts}x{settings.data.crop_sizes}, device {self.device}, "
            f"world {self.world}"
        )
        if self.owns_stop:
            stop.install()
        stop.watching = True  # from here a signal is acted on at the next step boundary
        try:
            if self.objective.needs_initial_pass() and self.progress.step < self.total_steps:
                self._initial_pass()
            while self.progress.step < self.total_steps:
                self._epoch()
        finally:
            # No step boundary is coming: a signal from here on (the launcher's SIGTERM after a peer
            # died in the final barrier) ends this process at once instead of being recorded.
            stop.watching, stop.finished = False, True
            if self.profiler is not None:
                self.profiler.close()
            if self.owns_stop:
                stop.restore()

    def _initial_pass(self) -> None:
        """The objective's pass over epoch 0's batches before training (filling a memory bank)."""
        self.reporter.info("filling the memory bank: one pass over the data without gradients")

        def embed(crop: torch.Tensor) -> torch.Tensor:
            with self._autocast():  # the forward only: the batches are made outside autocast
                return self.model([crop])[0]

        with torch.no_grad(), self.pipeline.epoch(0, start_batch=0, first_step=0) as batches:
            self.objective.initial_pass(embed, ((ready.crops, ready.batch) for ready, _ in batches))

    def _epoch(self) -> None:
        """The rest of the current epoch, from the step reached."""
        progress = self.progress
        epoch, batch_in_epoch = divmod(progress.step, self.steps_epoch)
        seen_before = progress.samples_seen
        self.objective.start_epoch(epoch, self.model, first_batch=batch_in_epoch)
        with self.pipeline.epoch(epoch, start_batch=batch_in_epoch, first_step=progress.step) as batches:
            for ready, waited in batches:
                self._step(ready, epoch=epoch, data_wait=waited)
                if progress.step >= self.total_steps:
                    break
        if (
            batch_in_epoch == 0
            and progress.step == (epoch + 1) * self.steps_epoch
            and progress.samples_seen == seen_before
        ):
            # A whole epoch of batches whose every file was unreadable (the same on every rank):
            # going on would only save untrained weights that look like a finished run.
            raise UserError(
                f"no image under {self.plan.image_root} could be read in epoch {epoch} "
                f"({progress.skipped_images} files skipped); check --data"
            )

    def _step(self, ready: Ready, *, epoch: int, data_wait: float) -> None:
        """One step on a prepared batch: agree with the other ranks, then train, log and checkpoint."""
        batch, progress = ready.batch, self.progress
        step_start = time.perf_counter()
        # One small collective per step: signals, empty batches, the global batch, skips.
        start = agree_on_step_start(self.stop, batch.size, len(batch.skipped), self.device)
        progress.skipped_images += start.skipped
        if start.signals:
            self._stop_on(start.signals)
        if start.any_empty:
            # Every file of some rank's batch was unreadable: all ranks skip the step together
            # (the epoch-end checkpoint still comes, as after a trained step).
            progress.step += 1
            self._end_of_step(epoch)
            return
        self.faults.raise_if_due(self.rank, progress.step + 1)
        assert ready.crops is not None  # a non-empty batch (empty ones are skipped above)
        result = self.train_step(ready.crops, batch, global_images=start.images)
        progress.step += 1
        progress.samples_seen += batch.size * self.world
        progress.last_loss = result.readout.loss  # over all ranks, as one process on the global batch
        step_time = time.perf_counter() - step_start
        if result.readout.time_up and progress.step < self.total_steps:
            self.reporter.info(f"train.max_seconds reached at step {progress.step}")
            self.total_steps = progress.step  # the monitor's last reading and the final checkpoint come next
        knn = self.monitoring.after_step(
            self.model, progress.step, steps_per_epoch=self.steps_epoch, total_steps=self.total_steps
        )
        with phase("bookkeeping"):
            self._log(
                result, knn, epoch=epoch, images=batch.size, seconds=step_time + data_wait, waited=data_wait
            )
            self._end_of_step(epoch)
        if self.profiler is not None:
            self.profiler.step()
        self.faults.pause()

    def train_step(self, crops: list[torch.Tensor], batch: Batch, *, global_images: int) -> StepResult:
        """Set the learning rate, forward, objective, backward, checks, optimizer step."""
        step, model = self.progress.step, self.model
        lr = self.schedule(step)
        for group in self.optimizer.optim.param_groups:
            group["lr"] = lr
        with phase("forward"):
            self.objective.before_forward(model)
            with self._autocast():
                embeddings, scores = self.train_model(crops)
        with phase("loss"):
            out = self.objective(
                StepInputs(embeddings, scores, model.prototype_weights, batch.size, batch.indices, step)
            )
            loss = self.faults.poison(
                self._global_mean(out.loss, batch.size, global_images), self.rank, step + 1
            )
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.objective.after_backward(model, step)
        with phase("checks"):
            readout = self._check(loss, out)
        with phase("optimizer"):
            self._apply_gradients()
        return StepResult(lr, out, readout)

    # ----- the step's pieces

    def _autocast(self) -> torch.autocast:
        amp = self.amp_dtype
        return torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def _global_mean(self, loss: torch.Tensor, batch_size: int, global_images: int) -> torch.Tensor:
        """This rank's mean loss, weighed so that DDP's average over the ranks is the mean over the
        global batch when the ranks' batches differ (skipped files)."""
        if global_images == batch_size * self.world:
            return loss
        return loss * (batch_size * self.world / global_images)

    def _check(self, loss: torch.Tensor, out: ObjectiveOutput) -> StepReadout:
        """The step's one read-back (see :func:`read_step`); raises :class:`NonFiniteError` on every
        rank, before the optimizer touches anything, when some rank's loss or gradients are not finite."""
        scaler, limit = self.scaler, self.settings.train.max_seconds
        grads_ok = (
            torch.ones((), dtype=torch.bool, device=self.device)
            if scaler.is_enabled()  # the scaler skips steps with inf/NaN gradients itself
            else grads_finite(self.model)
        )
        time_up = bool(limit and time.perf_counter() - self.started > limit)
        readout = read_step(loss, grads_ok, code_statistics(out.codes[0]), time_up=time_up)
        if readout.bad_loss or readout.bad_grads:
            what = (
                f"non-finite loss on rank {_ranks_text(readout.bad_loss)}"
                if readout.bad_loss
                else f"non-finite gradients on rank {_ranks_text(readout.bad_grads)}"
            )
            raise NonFiniteError(
                f"{what} at step {self.progress.step + 1}; stopped before the optimizer step, on every rank; "
                f"the last good checkpoint is {self.state.last_checkpoint or 'none'} "
                "(try a lower optim.base_lr, or train.precision=fp32)"
            )
        return readout

    def _apply_gradients(self) -> None:
        scaler, sgd = self.scaler, self.optimizer.optim
        if scaler.is_enabled():
            scaler.unscale_(sgd)
            self.optimizer.step(lambda: scaler.step(sgd))  # skipped by the scaler on inf/NaN
            scaler.update()
        else:
            self.optimizer.step()

    def _stop_on(self, signals: set[int]) -> NoReturn:
        """Checkpoint, ask SLURM to requeue the job after SIGUSR1, and stop."""
        signum = first_stop_signal(signals)
        path = self.state.save(f"signal {signal.Signals(signum).name}")
        requeue = None
        if signal.SIGUSR1 in signals and dist.is_main() and in_slurm_job():
            requeue = dist.requeue_slurm_job()  # once, after the checkpoint committed
            self.reporter.info(requeue)
        raise Interrupted(signum, self.progress.step, path, requeue)

    def _end_of_step(self, epoch: int) -> None:
        """After a step is counted: the objective's end of an epoch, and a checkpoint when due."""
        step = self.progress.step
        if step % self.steps_epoch == 0:
            self.objective.end_epoch(epoch, self.model)
        if self.state.due(step):
            self.state.save("periodic")

    def _log(
        self,
        result: StepResult,
        knn: KnnReading | None,
        *,
        epoch: int,
        images: int,
        seconds: float,
        waited: float,
    ) -> None:
        """The step's metrics line (every ``log_every`` steps, the last and each k-NN reading),
        progress line, collapse check and ``on_step`` callback."""
        step, readout = self.progress.step, result.readout
        record: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "loss": readout.loss,
            "loss_over_lnk": readout.loss / collapsed_loss(self.settings.model.prototypes),
            "lr": result.lr,
            "samples_per_s": images * self.world / max(seconds, 1e-9),
            "data_wait_fraction": waited / max(seconds, 1e-9),
            "code_entropy": readout.code_entropy,
            "prototypes_used": readout.prototypes_used,
            **result.output.record,
            "skipped_images": self.progress.skipped_images,
            "time_utc": provenance.utc_now(),
        }
        if knn is not None:
            self.reporter.info(
                self.monitoring.record(knn, record, step=step, steps_per_epoch=self.steps_epoch)
            )
        periodic = step % self.settings.train.log_every == 0 or step == self.total_steps
        if dist.is_main() and (periodic or knn is not None):
            self.metrics.append(record)
            if self.tensorboard is not None:
                self.tensorboard.add(record)
        self.reporter.step(record)
        warning = self.health.update(step, readout.loss)
        if warning:
            self.warn_all(warning)
        if self.on_step is not None:
            self.on_step(step)

    # ----- the end

    def finish(self) -> Summary:
        """The final checkpoint, the backbone export and the summary (``summary.json``, written last)."""
        progress, step = self.progress, self.progress.step
        profile_note(self.profiler, self.reporter)
        if progress.resumed_from is not None and step == progress.resumed_from and step >= self.total_steps:
            # The saved run was already at its end (stopped after its last checkpoint, before its summary,
            # or the same command run twice): no step ran here, so the summary takes the loss logged at
            # that step, and the monitor reads the saved weights once, as the uninterrupted run did.
            progress.last_loss = dist.broadcast_object(self.metrics.loss_at(step) if dist.is_main() else None)
            self.monitoring.final_reading(self.model)
        final_checkpoint = self.state.save("final")
        elapsed = time.perf_counter() - self.started
        made = provenance.record(
            device=self.device,
            device_count=self.world if self.device.type == "cuda" else 1,
            started=self.started_utc,
        )
        summary = run_summary(
            self.plan.run_dir,
            progress,
            self.settings,
            steps_per_epoch=self.steps_epoch,
            total_steps=self.total_steps,
            images=len(self.plan.paths),
            elapsed=elapsed,
            final_checkpoint=final_checkpoint,
            knn=self.monitoring.last,
            made=made,
        )
        write_results(self.model, summary, self.settings, steps_per_epoch=self.steps_epoch)
        self.reporter.close()
        return summary


def _ranks_text(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
