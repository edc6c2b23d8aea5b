"""Crash-safe checkpoints: a state file plus a manifest that commits it.

A checkpoint at step ``n`` is two files in ``OUT/checkpoints/``:

- ``step-<n>.pt``: a plain dictionary of tensors and primitives saved with ``torch.save``;
- ``step-<n>.json``: the manifest (format, step, epoch, size and SHA-256 of the state file, and a
  commit serial).

Both are written to a temporary name, flushed, fsynced and renamed, the state file first. The
manifest is the commit marker: a state file without one, or whose size or hash disagrees with
it, does not count. Loading uses ``torch.load(weights_only=True)``, so no code is unpickled.

"Newest" means last committed, by the serial, not the highest step: after a resume whose step
was remapped (the steps per epoch changed) or that fell back past a damaged checkpoint, the new
checkpoints can have lower step numbers than older files still on disk. Old checkpoints are
purged only after a new one commits, oldest first.
"""

from __future__ import annotations

import errno as errno_names
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swavctl.distributed.outcomes import CHECKPOINT_WRITE, ReportedFailure
from swavctl.errors import OutputWriteError, UserError
from swavctl.files.atomic import pid_alive, write_atomic, write_text_atomic

FORMAT = "swavctl-checkpoint-1"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.(pt|json)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    state_path: Path
    manifest_path: Path
    serial: int = 0  # commit order; 0 for manifests written before serials, -1 for an unreadable one


class _ErrorKeepingWriter:
    """A file wrapper that remembers the ``OSError`` of a failed write.

    ``torch.save`` turns a failing ``write`` into a ``RuntimeError`` without the errno ("unexpected
    pos ..."); keeping the original lets a full disk be reported as one.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.handle.write(data))
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(state: dict[str, Any], handle: Any) -> None:
    writer = _ErrorKeepingWriter(handle)
    try:
        torch.save(state, writer)  # type: ignore[arg-type]
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, step: int, epoch: int, state: dict[str, Any], *, keep: int) -> Path:
    """Write and commit the checkpoint of ``step``; then keep only the newest ``keep`` ones.

    An ``OSError`` (disk full, quota, file-size limit) is re-raised as :class:`CheckpointWriteError`
    naming the path and errno; earlier checkpoints are untouched in that case.
    """
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / f"step-{step:09d}.pt"
    manifest_path = folder / f"step-{step:09d}.json"
    serial = 1 + max((c.serial for c in list_committed(folder)), default=0)
    try:
        # Each file is committed by files.atomic.write_atomic (temporary, fsync, rename, folder fsync);
        # the manifest, written last, commits the checkpoint.
        write_atomic(state_path, lambda handle: _torch_save(state, handle))
        manifest = {
            "format": FORMAT,
            "step": step,
            "epoch": epoch,
            "state_file": state_path.name,
            "bytes": state_path.stat().st_size,
            "sha256": file_digest(state_path),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "serial": serial,
        }
        write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
    except OutputWriteError as exc:  # writing the state or the manifest
        raise _write_failed(exc.path, exc.errno, exc.reason) from None
    except OSError as exc:  # reading the state back for its size and digest
        target = Path(exc.filename) if exc.filename else state_path
        raise _write_failed(target, exc.errno, str(exc.strerror or exc)) from None
    purge(folder, keep=keep)
    return state_path


def _write_failed(target: object, errno: int | None, reason: str) -> CheckpointWriteError:
    name = errno_names.errorcode.get(errno or 0, "")
    return CheckpointWriteError(
        f"could not write checkpoint {target}: [errno {errno}{' ' + name if name else ''}] "
        f"{reason}; the earlier checkpoints are intact",
        errno,
    )


class CheckpointWriteError(ReportedFailure):
    """Saving a checkpoint failed (for example, the disk is full)."""

    status = CHECKPOINT_WRITE

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


def list_committed(folder: Path) -> list[Checkpoint]:
    """Checkpoints with a manifest, oldest first: in commit order, then by step (not yet verified).

    A manifest that cannot be read sorts first: it can never be used, so it is purged first.
    """
    if not folder.is_dir():
        return []
    found: list[Checkpoint] = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and match.group(2) == "json":
            step = int(match.group(1))
            found.append(Checkpoint(step, folder / f"step-{step:09d}.pt", path, _serial(path)))
    return sorted(found, key=lambda c: (c.serial, c.step))


def _serial(manifest_path: Path) -> int:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return -1
    if not isinstance(manifest, dict):
        return -1
    serial = manifest.get("serial", 0)
    return serial if isinstance(serial, int) and serial >= 0 else -1


def purge(folder: Path, *, keep: int) -> None:
    """Delete committed checkpoints beyond the newest ``keep``, oldest first, and stale temp files."""
    committed = list_committed(folder)
    for old in committed[: max(0, len(committed) - keep)]:
        old.manifest_path.unlink(missing_ok=True)  # uncommit first
        old.state_path.unlink(missing_ok=True)
    newest = max((c.step for c in committed), default=-1)
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and match.group(2) == "pt" and int(match.group(1)) < newest:
            if not path.with_suffix(".json").exists():
                path.unlink(missing_ok=True)  # an older state file that never committed
        elif path.name.startswith(".step-") and ".tmp-" in path.name:
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                path.unlink(missing_ok=True)


def verify(checkpoint: Checkpoint) -> str | None:
    """Why ``checkpoint`` cannot be used, or None when its manifest and state file agree."""
    try:
        manifest = json.loads(checkpoint.manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return "manifest has an unknown format"
    if not checkpoint.state_path.exists():
        return "state file is missing"
    size = checkpoint.state_path.stat().st_size
    if size != manifest.get("bytes"):
        return f"state file has {size} bytes, manifest says {manifest.get('bytes')} (truncated?)"
    if file_digest(checkpoint.state_path) != manifest.get("sha256"):
        return "state file hash does not match its manifest (altered or corrupt)"
    return None


def uncommitted_states(folder: Path) -> list[Path]:
    """State files newer than every committed checkpoint that have no manifest."""
    committed = {c.step for c in list_committed(folder)}
    newest = max(committed, default=-1)
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _NAME.match(path.name)
            if match and match.group(2) == "pt" and int(match.group(1)) > newest:
                found.append(path)
    return sorted(found)


def load_state(path: Path) -> dict[str, Any]:
    """Load a state file without unpickling code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a usable checkpoint"
        raise UserError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a swavctl checkpoint")
    return state


