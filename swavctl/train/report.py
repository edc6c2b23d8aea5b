"""What the pretraining loop tells the outside world (the CLI renders it; tests and benches listen)."""

from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    """What the loop tells the outside world (the CLI renders it)."""

    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def start(self, total_steps: int, done_steps: int, *, steps_per_epoch: int = 0) -> None: ...
    def step(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None:
        """End the display (idempotent): called however the run ends, a signal or an error too."""
        ...


class QuietReporter:
    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def start(self, total_steps: int, done_steps: int, *, steps_per_epoch: int = 0) -> None:
        pass

    def step(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
