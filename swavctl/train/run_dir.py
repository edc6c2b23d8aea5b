"""Where a run writes: choosing the output folder, ``runs/latest``, and resume compatibility."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from swavctl.config import RESOLVED_NAME, Settings, dotted, from_toml_text
from swavctl.errors import UserError
from swavctl.files.latest import latest_run
from swavctl.files.latest import point_latest as _point_latest

RUNS_ROOT = Path("runs")
SUMMARY_FILE = "summary.json"
RESOLVED_FILE = RESOLVED_NAME

# Settings whose change alters the meaning of saved state: resuming across them is refused.
INCOMPATIBLE_FIELDS = (
    "method",
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
    old: Settings, new: Settings, *, ignore: tuple[str, ...] = ("out", "preset")
) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two settings trees: {key: (old, new)}.

    ``out`` (where the run writes) and ``preset`` (the name the recipe came by) are not compared.
    """
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
    if old_world != new_world and new.method != "swav":
        diff[f"world_size ({new.method}'s memory bank is per rank)"] = (old_world, new_world)
    return diff


def read_resolved(run_dir: Path) -> Settings | None:
    """The settings of the run in ``run_dir`` (migrated), or None when missing or unreadable."""
    return read_resolved_or_why(run_dir)[0]


def read_resolved_or_why(run_dir: Path) -> tuple[Settings | None, str | None]:
    """``(settings, None)``, ``(None, why they cannot be read)``, or ``(None, None)`` when absent."""
    path = run_dir / RESOLVED_FILE
    if not path.is_file():
        return None, None
    try:
        return from_toml_text(path.read_text(), source=str(path)), None
    except UserError as exc:
        return None, str(exc)
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read {path}: {exc}"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``summary.json``, or None when it has none (unfinished) or it is unreadable."""
    try:
        data = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def resume_command(run_dir: Path, *extra: str) -> str:
    """The command that resumes (or extends) the run in ``run_dir`` with exactly its settings.

    Its ``resolved.toml`` as the preset gives every setting the run had; ``--out`` names the folder
    (a preset never does). Nothing of the command that was run is carried over (no ``--fresh``).
    """
    folder = run_dir.resolve()
    return shlex.join(
        ["swavctl", "pretrain", "--preset", str(folder / RESOLVED_FILE), "--out", str(folder), *extra]
    )


def _steps_per_epoch(summary: dict[str, Any]) -> int | None:
    spe = summary.get("steps_per_epoch")
    if isinstance(spe, int) and spe > 0:
        return spe
    steps, epochs_done = summary.get("steps"), summary.get("epochs_done")  # a summary before 0.2
    if isinstance(steps, int) and isinstance(epochs_done, (int, float)) and epochs_done > 0:
        return max(1, round(steps / epochs_done))
    return None


def continue_advice(
    run_dir: Path, settings: Settings, summary: dict[str, Any], *, epochs: int | None = None
) -> str | None:
    """How to train the finished run in ``run_dir`` further, as a command that does it.

    A run that stopped before its last epoch (``train.max_steps``, ``train.max_seconds``) goes on to
    its end; a complete one to ``epochs`` (default: twice its own). ``--max-steps`` is passed
    whenever the run had one, as a limit at the new end, so that the old limit cannot stop it.
    None when the summary does not tell how far the run got.
    """
    spe, steps = _steps_per_epoch(summary), summary.get("steps")
    if spe is None or not isinstance(steps, int):
        return None
    own = settings.train.epochs
    if epochs is None and steps < spe * own:
        limit = ["--max-steps", str(spe * own)] if settings.train.max_steps is not None else []
        return f"to train it on to its {own} epochs: {resume_command(run_dir, *limit)}"
    target = epochs if epochs is not None else 2 * own
    extra = ["--epochs", str(target)]
    if settings.train.max_steps is not None:
        extra += ["--max-steps", str(spe * target)]
    return f"to continue it to {target} epochs: {resume_command(run_dir, *extra)}"


def is_complete(run_dir: Path) -> bool:
    """The run finished: its ``summary.json`` (written last, atomically) holds a JSON object."""
    try:
        return isinstance(json.loads((run_dir / SUMMARY_FILE).read_text()), dict)
    except (OSError, ValueError):
        return False


