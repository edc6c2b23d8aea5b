"""How many CPU cores this process can use: its CPU affinity and its cgroup's CPU quota.

``os.cpu_count()`` counts the machine. A process may run on fewer cores: its affinity
(``taskset``, cgroup cpusets, SLURM's binding) lists the cores it may run on, and a CPU quota
(``docker run --cpus 2``, Kubernetes CPU limits, systemd's ``CPUQuota``) caps the time it gets
across all of them, however many it may use. Threads beyond either only wait their turn.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup(proc_cgroup: str, controller: str | None) -> str | None:
    """This process's cgroup path for ``controller`` (cgroup v1), or the unified one (None: v2)."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if controller is None and hierarchy == "0" and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(root: Path, path: str | None) -> list[Path]:
    """``root/path``, its parents up to ``root``, then ``root`` itself (deduplicated, in that order)."""
    folders: list[Path] = []
    if path:
        folder = root / path.strip("/")
        while folder != root and root in folder.parents:
            folders.append(folder)
            folder = folder.parent
    folders.append(root)
    return folders


def _v2_quota(folder: Path) -> float | None:
    fields = (_read(folder / "cpu.max") or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int(_read(folder / "cpu.cfs_quota_us") or "-1")
        period = int(_read(folder / "cpu.cfs_period_us") or "0")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def quota_cores(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The CPU quota over this process's cgroup and its ancestors, in cores (quota / period; the
    smallest one), or None without any.

    cgroup v2: ``cpu.max`` holds ``"QUOTA PERIOD"`` or ``"max PERIOD"``. cgroup v1:
    ``cpu/cpu.cfs_quota_us`` (-1 for none) and ``cpu/cpu.cfs_period_us``. The path comes from
    ``/proc/self/cgroup``; inside a container's cgroup namespace it is ``/``, the container's own.
    """
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    quotas = [_v2_quota(folder) for folder in _ancestors(root, _own_cgroup(proc_cgroup, None))]
    v1_root = root / "cpu"
    quotas += [_v1_quota(folder) for folder in _ancestors(v1_root, _own_cgroup(proc_cgroup, "cpu"))]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def usable_cores(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """The cores this process can keep busy: its affinity, capped by its cgroup's CPU quota
    (rounded up: 1.5 cores of quota keep 2 threads busy part of the time)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = quota_cores(root, proc_cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores
