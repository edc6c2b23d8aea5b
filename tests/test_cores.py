"""Usable CPU cores: affinity capped by a cgroup CPU quota, read from real files laid out as the
kernel does (a container's namespaced view, a host's service slice, cgroup v1)."""

from __future__ import annotations

import os
from pathlib import Path

from swavctl.distributed.cores import quota_cores, usable_cores


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_v2_container_quota_caps_the_affinity(tmp_path: Path) -> None:
    _write(tmp_path, "cpu.max", "50000 100000")  # docker run --cpus 0.5
    assert quota_cores(tmp_path, "0::/\n") == 0.5
    assert usable_cores(tmp_path, "0::/\n") == 1
    _write(tmp_path, "cpu.max", "150000 100000")
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path, "0::/\n") == min(affinity, 2)  # 1.5 cores keep 2 threads busy


def test_v2_the_smallest_quota_of_the_cgroup_and_its_parents_counts(tmp_path: Path) -> None:
    own = "0::/system.slice/train.service\n"
    _write(tmp_path, "system.slice/train.service/cpu.max", "max 100000")
    assert quota_cores(tmp_path, own) is None
    _write(tmp_path, "system.slice/cpu.max", "100000 100000")
    assert quota_cores(tmp_path, own) == 1.0
    _write(tmp_path, "system.slice/train.service/cpu.max", "300000 100000")
    assert quota_cores(tmp_path, own) == 1.0


def test_v1_quota_and_no_quota(tmp_path: Path) -> None:
    own = "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n"
    _write(tmp_path, "cpu/docker/abc/cpu.cfs_period_us", "100000")
    _write(tmp_path, "cpu/docker/abc/cpu.cfs_quota_us", "-1")
    assert quota_cores(tmp_path, own) is None
    _write(tmp_path, "cpu/docker/abc/cpu.cfs_quota_us", "250000")
    assert quota_cores(tmp_path, own) == 2.5


def test_missing_or_malformed_files_mean_no_quota(tmp_path: Path) -> None:
    assert quota_cores(tmp_path, "0::/\n") is None
    _write(tmp_path, "cpu.max", "lots 100000")
    assert quota_cores(tmp_path, "0::/\n") is None
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path, "0::/\n") == affinity
