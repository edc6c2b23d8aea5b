"""``runs/latest``: a pointer to the newest run folder, kept as a one-line text file.

The file holds the run folder's name (relative to ``runs/``), or an absolute path for a run made
elsewhere with ``--out``. It is a file, not a folder link, so that tools which walk ``runs/``
(``tensorboard --logdir runs``, ``du``, ``rsync``) meet every run once; MMEngine's and
detectron2's ``last_checkpoint`` files follow the same convention. Every swavctl command that
takes a run accepts ``runs/latest`` and reads through it. A ``runs/latest`` symlink written by
swavctl before this change is still followed.
"""

from __future__ import annotations

import os
from pathlib import Path

LATEST = "latest"
_MAX_POINTER_BYTES = 4096


def read_pointer(path: Path) -> Path | None:
    """The run folder a ``latest`` pointer names, or None if ``path`` is not such a pointer.

    A pointer is a small regular file named ``latest`` whose one line names a folder (relative to
    the pointer's own folder, or absolute). A folder link (older runs) is followed as well.
    """
    path = Path(path).expanduser()
    if path.name != LATEST:
        return None
    if path.is_symlink() or path.is_dir():
        return path.resolve() if path.is_dir() else None
    if not path.is_file() or path.stat().st_size > _MAX_POINTER_BYTES:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text or "\n" in text:
        return None
    return (path.parent / text).resolve()


def follow(path: Path) -> Path:
    """``path`` read through a ``latest`` pointer it starts with or passes through.

    ``runs/latest`` becomes the run folder it names, and ``runs/latest/eval`` that folder's
    ``eval``, so the paths users typed when ``runs/latest`` was a folder link still work in every
    swavctl command. A path through no pointer, or through a pointer to a vanished run, is
    returned unchanged, for the caller to report as given.
    """
    path = Path(path)
    parts = path.parts
    for i, part in enumerate(parts):
        if part != LATEST:
            continue
        prefix = Path(*parts[: i + 1]).expanduser()
        if prefix.is_symlink() or prefix.is_dir():
            continue  # a folder (or an old folder link): the file system reads through it itself
        target = read_pointer(prefix)
        if target is not None and target.is_dir():
            return target.joinpath(*parts[i + 1 :])
    return path


def latest_run(runs_root: Path) -> Path | None:
    """The folder that ``runs_root/latest`` points at, if it points at an existing folder."""
    target = read_pointer(runs_root / LATEST)
    return target if target is not None and target.is_dir() else None


def point_latest(run_dir: Path, runs_root: Path) -> None:
    """Make ``runs_root/latest`` name ``run_dir``, atomically (it replaces an older link too)."""
    run_dir = run_dir.resolve()
    runs_root.mkdir(parents=True, exist_ok=True)
    root = runs_root.resolve()
    name = run_dir.name if run_dir.parent == root else str(run_dir)
    tmp = root / f".latest-{os.getpid()}"
    tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, root / LATEST)
