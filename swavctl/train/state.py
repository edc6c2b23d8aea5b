"""The training state a checkpoint holds: saving it from every rank, and resuming from it.

A checkpoint (:mod:`swavctl.weights.checkpoint`, the files and their commit) is a plain dictionary:

    format, model, optimizer, scaler, <objective.checkpoint_key> (every rank's objective state,
    SwAV's "queues"), health, rng (every rank's), step, epoch, steps_per_epoch, world_size,
    skipped_images, settings (TOML), reason

The model is saved unwrapped (no ``module.`` prefix); the objective's memory and the random
states are per rank and gathered to rank 0, which alone writes. On resume, rank 0 picks the newest
checkpoint that verifies, every rank loads that one, and its saved settings decide whether the
new ones can continue it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swavctl.config import Settings, from_toml_text, to_toml
from swavctl.distributed import dist
from swavctl.errors import UserError
from swavctl.model.swav import SwAV
from swavctl.objective import Objective
from swavctl.train import rng
from swavctl.train.health import CollapseDetector
from swavctl.train.larc import LARC
from swavctl.train.report import Reporter
from swavctl.train.run_dir import incompatible_changes, read_resolved, settings_diff
from swavctl.train.schedule import LrSchedule
from swavctl.weights import checkpoint as ckpt


@dataclass
class Progress:
    """How far the run is; the same on every rank."""

    step: int = 0  # optimizer steps done
    skipped_images: int = 0  # files no rank could read, over the run
    samples_seen: int = 0  # images trained on by all ranks in this process's lifetime
    last_loss: float | None = None
    resumed_from: int | None = None  # the step this process resumed at


@dataclass
class Parts:
    """What a checkpoint saves and a resume restores, besides the progress and the random states."""

    model: SwAV
    optimizer: LARC
    scaler: torch.amp.GradScaler
    objective: Objective
    health: CollapseDetector


class TrainingState:
    """Saves and restores a run's :class:`Parts` and :class:`Progress` on this rank."""

    def __init__(
        self,
        settings: Settings,
        run_dir: Path,
        parts: Parts,
        progress: Progress,
        *,
        steps_per_epoch: int,
        reporter: Reporter,
        warn_all: Callable[[str], None],
    ) -> None:
        self.settings, self.run_dir, self.parts, self.progress = settings, run_dir, parts, progress
        self.steps_per_epoch = steps_per_epoch
        self.reporter, self.warn_all = reporter, warn_all
        self.world, self.rank = dist.world_size(), dist.rank()
        self.last_checkpoint: Path | None = None
        self.checkpoint_step = -1  # the step of last_checkpoint, when this run wrote or loaded it

    # ----- saving

    def due(self, step_done: int) -> bool:
        """A checkpoint after every epoch's last step and every ``checkpoint.every_steps`` steps."""
        return step_done % self.steps_per_epoch == 0 or step_done % self.settings.checkpoint.every_steps == 0

    def save(self, reason: str) -> Path | None:
        """Gather every rank's state, let rank 0 write and commit it, and agree on the outcome."""
        step = self.progress.step
        if self.checkpoint_step == step:
            return self.last_checkpoint
        gathered_rng = dist.gather_objects(rng.capture())
        objective_state = self.parts.objective.rank_state()  # None on every rank alike
        gathered_objective = dist.gather_objects(objective_state) if objective_state is not None else None
        failure: tuple[str, str, int | None] | None = None
        if dist.is_main():
            state = self._state(reason, gathered_rng, gathered_objective)
            try:
                ckpt.save_checkpoint(
                    self.run_dir, step, state["epoch"], state, keep=self.settings.checkpoint.keep
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
        self.last_checkpoint = self.run_dir / ckpt.CHECKPOINT_DIR / f"step-{step:09d}.pt"
        self.checkpoint_step = step
        return self.last_checkpoint

    def _state(
        self, reason: str, gathered_rng: list[Any], gathered_objective: list[Any] | None
    ) -> dict[str, Any]:
        parts, step = self.parts, self.progress.step
        return {
            "format": ckpt.FORMAT,
            "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scaler": parts.scaler.state_dict(),
            parts.objective.checkpoint_key: gathered_objective,
            "health": parts.health.state_dict(),
            "rng": gathered_rng,
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world,
            "skipped_images": self.progress.skipped_images,
            "settings": to_toml(self.settings),
            "reason": reason,
        }

    # ----- resuming: rank 0 picks the newest checkpoint that verifies; every rank loads that one

    def resume(self, schedule: LrSchedule, total_steps: int) -> None:
        """Continue from the newest usable checkpoint, if the run folder has one."""
        chosen = self._choose()
        if chosen is None:
            return
        checkpoint, state = chosen
        previous = self._saved_settings(checkpoint, state)
        if previous is not None:
            self._check_settings(previous, int(state.get("world_size", 1)))
        self._restore(state)
        step = self._remapped_step(state)
        progress = self.progress
        progress.step = self.checkpoint_step = progress.resumed_from = step
        progress.skipped_images = int(state.get("skipped_images", 0))
        self.last_checkpoint = checkpoint.state_path
        self.reporter.info(f"resuming from {checkpoint.state_path} (step {step})")
        if step < total_steps:
            self.reporter.info(schedule.resume_line(step, previous))

    def _choose(self) -> tuple[ckpt.Checkpoint, dict[str, Any]] | None:
        """The checkpoint every rank resumes from and its state (None: start from step 0)."""
        run_dir = self.run_dir
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
            return None
        if found is not None:
            return found
        checkpoint = ckpt.checkpoint_at(run_dir, chosen)
        return checkpoint, ckpt.load_state(checkpoint.state_path)

    def _saved_settings(self, checkpoint: ckpt.Checkpoint, state: dict[str, Any]) -> Settings | None:
        """The settings the checkpoint was made with.

        The checkpoint's own settings decide what its state means: resolved.toml is rewritten at
        every start, and an edited (or, before atomic writes, a truncated) one must not. It is only
        the fallback for a checkpoint that carries no settings.
        """
        saved = state.get("settings")
        if not isinstance(saved, str):
            return read_resolved(self.run_dir)
        try:
            return from_toml_text(saved, source=str(checkpoint.state_path))
        except UserError as exc:
            raise UserError(
                f"cannot resume {self.run_dir}: the settings saved in its checkpoint cannot be read ({exc}); "
                "nothing was changed in that folder"
            ) from None

    def _check_settings(self, previous: Settings, old_world: int) -> None:
        """Refuse settings that change what the saved state means; warn about the other changes."""
        settings = self.settings
        incompatible = incompatible_changes(previous, settings, old_world=old_world, new_world=self.world)
        if incompatible:
            listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in incompatible.items())
            raise UserError(
                f"cannot resume {self.run_dir}: settings changed the meaning of the saved state ({listing}); "
                "use --fresh to start over or another --out"
            )
        changed = settings_diff(previous, settings)
        if changed:
            self.warn_all("resuming with changed settings: " + ", ".join(sorted(changed)))

    def _restore(self, state: dict[str, Any]) -> None:
        """Give every part its saved state back, this rank's own for the per-rank ones."""
        parts = self.parts
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scaler.load_state_dict(state["scaler"])
        saved_objective = state.get(parts.objective.checkpoint_key)
        if saved_objective is not None:
            parts.objective.load_rank_states(saved_objective, self.rank)
        parts.health.load_state_dict(state["health"])
        saved_rng = state["rng"]
        if isinstance(saved_rng, dict):
            rng.restore(saved_rng)
        elif self.rank < len(saved_rng):
            rng.restore(saved_rng[self.rank])

    def _remapped_step(self, state: dict[str, Any]) -> int:
        """The saved step, moved to the same place in its epoch when the steps per epoch changed."""
        step = int(state["step"])
        steps_epoch = self.steps_per_epoch
        saved_steps_epoch = int(state.get("steps_per_epoch", steps_epoch))
        if saved_steps_epoch == steps_epoch:
            return step
        # The world size or the data changed: keep the epoch and the fraction done of it.
        epoch_saved, batch_saved = divmod(step, saved_steps_epoch)
        step = epoch_saved * steps_epoch + batch_saved * steps_epoch // saved_steps_epoch
        self.warn_all(
            f"steps per epoch changed from {saved_steps_epoch} to {steps_epoch} (world size or data "
            f"changed): resuming in epoch {epoch_saved} at batch {step - epoch_saved * steps_epoch}; "
            "this is not an exact continuation of the saved run"
        )
        return step
