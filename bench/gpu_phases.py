"""The phases of the one-shot GPU benchmark (``bench/gpu_bench.py`` runs each in its own process).

Each phase returns a JSON-ready dict of figures; see ``gpu_bench.py`` for the plan and the
figures' definitions. Correctness is the test suite's: the ``gpu_tests`` phase runs its CUDA
tests (:data:`gpu_config.GPU_TESTS`) with pytest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpu_config import GPU_TESTS, PREFETCH, REPO, WORK, log, sizes, write_json


def phase_jpegs(out: Path, tiny: bool) -> dict[str, Any]:
    from swavctl.bench.jpegs import write_jpeg_folder

    cfg = sizes(tiny)
    start = time.perf_counter()
    folder = write_jpeg_folder(
        WORK / ("jpegs-tiny" if tiny else "jpegs"),
        cfg["images"],
        width=cfg["image_size"][0],
        height=cfg["image_size"][1],
    )
    files = sorted(folder.glob("img*.jpg"))
    size = sum(f.stat().st_size for f in files)
    return {
        "folder": str(folder),
        "images": len(files),
        "mean_kb": size / max(1, len(files)) / 1024,
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------
# Phase: core (environment, step, Sinkhorn, LARC)


def _environment() -> dict[str, Any]:
    import torch
    import torchvision

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    try:
        env["shm_gb"] = shutil.disk_usage("/dev/shm").total / 2**30
    except OSError:
        env["shm_gb"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gb=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    from swavctl.bench.report import hardware

    env["hardware"] = hardware(torch.device("cuda") if torch.cuda.is_available() else None)
    return env


def _settings(
    tiny: bool,
    *,
    gpu: bool,
    extra: list[str] | None = None,
    arch: str | None = None,
    batch: int | None = None,
    data: str | None = None,
) -> Any:
    from swavctl import config

    cfg = sizes(tiny)
    return config.resolve(
        flags={
            "data.path": data,
            "model.arch": arch or cfg["arch"],
            "train.batch_size": batch or cfg["batch"],
            "dist.gpus": 1 if gpu else 0,
        },
        overrides=[*cfg["overrides"], *(extra or [])],
    )


def _step_figures(tiny: bool, *, compile_model: bool, benchmark: bool = False) -> dict[str, Any]:
    import torch

    from swavctl.bench.step import bench_step

    torch.backends.cudnn.benchmark = benchmark
    cfg = sizes(tiny)
    gpu = torch.cuda.is_available()
    settings = _settings(tiny, gpu=gpu, extra=[f"train.compile={'true' if compile_model else 'false'}"])
    result = bench_step(settings, steps=cfg["step_steps"], warmup=cfg["step_warmup"])
    figures = result.as_dict()
    figures["cudnn_benchmark"] = benchmark
    figures["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    log(
        f"step ({'compiled' if compile_model else 'eager'}, cudnn.benchmark={benchmark}): "
        f"{result.samples_per_s:.1f} samples/s, MFU {result.mfu}, first step {result.first_step_s:.1f} s, "
        f"loss {result.final_loss:.4f}"
    )
    return figures


def phase_core(out: Path, tiny: bool) -> dict[str, Any]:
    """The environment, then the training step alone (eager), Sinkhorn and LARC timings."""
    import torch

    result: dict[str, Any] = {"environment": _environment()}
    write_json(out / "phases" / "core.json", result)
    if torch.cuda.is_available():
        # With its index: tensors report cuda:0, and torch.device("cuda") != torch.device("cuda:0").
        device = torch.device("cuda", torch.cuda.current_device())
    elif tiny:
        log("no CUDA device: running the timings on the CPU (a check of this script only)")
        device = torch.device("cpu")
    else:
        log("no CUDA device: GPU timings are skipped")
        return result
    _wait_for_jpegs(out, 120)
    result["step"] = _step_figures(tiny, compile_model=False)
    write_json(out / "phases" / "core.json", result)
    # (cudnn.benchmark made no difference on the H200, 1200 against 1197 samples/s: no longer timed.)
    from swavctl.bench.sinkhorn import bench_sinkhorn

    b, k = (512, 300) if tiny else (4096, 3000)
    result["sinkhorn_gpu"] = bench_sinkhorn(b, k, device=device, repeats=10).as_dict()
    result["sinkhorn_cpu"] = bench_sinkhorn(b, k, device=torch.device("cpu"), repeats=3).as_dict()
    log(f"sinkhorn GPU: {result['sinkhorn_gpu']}")
    from swavctl.bench.larc import bench_larc

    preset = "smoke" if tiny else "swav-rn50-800ep"
    result["larc_gpu"] = bench_larc(device=device, preset=preset, repeats=5 if tiny else 20).as_dict()
    log(f"larc GPU: {result['larc_gpu']}")
    return result


def _wait_for_jpegs(out: Path, seconds: float) -> None:
    deadline = time.time() + seconds
    while not (out / "phases" / "jpegs.json").exists() and time.time() < deadline:
        time.sleep(1)


# ---------------------------------------------------------------------------------------------
# Phases: loader, gpu_tests, step_compile, e2e_*


def _worker_counts(tiny: bool) -> tuple[int, int]:
    """(workers that read bytes, workers that decode and augment), each capped by /dev/shm.

    Every worker holds up to 4 batches in shared memory (the loop's prefetch): JPEG bytes (about
    80 KB a file) for the first kind, float32 crops for the second. Too small a /dev/shm (a
    container's 64 MB default) leaves 0 workers: the main process loads, slowly but safely.
    """
    cfg = sizes(tiny)
    cpus = os.cpu_count() or 2
    try:
        shm = 0.6 * shutil.disk_usage("/dev/shm").total
    except OSError:
        shm = 0.0
    big, small = cfg["crop_sizes"]
    crops_bytes = (2 * big**2 + 6 * small**2) * 3 * 4
    counts = []
    for wanted, per_sample in ((max(1, min(8, cpus - 2)), 80_000), (max(1, cpus - 2), crops_bytes)):
        fits = int(shm // (4 * cfg["batch"] * per_sample))
        if fits < wanted:
            log(f"/dev/shm has {shm / 0.6 / 2**30:.2f} GiB: {fits} workers fit (wanted {wanted})")
        counts.append(min(wanted, fits))
    return counts[0], counts[1]


def phase_loader(out: Path, tiny: bool) -> dict[str, Any]:
    """The loader alone (``swavctl bench data``) in the three ways of feeding the GPU."""
    import torch

    from swavctl.bench.data import bench_data

    jpegs = json.loads((out / "phases" / "jpegs.json").read_text())
    gpu = torch.cuda.is_available()
    light, heavy = _worker_counts(tiny)
    batches, warmup = (4, 1) if tiny else (24, 3)
    result: dict[str, Any] = {}
    for key, augment_on, workers, decode_in_workers in [
        ("device_nvjpeg", "device", light, False),
        ("device_decode_in_workers", "device", heavy, True),
        ("workers", "workers", heavy, False),
    ]:
        settings = _settings(tiny, gpu=gpu, data=jpegs["folder"], extra=[f"data.augment_on={augment_on}"])
        r = bench_data(
            settings, workers=[workers], batches=batches, warmup=warmup, decode_in_workers=decode_in_workers
        )
        result[key] = r.as_dict()
        log(f"loader {key}: {r.best_samples_per_s:.0f} samples/s, {workers} workers, decode in {r.decode}")
        write_json(out / "phases" / "loader.json", result)
    return result


def phase_gpu_tests(out: Path, tiny: bool, limit: float) -> dict[str, Any]:
    """The suite's CUDA tests, by name, with pytest from .whl if needed (without a GPU they all skip,
    which still checks that they are there to be run). pytest's whole output, with the figures the
    tests print (``-rA`` shows a passed test's output), goes to ``OUT/gpu_tests.log``."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed (bench/gpu.sh installs it from .whl/ when there)"}
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *GPU_TESTS]  # -q: pyproject
    log(f"gpu_tests: {' '.join(args[2:])}")
    try:
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=max(10.0, limit - 10))
    except subprocess.TimeoutExpired as exc:  # keep what had run: -rA lines come at the end, -q's dots
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        (out / "gpu_tests.log").write_text(partial)
        return {"timed_out_after_s": limit - 10, "output_tail": partial[-4000:]}
    (out / "gpu_tests.log").write_text(done.stdout + done.stderr)
    lines = done.stdout.strip().splitlines()
    outcomes = [line for line in lines if line.startswith(("PASSED", "FAILED", "ERROR", "SKIPPED"))]
    result = {"returncode": done.returncode, "summary": lines[-1] if lines else "", "outcomes": outcomes}
    if done.returncode != 0:
        result["output_tail"] = (done.stdout + done.stderr)[-4000:]
    log(f"gpu_tests: {result['summary']}")
    return result


