"""TensorBoard event files in a run folder (``log.tensorboard``, ``--tensorboard``).

Pretraining writes every numeric field of each ``metrics.jsonl`` record (the k-NN readings
included) as a scalar ``train/<field>`` at the record's step; ``eval-linear`` adds its accuracies
as ``eval/<mode>/top1`` and ``eval/<mode>/top5`` at the evaluated model's step, into the same
folder, so TensorBoard shows them as one run.

``metrics.jsonl`` stays the record of a run; the events are derived from it. On every start or
resume, rank 0 deletes the pretraining event files and writes the records ``metrics.jsonl`` kept
(cut at the checkpoint's step) into a new one, then appends as training goes on. So a resume
neither duplicates the steps past the checkpoint nor leaves them behind, with any TensorBoard
version (no reliance on ``purge_step`` handling), and turning TensorBoard on for a resumed run
gives it its whole history. The eval files (``*.eval``) are left alone.

The event folder is ``RUN/tb``. Both of TensorBoard's loaders (the Python multiplexer and the
Rust data server) follow symbolic links to folders when they walk a logdir; ``runs/latest`` is a
one-line pointer file (:mod:`swavctl.files.latest`), not a folder link, so that
``tensorboard --logdir runs`` lists each run once.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from swavctl.errors import UserError

#: The event folder inside a run folder.
TB_DIR = "tb"
#: Suffixes of the event files, so each writer replaces only its own.
PRETRAIN_SUFFIX = ".pretrain"
EVAL_SUFFIX = ".eval"
INSTALL_HINT = "pip install 'swavctl[tensorboard]' (or pip install tensorboard)"


def available() -> bool:
    """Whether torch's SummaryWriter can be imported (it needs the ``tensorboard`` package)."""
    if importlib.util.find_spec("tensorboard") is None:
        return False
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    """Raise :class:`UserError` unless TensorBoard logging can work here."""
    if not available():
        raise UserError(f"log.tensorboard needs the tensorboard package: {INSTALL_HINT}")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields but ``step``/``epoch`` (booleans as 0/1; non-finite kept)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "epoch"):
            continue
        if isinstance(value, bool | int | float):
            out[key] = float(value)
    return out


class TrainingLog:
    """Pretraining's event file in ``RUN/tb``: replayed from ``metrics.jsonl``, then appended."""

    def __init__(self, run_dir: Path, metrics_path: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is an optional extra

        folder = run_dir / TB_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"*tfevents*{PRETRAIN_SUFFIX}"):
            old.unlink(missing_ok=True)
        self.writer = SummaryWriter(log_dir=str(folder), filename_suffix=PRETRAIN_SUFFIX)
        for record in _records(metrics_path):
            self.add(record, flush=False)
        self.writer.flush()

    def add(self, record: dict[str, Any], *, flush: bool = True) -> None:
        """Each scalar of ``record`` as ``train/<field>`` at ``record["step"]``, on disk at once
        (as ``metrics.jsonl``'s line is) unless ``flush`` is False."""
        step = int(record["step"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(f"train/{key}", value, step)
        if flush:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def add_eval(run_dir: Path, mode: str, step: int, values: dict[str, float]) -> Path:
    """``eval/<mode>/<name>`` scalars at ``step`` in ``RUN/tb`` (a file of their own); returns the folder.

    Non-finite values are skipped.
    """
    from torch.utils.tensorboard import SummaryWriter

    folder = run_dir / TB_DIR
    writer = SummaryWriter(log_dir=str(folder), filename_suffix=EVAL_SUFFIX)
    try:
        for name, value in values.items():
            if math.isfinite(value):
                writer.add_scalar(f"eval/{mode}/{name}", value, step)
    finally:
        writer.close()
    return folder
