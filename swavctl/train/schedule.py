"""The per-iteration learning-rate schedule of SwAV: linear warmup, then cosine decay."""

from __future__ import annotations

import math

from swavctl.config import Settings


def learning_rate(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    base_lr: float,
    final_lr: float,
    warmup_epochs: float,
    start_warmup_lr: float,
) -> float:
    """Learning rate at optimizer step ``step`` (0-based), as in the official ``main_swav.py``.

    Warmup: ``W = round(steps_per_epoch * warmup_epochs)`` steps going linearly from
    ``start_warmup_lr`` to ``base_lr`` (``numpy.linspace`` semantics, both ends included).
    Then ``lr(t) = final + (base - final) * (1 + cos(pi * t / T)) / 2`` for ``t`` in ``[0, T)``,
    ``T = steps_per_epoch * epochs - W``. Past the end the final value is kept.
    """
    warmup_steps = round(steps_per_epoch * warmup_epochs)
    if step < warmup_steps:
        if warmup_steps == 1:
            return start_warmup_lr
        return start_warmup_lr + (base_lr - start_warmup_lr) * step / (warmup_steps - 1)
    decay_steps = max(1, steps_per_epoch * epochs - warmup_steps)
    t = min(step - warmup_steps, decay_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / decay_steps))


class LrSchedule:
    """The learning rate of every optimizer step of a run: :func:`learning_rate` with the run's
    ``optim`` settings, ``train.epochs`` and steps per epoch, fixed once."""

    def __init__(self, settings: Settings, steps_per_epoch: int) -> None:
        self.settings = settings
        self.steps_per_epoch = steps_per_epoch

    def __call__(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        optim = self.settings.optim
        return learning_rate(
            step,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.settings.train.epochs,
            base_lr=optim.base_lr,
            final_lr=optim.final_lr,
            warmup_epochs=optim.warmup_epochs,
            start_warmup_lr=optim.start_warmup_lr,
        )

    def resume_line(self, step: int, previous: Settings | None) -> str:
        """The learning rate a run resumes at, and whether the cosine schedule was recomputed."""
        epochs = self.settings.train.epochs
        text = (
            f"learning rate at step {step}: {self(step):.6g} "
            f"(cosine to step {self.steps_per_epoch * epochs}, {epochs} epochs)"
        )
        if previous is not None and previous.train.epochs != epochs:
            text += (
                f"; the schedule is recomputed over {epochs} epochs instead of "
                f"{previous.train.epochs}, so the rate rises from where the shorter run left it"
                if epochs > previous.train.epochs
                else f"; the schedule is recomputed over {epochs} epochs instead of {previous.train.epochs}"
            )
        return text


def schedule_conflicts(
    *,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
    freeze_prototypes_steps: int,
    queue_length: int,
    queue_start_epoch: int,
) -> list[str]:
    """Schedule settings that cannot take effect in a run of ``epochs`` epochs of ``steps_per_epoch``.

    Step counts in the recipes are for ImageNet (5005 steps per epoch at batch 256): on a smaller
    dataset the same numbers can outlast the whole run. Each conflict is one warning line.
    """
    total = steps_per_epoch * epochs
    found = []
    if freeze_prototypes_steps >= total:
        found.append(
            f"swav.freeze_prototypes_steps={freeze_prototypes_steps} covers the whole run ({total} steps: "
            f"{epochs} epochs of {steps_per_epoch}): the prototypes never train; the recipes' values count "
            "ImageNet steps, so scale it to your data"
        )
    if queue_length > 0 and queue_start_epoch >= epochs:
        found.append(
            f"swav.queue_start_epoch={queue_start_epoch} is not before train.epochs={epochs}: the queue "
            f"(swav.queue_length={queue_length}) is never used"
        )
    if warmup_epochs > epochs:
        found.append(
            f"optim.warmup_epochs={warmup_epochs:g} exceeds train.epochs={epochs}: the learning rate never "
            "reaches optim.base_lr"
        )
    return found