def phase_step_compile(out: Path, tiny: bool) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    return {"step": _step_figures(tiny, compile_model=True)}


def _pretrain_args(
    cfg: dict[str, Any],
    folder: str,
    run: Path,
    *,
    gpu: bool,
    augment_on: str,
    compile_model: bool,
    workers: int,
    limit: float,
) -> list[str]:
    """The ``swavctl pretrain`` command line of an end-to-end run."""
    args = [
        sys.executable, "-m", "swavctl", "pretrain", "--data", folder, "--arch", cfg["arch"],
        "--batch-size", str(cfg["batch"]), "--gpus", "1" if gpu else "0", "--out", str(run),
        "--fresh", "--json", "--max-steps", str(cfg["e2e_steps"]),
    ]  # fmt: skip
    settings = [
        f"data.augment_on={augment_on}",
        f"data.workers={workers}",
        f"train.compile={'true' if compile_model else 'false'}",
        f"data.prefetch={PREFETCH}",
        "checkpoint.every_steps=100000",
        f"train.max_seconds={max(10.0, limit - 25)}",
    ]
    if not compile_model:  # where a step's time goes (train.profile_steps: OUT/profile/phases.txt)
        settings.append(f"train.profile_steps={cfg['profile_steps']}")
    for setting in [*settings, *cfg["overrides"]]:
        args += ["--set", setting]
    return args


