"""Where a run writes: choosing the output folder, ``runs/latest``, and resume compatibility."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from swavctl.config import Settings, dotted, from_toml_text

RUNS_ROOT = Path("runs")
LATEST = "latest"
SUMMARY_FILE = "summary.json"
RESOLVED_FILE = "resolved.toml"

# Settings whose change alters the meaning of saved state: resuming across them is refused.
INCOMPATIBLE_FIELDS = (
    "model.arch",
    "model.hidden_dim",
    "model.embedding_dim",
    "model.prototypes",
    "data.crop_counts",
    "data.crop_sizes",
    "swav.assignment_crops",
    "swav.queue_length",
    "train.batch_size",
    "optim.lars_exclude_bias_norm",  # splits the optimizer's parameter groups differently
)


def settings_diff(
    old: Settings, new: Settings, *, ignore: tuple[str, ...] = ("out",)
) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two settings trees: {key: (old, new)}."""
    a = dotted(old.model_dump(mode="json"))
    b = dotted(new.model_dump(mode="json"))
    return {
        k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)
    }


def incompatible_changes(
    old: Settings, new: Settings, *, old_world: int, new_world: int
) -> dict[str, tuple[Any, Any]]:
    """The changes that make a saved state meaningless for the new settings."""
    diff = {k: v for k, v in settings_diff(old, new).items() if k in INCOMPATIBLE_FIELDS}
    if old_world != new_world and new.swav.queue_length > 0:
        diff["world_size (queue is per rank)"] = (old_world, new_world)
    return diff


def read_resolved(run_dir: Path) -> Settings | None:
    path = run_dir / RESOLVED_FILE
    if not path.is_file():
        return None
    try:
        return from_toml_text(path.read_text(), source=str(path))
    except Exception:  # noqa: BLE001 - an unreadable old run is simply not resumable
        return None


def is_complete(run_dir: Path) -> bool:
    return (run_dir / SUMMARY_FILE).is_file()


def select_run_dir(settings: Settings, *, fresh: bool, runs_root: Path = RUNS_ROOT) -> tuple[Path, bool]:
    """Pick the output folder; returns (folder, reused).

    An explicit ``out`` is used as given. Otherwise, when ``runs/latest`` is an unfinished run with
    the same settings (so the same command was re-run after a crash), it is reused, and the run
    resumes; else a new folder ``runs/<time>-<preset or arch>`` is made.
    """
    if settings.out:
        return Path(settings.out).expanduser(), False
    latest = runs_root / LATEST
    if not fresh and latest.is_dir() and not is_complete(latest):
        previous = read_resolved(latest)
        if previous is not None and not settings_diff(previous, settings):
            return latest.resolve(), True
    label = (settings.preset or settings.model.arch).replace("/", "_").replace(".toml", "")
    label = Path(label).name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = runs_root / f"{stamp}-{label}"
    n = 1
    while candidate.exists():
        n += 1
        candidate = runs_root / f"{stamp}-{label}-{n}"
    return candidate, False


def point_latest(run_dir: Path, runs_root: Path = RUNS_ROOT) -> None:
    """Make ``runs/latest`` a symlink to ``run_dir`` (atomically replaced)."""
    run_dir = run_dir.resolve()
    runs_root.mkdir(parents=True, exist_ok=True)
    root = runs_root.resolve()
    target = os.path.relpath(run_dir, root)
    tmp = root / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, root / LATEST)
