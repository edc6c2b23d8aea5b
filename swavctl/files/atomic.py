"""Atomic, durable writes of every output, and the file helpers around them.

A reader (or a crash) sees the old file or the complete new one, never a part: the data goes to a
temporary in the same folder, is fsynced and renamed over the target, and the folder is fsynced
last (:func:`atomic_file`). A failed write is one :class:`~swavctl.errors.OutputWriteError` naming
the file. This module imports nothing heavy (no torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from swavctl.errors import OutputWriteError, UserError
from swavctl.errors.messages import output_not_writable

_CHUNK = 2**20


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: some systems cannot open folders)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def probe_writable(folder: Path) -> None:
    """Create ``folder`` (and its parents), then write and remove a probe file in it.

    Raises the ``OSError`` of whatever step fails (a file in the way, no permission, a read-only
    or full file system), so a command can refuse an output folder before its work starts.
    """
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def make_parent(path: Path) -> None:
    """Create the folder that will hold ``path``; a :class:`UserError` naming it when that fails."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(output_not_writable(path, exc.strerror or exc)) from None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this one does): a temporary named after it may be in use."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove ``.NAME.tmp-PID`` files that a killed writer of ``path`` left (their PID is gone)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary handle whose contents replace ``path`` when the block ends, atomically and durably.

    The data goes to ``.NAME.tmp-PID`` in the same folder (created as ``open`` creates any file:
    0666 less the umask), is flushed and fsynced, and is renamed over ``path``; the folder is
    fsynced last. A reader (or a crash) sees the old file or the complete new one, never a part.
    Temporaries of killed writers are removed first. An ``OSError`` (disk full, file-size limit,
    no permission) becomes one :class:`OutputWriteError` naming ``path``; the old file stays, and
    so it does when the block raises anything else.
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputWriteError(path, exc.errno, str(exc.strerror or exc)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace ``path`` with what ``write(handle)`` writes (see :func:`atomic_file`)."""
    with atomic_file(path) as handle:
        write(handle)


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_atomic` for UTF-8 text."""
    data = text.encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """:func:`write_text_atomic` of ``data`` as indented JSON, with a final newline."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return h.hexdigest()
