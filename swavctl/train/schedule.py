"""The per-iteration learning-rate schedule of SwAV: linear warmup, then cosine decay."""

from __future__ import annotations

import math


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