def checkpoint_at(run_dir: Path, step: int) -> Checkpoint:
    """The checkpoint of ``step`` in ``run_dir`` (not verified)."""
    folder = run_dir / CHECKPOINT_DIR
    return Checkpoint(step, folder / f"step-{step:09d}.pt", folder / f"step-{step:09d}.json")


def latest_checkpoint(run_dir: Path, *, warn: Any = None) -> tuple[Checkpoint, dict[str, Any]] | None:
    """The newest checkpoint that verifies and loads, or None.

    Unusable ones (no commit marker, truncated, altered) are skipped; ``warn(message)`` is called
    with the file and the reason for each.
    """
    folder = run_dir / CHECKPOINT_DIR
    for path in uncommitted_states(folder):
        if warn:
            warn(f"skipping checkpoint {path}: no commit marker (manifest missing)")
    committed = list_committed(folder)
    for checkpoint in [c for c in committed if c.serial < 0]:  # unreadable manifests: never usable
        if warn:
            warn(f"skipping checkpoint {checkpoint.state_path}: {verify(checkpoint) or 'invalid serial'}")
    for checkpoint in reversed([c for c in committed if c.serial >= 0]):
        reason = verify(checkpoint)
        if reason is None:
            try:
                return checkpoint, load_state(checkpoint.state_path)
            except UserError as exc:
                reason = str(exc)
        if warn:
            warn(f"skipping checkpoint {checkpoint.state_path}: {reason}")
    return None
