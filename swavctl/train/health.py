"""Training health: per-step metrics, code statistics and the collapse warning.

SwAV collapses when every sample predicts the uniform distribution over prototypes; the
swapped-prediction loss then sits at ln K (arXiv 2006.09882; a frequent complaint about peers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

COLLAPSE_REMEDIES = (
    "remedies: lower swav.epsilon (e.g. 0.03), freeze the prototypes longer "
    "(swav.freeze_prototypes_steps), start the queue later or shorten it (swav.queue_start_epoch, "
    "swav.queue_length), use about 10x more prototypes than classes (model.prototypes), "
    "or lower optim.base_lr"
)


def code_statistics(codes: torch.Tensor) -> torch.Tensor:
    """Float64 ``[2]`` on the codes' device: the mean per-sample entropy of the codes (nats) and the
    number of distinct prototypes that are some sample's argmax.

    Computed without reading anything back to the host (no ``unique``, whose output size needs a
    device-to-host copy): the loop reads it together with the step's other values, once.
    """
    probs = codes.float().clamp_min(1e-12)
    entropy = -(probs * probs.log()).sum(dim=1).mean()
    hit = torch.zeros(codes.shape[1], dtype=torch.float32, device=codes.device)
    used = hit.index_fill_(0, codes.argmax(dim=1), 1.0).sum()
    return torch.stack([entropy.double(), used.double()])


def collapsed_loss(prototypes: int | Sequence[int]) -> float:
    """The loss of a model that predicts the uniform distribution: ln K for one prototype set, and
    the mean of ln K_h over several sets (their loss is the mean of the sets' cross-entropies, and
    a uniform prediction over K_h prototypes costs ln K_h whatever the targets)."""
    sizes = [prototypes] if isinstance(prototypes, int) else list(prototypes)
    return sum(math.log(k) for k in sizes) / len(sizes)


class CollapseDetector:
    """Warn once when the loss stays within ``tolerance`` of ln K (:func:`collapsed_loss`) for
    ``patience`` steps after warmup."""

    def __init__(
        self, num_prototypes: int | Sequence[int], *, tolerance: float, patience: int, warmup_steps: int
    ) -> None:
        self.log_k = collapsed_loss(num_prototypes)
        self.tolerance = tolerance
        self.patience = patience
        self.warmup_steps = warmup_steps
        self.streak = 0
        self.warned = False

    def update(self, step: int, loss: float) -> str | None:
        if step < self.warmup_steps:
            return None
        near = abs(loss - self.log_k) <= self.tolerance * self.log_k
        self.streak = self.streak + 1 if near else 0
        if near and self.streak >= self.patience and not self.warned:
            self.warned = True
            return (
                f"possible collapse: the loss has stayed within {self.tolerance:.0%} of "
                f"ln K = {self.log_k:.3f} for {self.streak} steps (step {step}); {COLLAPSE_REMEDIES}"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = int(state["streak"])
        self.warned = bool(state["warned"])


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def loss_at(self, step: int) -> float | None:
        """The loss logged at ``step`` (None when no line has it)."""
        if not self.path.exists():
            return None
        loss = None
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step") == step and isinstance(record.get("loss"), int | float):
                loss = float(record["loss"])
        return loss

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
