"""The one-shot GPU benchmark script runs end to end (tiny sizes, on the CPU here).

A GPU session is rare and short, so a broken ``bench/gpu.sh`` would waste it: this runs the
script as a GPU session would (``BENCH_TINY=1`` shrinks every size) and checks that every phase
produced figures, that the suite's CUDA tests ran (here: skipped, no GPU) and that the step
profiles were collected. The correctness checks are those CUDA tests (``tests/test_gpu_vs_cpu.py``
and the others marked ``cuda``): the script runs them by name, so a second test checks that its
list names exactly the tests marked ``cuda``, each one collected.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO, cli_env


def _gpu_tests() -> list[str]:
    """``GPU_TESTS`` of ``bench/gpu_config.py`` (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_config", REPO / "bench" / "gpu_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.GPU_TESTS)


def test_the_script_runs_exactly_the_tests_marked_cuda() -> None:
    done = subprocess.run(
        # pyproject's -q lists node ids (a second -q would list files)
        [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider", "-m", "cuda", "tests"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=cli_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    marked = {line.split("[")[0] for line in collected}  # parametrized tests: one name
    names = _gpu_tests()
    assert len(names) == len(set(names))
    missing, unlisted = set(names) - marked, marked - set(names)
    assert not missing and not unlisted, {"not marked cuda": missing, "not in GPU_TESTS": unlisted}


def test_gpu_script_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = cli_env(
        OUT=str(out),
        BENCH_TINY="1",
        BENCH_NO_INSTALL="1",
        BENCH_WORK=str(tmp_path / "work"),
        BENCH_BUDGET_S="300",
        PYTHON=sys.executable,
    )
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh")], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "gpu_bench.json").read_text())
    phases = results["phases"]
    assert "checks" not in phases["core"]  # the correctness checks are the CUDA tests now
    assert phases["core"]["step"]["samples_per_s"] > 0
    for name in ("e2e_device", "e2e_workers"):
        assert phases[name]["returncode"] == 0 and phases[name]["samples_per_s"] > 0, phases[name]
        assert phases[name]["profile_phases"].startswith("profiled steps: 2")
        assert (out / f"{name}.ops.txt").is_file()
    assert phases["loader"]["workers"]["figures"][0]["samples_per_s"] > 0
    # The CUDA tests exist under the names the script runs; without a GPU each one skips.
    tests = phases["gpu_tests"]
    assert tests["returncode"] == 0, tests
    if not torch.cuda.is_available():
        skipped = re.fullmatch(r"(\d+) skipped in .*", tests["summary"])
        assert skipped and int(skipped.group(1)) >= len(_gpu_tests()), tests
        assert tests["outcomes"] and all(
            line.startswith("SKIPPED") and "CUDA" in line for line in tests["outcomes"]
        ), tests
    assert tests["summary"] in (out / "gpu_tests.log").read_text()
    larc = phases["core"]["larc_gpu"]
    assert larc["ours_ops"] < larc["baseline_ops"] and larc["max_abs_diff"] < 1e-6
    report = (out / "gpu_bench.md").read_text()
    assert "TINY sizes" in report and "FAILED" not in report
    assert f"- pytest: {tests['summary']}" in report
    target = "- Target (issue 7): at least 1,500 samples/s end to end with GPU augmentation: **not met**"
    assert target in report
    assert os.path.getsize(out / "gpu.log") > 0
