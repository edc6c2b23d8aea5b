"""Scratch folders a launcher shares with its workers, and their removal when every owner is gone.

The local launcher (:mod:`swavctl.distributed.launch`) makes a folder in the system's temporary directory for
its workers' outcomes and logs, and removes it when the launch ends. A launcher killed with
SIGKILL (or by the OOM killer) cannot remove it, so each new launch removes the folders whose
owners are all gone.

"Gone" is decided by the kernel, not by process ids (which are reused, and differ between
container pid namespaces sharing one ``/tmp``): the launcher and every worker hold a shared
``flock`` on the folder's ``.lock`` for as long as they live, and the kernel drops a lock when
its last holder exits, however it exits. A folder is removed only when an exclusive lock on it
succeeds, only if this user owns it, and only once its lock file is older than
:data:`MIN_AGE_S` (a folder just made has no lock held yet).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

LOCK_FILE = ".lock"
#: Seconds a lock file must exist before its folder may be judged abandoned.
MIN_AGE_S = 60.0

_held: list[IO[str]] = []  # shared locks this process keeps until it exits (workers)


def _lock_shared(folder: Path, *, create: bool) -> IO[str] | None:
    """Hold a shared lock on ``folder/.lock`` (None when it cannot be taken).

    Read-write, not append-only: NFSv4 refuses a shared lock on a file open for writing only
    (EBADF) while it grants an exclusive one, which would let another launch judge a live folder
    abandoned. Never blocks: an exclusive holder is a launch removing the folder.
    """
    handle = open(folder / LOCK_FILE, "a+" if create else "r+")  # noqa: SIM115 - held until closed
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def remove_abandoned(parent: Path, prefix: str, *, min_age_s: float = MIN_AGE_S) -> list[Path]:
    """Remove ``parent/prefix*`` folders of this user that nobody holds a lock on; return them."""
    removed: list[Path] = []
    now = time.time()
    for folder in parent.glob(f"{prefix}*"):
        lock = folder / LOCK_FILE
        try:
            if folder.stat().st_uid != os.getuid() or now - lock.stat().st_mtime < min_age_s:
                continue
            with open(lock, "r+") as handle:  # read-write, as the holders open it; never creates it
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: in use
                shutil.rmtree(folder)
        except OSError:  # in use, already gone, no lock file (not ours to judge), or not removable
            continue
        removed.append(folder)
    return removed


@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A new, locked folder ``<tmp>/<prefix>XXXX``, removed on exit; abandoned ones go first."""
    parent = Path(tempfile.gettempdir())
    remove_abandoned(parent, prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    handle = None
    try:
        handle = _lock_shared(folder, create=True)
        if handle is None:  # no locks here: without its lock file, no launch will judge the folder
            (folder / LOCK_FILE).unlink(missing_ok=True)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if handle is not None:
            handle.close()


def join(folder: Path) -> None:
    """Hold a shared lock on ``folder`` until this process exits (a worker of its launcher).

    Where the lock cannot be taken, the launcher's own lock (or its missing lock file) keeps the
    folder while the launcher lives."""
    with contextlib.suppress(OSError):  # no lock file: the launcher could not lock it either
        handle = _lock_shared(folder, create=False)
        if handle is not None:
            _held.append(handle)