def _run_killable(args: list[str], limit: float) -> tuple[int, str, str, float]:
    """(return code, stdout, stderr, seconds) of ``args`` in WORK; its process group killed after
    ``limit`` seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=WORK, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return proc.returncode, stdout, stderr, time.perf_counter() - start


def e2e(out: Path, tiny: bool, *, augment_on: str, compile_model: bool, limit: float) -> dict[str, Any]:
    """``swavctl pretrain`` from the JPEG folder; figures from its metrics.jsonl."""
    import torch

    cfg = sizes(tiny)
    jpegs = json.loads((out / "phases" / "jpegs.json").read_text())
    gpu = torch.cuda.is_available()
    if compile_model and not gpu:
        return {"skipped": "no CUDA device (compiling on the CPU is not what this measures)"}
    light, heavy = _worker_counts(tiny)
    workers = light if augment_on == "device" else heavy
    name = f"e2e_{augment_on}{'_compile' if compile_model else ''}"
    run = WORK / "runs" / name
    args = _pretrain_args(
        cfg, jpegs["folder"], run, gpu=gpu, augment_on=augment_on, compile_model=compile_model,
        workers=workers, limit=limit,
    )  # fmt: skip
    log(f"{name}: {' '.join(args[2:])}")
    code, stdout, stderr, wall = _run_killable(args, limit)
    result: dict[str, Any] = {
        "augment_on": augment_on,
        "compile": compile_model,
        "workers": workers,
        "prefetch": PREFETCH,
        "returncode": code,
        "wall_s": wall,
        "batch_size": cfg["batch"],
    }
    if code != 0:
        result["stderr_tail"] = stderr[-3000:]
    elif stdout.strip():
        result["summary"] = json.loads(stdout.strip().splitlines()[-1])
    for kind in ("phases", "ops"):
        profiled = run / "profile" / f"{kind}.txt"
        if profiled.exists():
            shutil.copy(profiled, out / f"{name}.{kind}.txt")
            if kind == "phases":
                result["profile_phases"] = profiled.read_text()
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        shutil.copy(metrics, out / f"{name}.metrics.jsonl")
        result.update(steady_figures(metrics, cfg["batch"], cfg["e2e_warmup"]))
    return result


def steady_figures(metrics: Path, batch: int, warmup: int) -> dict[str, Any]:
    """Samples/s over the steps after ``warmup``: batch * steps / sum of (data wait + step) times."""
    from swavctl.bench.common import RN50_SWAV_FLOP_PER_SAMPLE

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    later = [r for r in records if r["step"] > warmup]
    if not later:
        return {"steps_logged": len(records)}
    seconds = [batch / r["samples_per_s"] for r in later]
    waits = [s * r["data_wait_fraction"] for s, r in zip(seconds, later, strict=True)]
    sps = batch * len(later) / sum(seconds)
    return {
        "steps_logged": len(records),
        "steps_measured": len(later),
        "samples_per_s": sps,
        "median_step_samples_per_s": statistics.median(r["samples_per_s"] for r in later),
        "data_wait_fraction": sum(waits) / sum(seconds),
        "mfu": sps * RN50_SWAV_FLOP_PER_SAMPLE / 989e12,
        "final_loss": later[-1]["loss"],
    }