def select_run_dir(settings: Settings, *, fresh: bool, runs_root: Path = RUNS_ROOT) -> tuple[Path, bool]:
    """Pick the output folder; returns (folder, reused).

    An explicit ``out`` is used as given. Otherwise, when ``runs/latest`` is an unfinished run with
    the same settings (so the same command was re-run after a crash), it is reused, and the run
    resumes; else a new folder ``runs/<time>-<preset or arch>`` is made.
    """
    if settings.out:
        return Path(settings.out).expanduser(), False
    latest = latest_run(runs_root)
    if not fresh and latest is not None and not is_complete(latest):
        previous = read_resolved(latest)
        if previous is not None and not settings_diff(previous, settings):
            return latest, True
    label = (settings.preset or settings.model.arch).replace("/", "_").replace(".toml", "")
    label = Path(label).name
    return _unused(runs_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"), False


def _unused(path: Path) -> Path:
    """``path``, or the first of ``path-2``, ``path-3``, ... that does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def finished_latest_note(settings: Settings, *, fresh: bool, runs_root: Path = RUNS_ROOT) -> str | None:
    """A line for a command that re-runs a *finished* ``runs/latest`` (the same settings, or more
    epochs): it starts a new run, which a user who expected a resume should be told, with the
    command that trains the finished one further instead. None otherwise (``--out`` given,
    ``--fresh``, other settings).
    """
    latest = latest_run(runs_root)
    if settings.out or fresh or latest is None:
        return None
    summary = read_summary(latest)
    previous = read_resolved(latest)
    if summary is None or previous is None:
        return None
    changed = settings_diff(previous, settings)
    if set(changed) - {"train.epochs"}:
        return None
    folder = latest
    if "train.epochs" in changed:
        old, new = changed["train.epochs"]
        advice = continue_advice(folder, previous, summary, epochs=new)
        head = f"{folder} (runs/latest) finished its {old} epochs; starting a new run of {new}"
    else:
        advice = continue_advice(folder, previous, summary)
        head = f"{folder} (runs/latest) already finished with these settings; starting a new run"
    return f"{head}. {advice[0].upper()}{advice[1:]}" if advice else head


def unfinished_latest_note(settings: Settings, *, fresh: bool, runs_root: Path = RUNS_ROOT) -> str | None:
    """A line for a command that does not resume an *unfinished* ``runs/latest``: its settings
    differ (or cannot be read), so a new run starts; the line says so and how to resume the
    unfinished one. None when it resumes, or there is none, or ``--out``/``--fresh`` was given.
    """
    latest = latest_run(runs_root)
    if settings.out or fresh or latest is None or is_complete(latest):
        return None
    previous, why = read_resolved_or_why(latest)
    folder = latest
    if previous is None:
        if why is None:  # it stopped before writing its settings: nothing to resume
            return None
        return (
            f"{folder} (runs/latest) is an unfinished run whose settings cannot be read ({why}); "
            "starting a new run, and that folder is left as it is"
        )
    changed = settings_diff(previous, settings)
    if not changed:
        return None
    shown = ", ".join(sorted(changed)[:6]) + (", ..." if len(changed) > 6 else "")
    return (
        f"{folder} (runs/latest) is an unfinished run with other settings ({shown}); starting a new run. "
        f"To resume that one instead: {resume_command(folder)}"
    )


#: What a pretraining run writes in its folder: ``--fresh`` sets these aside together.
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    SUMMARY_FILE,
    "backbone.safetensors",
    RESOLVED_FILE,
    "profile",
)


def set_aside_earlier_run(run_dir: Path) -> Path | None:
    """Move an earlier run's outputs in ``run_dir`` into ``run_dir/replaced-<time>/`` (``--fresh``).

    The checkpoints keep their metrics, summary, settings and exported backbone beside them, and
    the new run starts in a clean folder. Only the files a run writes move (a folder given as
    ``--out`` may hold other things). Returns the new folder, or None when there was nothing.
    """
    present = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not present:
        return None
    aside = _unused(run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir()
    for path in present:
        path.rename(aside / path.name)
    return aside


def point_latest(run_dir: Path, runs_root: Path = RUNS_ROOT) -> None:
    """Make ``runs/latest`` point at ``run_dir`` (see :mod:`swavctl.files.latest`)."""
    _point_latest(run_dir, runs_root)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path, warn: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the duration of a run (rank 0 takes it).

    Two runs writing one folder interleave their metrics, checkpoints and settings without either
    failing. ``flock`` on ``RUN/.lock`` is released by the kernel when the process ends, however it
    ends (kill -9 too), so a crashed run never leaves the folder locked. The holder's pid is
    written into the file for the error message. Raises :class:`UserError` when another process
    holds it. A folder this call created is removed again if the run leaves nothing but the lock
    in it (it failed before writing). On a file system without locks (some Lustre or NFS mounts
    answer ENOLCK or EOPNOTSUPP) the run goes on unlocked, after ``warn(message)``.
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    handle = open(lock, "a+")  # noqa: SIM115 - held open until the run ends
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise UserError(
                f"{run_dir} is in use by another swavctl run{who}; "
                "wait for it to finish, stop it, or use another --out"
            ) from None
        except OSError as exc:  # no locking on this file system: a missing guard, not a failed run
            if warn is not None:
                warn(
                    f"cannot lock {run_dir} ({exc.strerror or exc}): a second run started on this folder "
                    "would not be refused"
                )
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
        created = False  # the run ended normally: its folder stays, whatever it holds
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                lock.unlink()
                run_dir.rmdir()
        handle.close()
