"""Injected faults, so the fault tests can make a real run fail in a chosen way; all off unless set.

They are read from the environment once, at the process edge (:mod:`swavctl.train.job`, where the
worker or the single process starts a run), and handed to :func:`swavctl.train.loop.pretrain`:

- ``SWAVCTL_TEST_NAN_AT="RANK:STEP"``: multiply the loss by NaN on RANK at optimizer step STEP (1-based);
- ``SWAVCTL_TEST_RAISE_AT="RANK:STEP"``: raise RuntimeError on RANK at optimizer step STEP;
- ``SWAVCTL_TEST_STEP_SLEEP="SECONDS"``: sleep after every step (so a test can signal mid-run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from swavctl.errors import UserError

HOOK_NAN = "SWAVCTL_TEST_NAN_AT"
HOOK_RAISE = "SWAVCTL_TEST_RAISE_AT"
HOOK_SLEEP = "SWAVCTL_TEST_STEP_SLEEP"


@dataclass(frozen=True)
class FaultHooks:
    """The faults to inject: ``(rank, step)`` pairs with 1-based steps, and a sleep after each step."""

    nan_at: tuple[int, int] | None = None
    raise_at: tuple[int, int] | None = None
    sleep_s: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultHooks:
        """The hooks the environment sets; :class:`UserError` for a malformed value."""
        return cls(
            nan_at=_rank_step(environ, HOOK_NAN),
            raise_at=_rank_step(environ, HOOK_RAISE),
            sleep_s=_seconds(environ, HOOK_SLEEP),
        )

    def raise_if_due(self, rank: int, step: int) -> None:
        """Raise the injected failure when ``(rank, step)`` is the one asked for."""
        if self.raise_at == (rank, step):
            raise RuntimeError(f"injected failure on rank {rank} at step {step} ({HOOK_RAISE})")

    def poison(self, loss: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        """``loss`` times NaN when ``(rank, step)`` is the one asked for, else ``loss`` itself."""
        return loss * float("nan") if self.nan_at == (rank, step) else loss

    def pause(self) -> None:
        """The sleep after a step (none unless asked for)."""
        if self.sleep_s:
            time.sleep(self.sleep_s)


def _rank_step(environ: Mapping[str, str], name: str) -> tuple[int, int] | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        rank_text, step_text = text.split(":")
        return int(rank_text), int(step_text)
    except ValueError:
        raise UserError(f"{name} must be RANK:STEP, got {text!r}") from None


def _seconds(environ: Mapping[str, str], name: str) -> float:
    text = environ.get(name, "").strip()
    try:
        return float(text) if text else 0.0
    except ValueError:
        raise UserError(f"{name} must be a number of seconds, got {text!r}") from None
