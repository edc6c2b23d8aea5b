"""How a run or an export was made: versions, devices, command line, git commit, host and times.

``summary.json`` carries it under ``provenance``, and every export in its ``provenance`` metadata
(JSON), so a result can be traced to the software and the machine that produced it.
"""

from __future__ import annotations

import platform
import shlex
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the millisecond (``2026-12-06T04:10:00.123Z``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``swavctl`` and its arguments, shell-quoted."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["swavctl", *args])


def git_commit(folder: Path | None = None) -> str | None:
    """The commit checked out in ``folder`` (default: the working directory), with ``+dirty`` when
    tracked files have changes; None when it is not in a git work tree or git is missing."""
    where = folder or Path.cwd()
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=False
        )
        if head.returncode != 0:
            return None
        commit = head.stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_names(device: torch.device | str, count: int = 1) -> list[str]:
    """Names of the devices a run used: the GPUs' (``count`` of them from this one on), or the CPU's."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        first = device.index or 0
        visible = torch.cuda.device_count()
        return [torch.cuda.get_device_name(i % visible) for i in range(first, first + count)]
    return [cpu_name()]


def record(
    *, device: torch.device | str = "cpu", device_count: int = 1, started: str | None = None
) -> dict[str, Any]:
    """The provenance of what this process makes now; ``started`` and ``ended`` (UTC) when given.

    CUDA and cuDNN versions are those of the run's device: None when it ran on the CPU.
    """
    import torchvision

    from swavctl import __version__

    on_cuda = torch.device(device).type == "cuda"
    cudnn = torch.backends.cudnn.version() if on_cuda else None
    out: dict[str, Any] = {
        "swavctl": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if on_cuda else None,
        "cudnn": str(cudnn) if cudnn is not None else None,
        "devices": device_names(device, device_count),
        "command": command_line(),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
    }
    if started is not None:
        out["started_utc"] = started
        out["ended_utc"] = utc_now()
    return out
