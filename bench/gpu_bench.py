"""One-shot GPU benchmark (run by bench/gpu.sh): correctness, then ResNet-50 SwAV throughput.

Phases, each in its own process with its own time limit, in priority order (a phase that no
longer fits the overall budget is skipped and reported as such):

1. ``jpegs`` (in the background from the start): a folder of generated ~500 x 375 JPEGs.
2. ``core``: environment; correctness of the GPU against the CPU on small inputs (Sinkhorn codes,
   one SwAV step's loss in fp32 and in bf16 + channels_last, the batched augmentation, nvjpeg
   decoding and the loop's decode-and-augment hand-over); then the training step alone
   (``swavctl bench step``: bf16 + channels_last), Sinkhorn at B=4096, K=3000 and LARC.
3. ``gpu_tests``: the test suite's CUDA-only tests of the GPU paths (:data:`GPU_TESTS`: no host
   sync in the augmentation, nvJPEG against memory still in use, the prefetch thread's side
   stream, CUDA against CPU, the k-NN monitor's fp32 reading also inside bf16 autocast,
   eval-linear's modes).
4. ``e2e_device_compile``: ``swavctl pretrain`` from the JPEG folder with device augmentation
   (workers only read bytes; nvjpeg decode and batched augmentation on the GPU, made ready one
   batch ahead by the prefetch thread), bf16 + channels_last, ``train.compile=true``.
5. ``e2e_device``: the same, eager, with a profile of 5 steps (where a step's time goes).
6. ``e2e_workers``: the same as 5 with CPU augmentation in the loader workers.
7. ``loader``: the loader alone (``swavctl bench data``): bytes + nvjpeg, decoding in the workers
   + GPU augmentation, CPU augmentation.
8. ``step_compile``: the training step alone, compiled (reusing the inductor cache of 4).

Figures: samples/s (images per second, each with its 8 crops) and MFU, the model FLOP
utilisation: samples/s x 76 GFLOP (ResNet-50 forward + backward at 2x224 + 6x96, see
``swavctl.bench.common``) over the GPU's dense bf16 peak (989 TFLOP/s for an H100/H200 SXM). End
to end figures are over the steps after the first ``warmup``: the batch size times the number of
steps over the sum of the loop's per-step times (data wait + step), as logged in metrics.jsonl.

    python bench/gpu_bench.py --out OUT            # driver (what gpu.sh runs)
    python bench/gpu_bench.py --out OUT --tiny     # tiny sizes: checks the script on any machine
    python bench/gpu_bench.py --apply OUT/gpu_bench.json   # write docs/benchmarks.md's GPU section
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/swavctl-gpu-bench"))
PEAK_NOTE = "989 TFLOP/s, the dense bf16 peak of an H100/H200 SXM"

FULL: dict[str, Any] = {
    "arch": "resnet50",
    "crop_sizes": [224, 96],
    "overrides": [],
    "batch": 256,
    "images": 16384,
    "image_size": (500, 375),
    "step_warmup": 5,
    "step_steps": 20,
    "e2e_steps": 60,  # within the first epoch (64 steps): no loader restart, no epoch checkpoint
    "e2e_warmup": 10,
    "profile_steps": 5,  # steps 4-8 of the eager e2e runs (inside the warm-up left out of samples/s)
    "check_arch": "resnet50",
}
TINY: dict[str, Any] = {
    "arch": "convnet-tiny",
    "crop_sizes": [32, 16],
    "overrides": [
        "data.crop_sizes=[32, 16]",
        "model.hidden_dim=64",
        "model.embedding_dim=32",
        "model.prototypes=40",
    ],
    "batch": 8,
    "images": 48,
    "image_size": (100, 75),
    "step_warmup": 1,
    "step_steps": 3,
    "e2e_steps": 6,
    "e2e_warmup": 2,
    "profile_steps": 2,
    "check_arch": "convnet-tiny",
}

# Batches the loop's prefetch thread makes ready ahead of the step in the end-to-end runs (the GPU
# default; the 2026-11-28 figures predate the thread and were made without it).
PREFETCH = 1

# (phase, time limit in seconds, the least time worth starting it with)
PLAN = [
    ("core", 150, 30),
    ("gpu_tests", 120, 40),
    ("e2e_device_compile", 220, 100),  # the likeliest to reach the 1,500 samples/s target: first
    ("e2e_device", 110, 40),
    ("e2e_workers", 110, 40),
    ("loader", 90, 30),
    ("step_compile", 120, 40),
]


def log(message: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sizes(tiny: bool) -> dict[str, Any]:
    return TINY if tiny else FULL


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# Phase: jpegs


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
# Phase: core (environment, correctness, step, Sinkhorn)


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


def _check(name: str, ok: bool, **figures: Any) -> dict[str, Any]:
    log(f"check {name}: {'ok' if ok else 'FAILED'} {figures}")
    return {"name": name, "ok": bool(ok), **figures}


def _correctness(tiny: bool, device: Any) -> list[dict[str, Any]]:
    """Results on ``device`` (the GPU) against CPU results on small inputs."""
    import torch

    from swavctl.bench.jpegs import write_jpeg
    from swavctl.bench.sinkhorn import official_sinkhorn, realistic_scores
    from swavctl.bench.step import StepRunner
    from swavctl.clustering.sinkhorn_knopp import sinkhorn
    from swavctl.data.dataset import Batch, decode_images
    from swavctl.data.images import decode_file
    from swavctl.data.multicrop import AugmentSpec, CropSpec, batch_multicrop
    from swavctl.train.device_batch import batch_crops, decode_batch

    cuda = device  # a CPU only when checking this script on a machine without a GPU
    on_gpu_device = device.type == "cuda"
    checks: list[dict[str, Any]] = []

    # Sinkhorn codes.
    scores = realistic_scores(1024, 3000, device=torch.device("cpu"))
    cpu_codes = sinkhorn(scores)
    gpu_codes = sinkhorn(scores.to(cuda)).cpu()
    official = official_sinkhorn(scores.double()).float()
    diff = float((cpu_codes - gpu_codes).abs().max())
    checks.append(
        _check(
            "sinkhorn codes, GPU vs CPU (B=1024, K=3000, fp32)",
            diff < 1e-5,
            max_abs_diff=diff,
            max_abs_diff_vs_official_fp64=float((gpu_codes - official).abs().max()),
        )
    )

    # One SwAV step: fp32 on both, then bf16 + channels_last on the GPU.
    extra = [
        "train.precision=fp32",
        "train.channels_last=false",
        "data.crop_sizes=[96, 64]",
        "data.crop_counts=[2, 2]",
        "model.prototypes=300",
    ]
    if tiny:
        extra = ["train.precision=fp32", "train.channels_last=false"]
    arch = sizes(tiny)["check_arch"]
    cpu_run = StepRunner(_settings(tiny, gpu=False, extra=extra, arch=arch, batch=8))
    gpu_run = StepRunner(_settings(tiny, gpu=on_gpu_device, extra=extra, arch=arch, batch=8))
    losses = {"cpu": [], "gpu_fp32": []}
    # True fp32 on the GPU for this comparison (cuDNN convolutions default to TF32).
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for _ in range(2):
        cpu_run.step()
        gpu_run.step()
        losses["cpu"].append(cpu_run.loss)
        losses["gpu_fp32"].append(gpu_run.loss)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    bf16 = StepRunner(
        _settings(
            tiny,
            gpu=on_gpu_device,
            extra=[e for e in extra if "precision" not in e and "channels" not in e],
            arch=arch,
            batch=8,
        )
    )
    bf16.step()
    losses["gpu_bf16_channels_last"] = [bf16.loss]
    rel = [abs(a - b) / abs(a) for a, b in zip(losses["cpu"], losses["gpu_fp32"], strict=True)]
    rel_bf16 = abs(losses["cpu"][0] - bf16.loss) / abs(losses["cpu"][0])
    checks.append(
        _check(
            f"SwAV step loss, GPU fp32 vs CPU ({arch}, batch 8, steps 1 and 2)",
            rel[0] < 1e-3 and rel[1] < 5e-3,
            losses=losses,
            relative_diff=rel,
        )
    )
    checks.append(
        _check(
            "SwAV step loss, GPU bf16 + channels_last vs CPU fp32 (step 1)",
            rel_bf16 < 3e-2,
            relative_diff=rel_bf16,
        )
    )

    # Batched augmentation on CUDA tensors against the same parameters on the CPU.
    g = torch.Generator().manual_seed(0)
    images = [
        (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8) for h, w in [(48, 64), (75, 100), (33, 21)]
    ]
    crops = [CropSpec(32, 0.14, 1.0), CropSpec(32, 0.14, 1.0), CropSpec(16, 0.05, 0.14)]
    a = batch_multicrop(images, crops, AugmentSpec(), generator=torch.Generator().manual_seed(3))
    b = batch_multicrop(
        [im.to(cuda) for im in images], crops, AugmentSpec(), generator=torch.Generator().manual_seed(3)
    )
    diff = max(float((x - y.cpu()).abs().mean()) for x, y in zip(a, b, strict=True))
    checks.append(
        _check(
            "batched augmentation, CUDA vs CPU (same parameters)",
            diff < 1e-3 and all(y.device.type == cuda.type for y in b),
            mean_abs_diff=diff,
        )
    )

    # The augmentation only queues work: no host-device synchronisation (tests/test_host_reads.py
    # checks the transfers on the CPU; CUDA's sync detector checks them here).
    (h, w), (large, small) = ((75, 100), (32, 16)) if tiny else ((375, 500), (224, 96))
    big = [(torch.rand(3, h + i % 3, w, generator=g) * 255).to(torch.uint8).to(cuda) for i in range(8)]
    paper = [CropSpec(large, 0.14, 1.0)] * 2 + [CropSpec(small, 0.05, 0.14)] * 6
    batch_multicrop(big, paper, AugmentSpec(), generator=torch.Generator().manual_seed(4))  # warm-up
    sync_error = None
    if on_gpu_device:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        batch_multicrop(big, paper, AugmentSpec(), generator=torch.Generator().manual_seed(5))
    except RuntimeError as exc:
        sync_error = str(exc)[:300]
    finally:
        if on_gpu_device:
            torch.cuda.set_sync_debug_mode("default")
    checks.append(
        _check(
            f"batched augmentation queues without a host sync (2x{large} + 6x{small}, 8 images)",
            sync_error is None,
            error=sync_error,
            checked_with="torch.cuda.set_sync_debug_mode('error')" if on_gpu_device else "nothing (no CUDA)",
        )
    )

    # nvjpeg against the CPU decoder, and the loop's decode + augment hand-over.
    folder = WORK / "decode-check"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate([(500, 375), (375, 500), (333, 500), (64, 48)]):
        path = folder / f"d{i}.jpg"
        write_jpeg(path, seed=100 + i, width=w, height=h)
        paths.append(path)
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    gpu_images, failures, cpu_decoded = decode_images(encoded, cuda)
    cpu_images = [decode_file(p) for p in paths]
    diffs = [(x.cpu().float() - y.float()).abs() for x, y in zip(gpu_images, cpu_images, strict=True)]
    # Decoders may upsample the 4:2:0 chroma differently (libjpeg-turbo's "fancy" upsampling vs
    # nvjpeg's), which moves R, G and B by several levels on these noisy synthetic images; luma is
    # stored at full resolution, so it must agree to about a level (IDCT rounding).
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    luma_diffs = [
        ((x.cpu().float() * luma).sum(0) - (y.float() * luma).sum(0)).abs()
        for x, y in zip(gpu_images, cpu_images, strict=True)
    ]
    # On a GPU, nvjpeg's own: the CPU fallback also hands back CUDA tensors (and differences of 0).
    # Without CUDA (a tiny run checking the script) both sides are the CPU decoder.
    by_nvjpeg = cuda.type == "cuda" and cpu_decoded == 0
    checks.append(
        _check(
            "JPEG decode, nvjpeg vs CPU (luma, uint8 levels)",
            not failures
            and (by_nvjpeg or cuda.type != "cuda")
            and max(float(d.mean()) for d in luma_diffs) < 1.5,
            decoded_by_nvjpeg=by_nvjpeg,
            cpu_fallbacks=cpu_decoded,
            luma_mean_abs_diff=max(float(d.mean()) for d in luma_diffs),
            rgb_mean_abs_diff=max(float(d.mean()) for d in diffs),
            rgb_max_abs_diff=max(float(d.max()) for d in diffs),
        )
    )
    batch = Batch(crops=None, images=[*encoded[:2], cpu_images[2]], indices=[0, 1, 2])
    batch = decode_batch(batch, [str(p) for p in paths], cuda)
    spec = [CropSpec(224, 0.14, 1.0), CropSpec(96, 0.05, 0.14)]
    out = batch_crops(batch, spec, AugmentSpec(), cuda, 0, 0)
    shapes = [tuple(o.shape) for o in out]
    checks.append(
        _check(
            "loop hand-over: JPEG bytes + decoded image -> crops on the GPU",
            shapes == [(3, 3, 224, 224), (3, 3, 96, 96)]
            and all(o.device.type == cuda.type and torch.isfinite(o).all() for o in out),
            shapes=shapes,
        )
    )
    return checks


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
    import torch

    result: dict[str, Any] = {"environment": _environment()}
    write_json(out / "phases" / "core.json", result)
    if torch.cuda.is_available():
        # With its index: tensors report cuda:0, and torch.device("cuda") != torch.device("cuda:0")
        # (the reason three checks of the first H200 run read FAILED with correct results).
        device = torch.device("cuda", torch.cuda.current_device())
    elif tiny:
        log("no CUDA device: running the checks and timings on the CPU (a check of this script only)")
        device = torch.device("cpu")
    else:
        log("no CUDA device: correctness checks and GPU timings are skipped")
        return result
    result["checks"] = _correctness(tiny, device)
    write_json(out / "phases" / "core.json", result)
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
# Phases: step_compile, e2e_*


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


#: The test suite's CUDA-only tests of the GPU paths (run by pytest in the ``gpu_tests`` phase).
GPU_TESTS = [
    "tests/test_host_reads.py::test_batched_augmentation_on_cuda_never_synchronises",
    "tests/test_host_reads.py::test_nvjpeg_decoding_never_overwrites_memory_that_queued_kernels_still_read",
    "tests/test_prefetch.py::test_on_cuda_the_side_stream_gives_the_same_run",
    "tests/test_prefetch.py::test_on_cuda_every_epoch_queues_on_the_one_stream_it_is_given",
    "tests/test_multicrop.py::test_cuda_matches_cpu",
    "tests/test_distributed.py::test_training_steps_on_cuda_match",
    "tests/test_monitor.py::test_on_cuda_a_reading_matches_the_cpu_one",
    "tests/test_eval_planted.py::test_planted_backbone_on_gpu",  # eval-linear's 5 modes on one GPU
]


def phase_gpu_tests(out: Path, tiny: bool, limit: float) -> dict[str, Any]:
    """The CUDA-only tests, with pytest from .whl if needed (without a GPU they all skip, which still
    checks that they are there to be run)."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed (bench/gpu.sh installs it from .whl/ when there)"}
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *GPU_TESTS]  # -q: pyproject
    log(f"gpu_tests: {' '.join(args[2:])}")
    try:
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=max(10.0, limit - 10))
    except subprocess.TimeoutExpired as exc:  # keep what had run: -rA lines come at the end, -q's dots
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"timed_out_after_s": limit - 10, "output_tail": partial[-4000:]}
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
    args = [
        sys.executable,
        "-m",
        "swavctl",
        "pretrain",
        "--data",
        jpegs["folder"],
        "--arch",
        cfg["arch"],
        "--batch-size",
        str(cfg["batch"]),
        "--gpus",
        "1" if gpu else "0",
        "--out",
        str(run),
        "--fresh",
        "--json",
        "--max-steps",
        str(cfg["e2e_steps"]),
        "--set",
        f"data.augment_on={augment_on}",
        "--set",
        f"data.workers={workers}",
        "--set",
        f"train.compile={'true' if compile_model else 'false'}",
        "--set",
        f"data.prefetch={PREFETCH}",
        "--set",
        "checkpoint.every_steps=100000",
        "--set",
        f"train.max_seconds={max(10.0, limit - 25)}",
    ]
    if not compile_model:  # where a step's time goes (train.profile_steps: OUT/profile/phases.txt)
        args += ["--set", f"train.profile_steps={cfg['profile_steps']}"]
    for o in cfg["overrides"]:
        args += ["--set", o]
    log(f"{name}: {' '.join(args[2:])}")
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=WORK, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    result: dict[str, Any] = {
        "augment_on": augment_on,
        "compile": compile_model,
        "workers": workers,
        "prefetch": PREFETCH,
        "returncode": proc.returncode,
        "wall_s": wall,
        "batch_size": cfg["batch"],
    }
    if proc.returncode != 0:
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


# ---------------------------------------------------------------------------------------------
# Driver


def run_phase_process(name: str, out: Path, tiny: bool, limit: float) -> dict[str, Any]:
    args = [sys.executable, __file__, "--phase", name, "--out", str(out), "--limit", str(limit)]
    if tiny:
        args.append("--tiny")
    start = time.perf_counter()
    proc = subprocess.Popen(args, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    path = out / "phases" / f"{name}.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    result["phase_seconds"] = time.perf_counter() - start
    if code is None:
        result["timed_out_after_s"] = limit
        log(f"phase {name}: TIMED OUT after {limit:.0f} s (partial results kept)")
    elif code != 0:
        result["exit_code"] = code
        log(f"phase {name}: exited with {code}")
    return result


def driver(out: Path, tiny: bool, budget: float) -> dict[str, Any]:
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / "phases").mkdir(exist_ok=True)
    for stale in (out / "phases").glob("*.json"):
        stale.unlink()
    WORK.mkdir(parents=True, exist_ok=True)
    log(f"budget {budget:.0f} s, {'tiny' if tiny else 'full'} sizes, work folder {WORK}, results in {out}")
    jpeg_args = [sys.executable, __file__, "--phase", "jpegs", "--out", str(out)] + (
        ["--tiny"] if tiny else []
    )
    jpegs = subprocess.Popen(jpeg_args)
    results: dict[str, Any] = {"tiny": tiny, "budget_s": budget, "peak": PEAK_NOTE, "phases": {}}
    for name, limit, least in PLAN:
        left = budget - (time.time() - started)
        if name in ("loader", "e2e_device", "e2e_workers", "e2e_device_compile") and jpegs.poll() is None:
            try:
                jpegs.wait(timeout=max(1.0, left - least))
            except subprocess.TimeoutExpired:
                jpegs.kill()
        if left < least:
            results["phases"][name] = {"skipped": f"only {left:.0f} s of the budget left"}
            log(f"phase {name}: skipped, {left:.0f} s left")
            continue
        log(f"phase {name} (limit {min(limit, left):.0f} s)")
        results["phases"][name] = run_phase_process(name, out, tiny, min(limit, left))
        write_json(out / "gpu_bench.json", results)
    if jpegs.poll() is None:
        jpegs.kill()
    jpath = out / "phases" / "jpegs.json"
    results["phases"]["jpegs"] = json.loads(jpath.read_text()) if jpath.exists() else {"failed": True}
    results["total_s"] = time.time() - started
    write_json(out / "gpu_bench.json", results)
    (out / "gpu_bench.md").write_text(markdown(results))
    log(f"done in {results['total_s']:.0f} s: {out / 'gpu_bench.json'}, {out / 'gpu_bench.md'}")
    return results


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


#: Issue 7's end-to-end target on one H200 (GPU augmentation, from JPEG files).
TARGET_SAMPLES_PER_S = 1500


def _target_text(phases: dict[str, Any]) -> str:
    runs = ("e2e_device", "e2e_device_compile")
    best = max((phases.get(k, {}).get("samples_per_s", 0.0) for k in runs), default=0.0)
    if not best:
        return "not measured in this run"
    return f"**{'met' if best >= TARGET_SAMPLES_PER_S else 'not met'}** (best {best:,.0f} samples/s)"


def markdown(results: dict[str, Any]) -> str:
    phases = results["phases"]
    core = phases.get("core", {})
    env = core.get("environment", {})
    lines = [
        "## GPU: ResNet-50, 2x224 + 6x96 crops, one GPU"
        + (" (TINY sizes: a check of the script)" if results["tiny"] else ""),
        "",
        f"- Date: {time.strftime('%Y-%m-%d', time.gmtime())}",
        f"- Hardware: {env.get('hardware', 'unknown')}; CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}",
        "- Command: `bash bench/gpu.sh` (runs `python bench/gpu_bench.py --out $OUT`; on a machine without a "
        "package index, first `bash bench/fetch_wheels.sh` where there is one and carry `.whl/` over)",
        f"- MFU: samples/s x 76 GFLOP per sample over {results['peak']}.",
        "- End to end: `swavctl pretrain` from a folder of generated ~500 x 375 JPEGs "
        f"({phases.get('jpegs', {}).get('images', '?')} files), batch "
        f"{sizes(results['tiny'])['batch']}, bf16 autocast + channels_last; samples/s over the logged steps "
        f"after the first {sizes(results['tiny'])['e2e_warmup']} (data wait + step time from metrics.jsonl).",
        f"- Target (issue 7): at least {TARGET_SAMPLES_PER_S:,} samples/s end to end with GPU augmentation: "
        + _target_text(phases),
        "- No baseline runs on the GPU machine (no peer tool there): these are absolute figures, to read "
        "against the target and the official code's ~91 images/s per V100.",
        "",
        "| run | samples/s | MFU | data wait | notes |",
        "|---|---|---|---|---|",
    ]
    for key, label in [
        ("e2e_device", "end to end, GPU augmentation (nvjpeg + batched), eager"),
        ("e2e_device_compile", "end to end, GPU augmentation, torch.compile"),
        ("e2e_workers", "end to end, CPU augmentation in loader workers, eager"),
    ]:
        r = phases.get(key, {})
        if "samples_per_s" in r:
            note = f"{r['workers']} workers, prefetch {r.get('prefetch', 0)}, {r['steps_measured']} steps"
            if r.get("returncode"):
                note += f", exit {r['returncode']}"
            wait = r["data_wait_fraction"]
            lines.append(f"| {label} | {r['samples_per_s']:.0f} | {r['mfu']:.1%} | {wait:.0%} | {note} |")
        else:
            why = r.get("skipped") or (
                "timed out" if "timed_out_after_s" in r else r.get("stderr_tail", "no figures")
            )
            lines.append(f"| {label} | not measured | | | {str(why).splitlines()[-1][:120] if why else ''} |")
    for key, sub, label in [
        ("core", "step", "training step alone (synthetic crops), eager"),
        ("step_compile", "step", "training step alone, torch.compile"),
    ]:
        r = phases.get(key, {}).get(sub)
        if r:
            note = (
                f"fwd/bwd {r['forward_backward_ms']:.0f} ms + Sinkhorn/loss {r['sinkhorn_loss_ms']:.1f} ms; "
                f"first step {r['first_step_s']:.0f} s"
            )
            lines.append(f"| {label} | {r['samples_per_s']:.0f} | {_fmt(r['mfu'], '.1%')} | | {note} |")
        else:
            lines.append(f"| {label} | not measured | | | {phases.get(key, {}).get('skipped', '')} |")
    loader = phases.get("loader", {})
    for key, label in [
        (
            "device_nvjpeg",
            "loader alone: workers read bytes, nvjpeg decode + batched augmentation on the GPU",
        ),
        ("device_decode_in_workers", "loader alone: workers decode, batched augmentation on the GPU"),
        ("workers", "loader alone: workers decode and augment (CPU)"),
    ]:
        r = loader.get(key)
        if r:
            figure = r["figures"][0]
            note = f"{figure['workers']} workers, {figure['batches']} batches"
            lines.append(f"| {label} | {figure['samples_per_s']:.0f} | | | {note} |")
        else:
            lines.append(f"| {label} | not measured | | | {loader.get('skipped', '')} |")
    profiled = [(key, phases.get(key, {}).get("profile_phases")) for key in ("e2e_device", "e2e_workers")]
    if any(text for _, text in profiled):
        lines += [
            "",
            "Where an end-to-end step's time goes (`train.profile_steps`, torch.profiler; ms per step):",
        ]
        for key, text in profiled:
            if text:
                lines += ["", f"{key}:", "", "```", text.rstrip(), "```"]
    eager = core.get("step", {}).get("first_loss")
    compiled = phases.get("step_compile", {}).get("step", {}).get("first_loss")
    if eager is not None and compiled is not None:
        rel = abs(eager - compiled) / abs(eager)
        lines += [
            "",
            f"torch.compile vs eager, first-step loss, same weights and crops (bf16): {compiled:.5f} vs "
            f"{eager:.5f} (relative difference {rel:.1e}, {'ok' if rel < 2e-2 else '**check**'}).",
        ]
    sg, sc = core.get("sinkhorn_gpu"), core.get("sinkhorn_cpu")
    if sg:
        lines += [
            "",
            f"Sinkhorn B={sg['batch']}, K={sg['prototypes']} fp32 on the GPU: ours {sg['ours_ms']:.2f} ms, "
            f"official formula {sg['official_ms']:.2f} ms (ratio {sg['speedup']:.2f}x); on the CPU "
            f"({sc['threads']} threads): ours {sc['ours_ms']:.0f} ms, official {sc['official_ms']:.0f} ms.",
        ]
    lg = core.get("larc_gpu")
    if lg:
        lines += [
            "",
            f"LARC rescaling on the GPU ({lg['preset']}, {lg['parameters']} parameters): per parameter "
            f"{lg['baseline_ms']:.2f} ms ({lg['baseline_ops']} operators), fused {lg['ours_ms']:.2f} ms "
            f"({lg['ours_ops']} operators): {lg['speedup']:.1f}x; "
            f"max abs difference {lg['max_abs_diff']:.1e}.",
        ]
    checks = core.get("checks")
    if checks:
        lines += ["", "Correctness, GPU against CPU:", ""]
        for c in checks:
            figures = {k: v for k, v in c.items() if k not in ("name", "ok")}
            lines.append(
                f"- {'ok' if c['ok'] else '**FAILED**'}: {c['name']}: `{json.dumps(figures, default=str)}`"
            )
    tests = phases.get("gpu_tests", {})
    lines += ["", "CUDA-only tests of the suite (`gpu_tests`):", ""]
    if "summary" in tests:
        lines.append(f"- pytest: {tests['summary']}")
        lines += [f"- {line}" for line in tests.get("outcomes", [])]
    else:
        why = tests.get("skipped") or ("timed out" if "timed_out_after_s" in tests else "not run")
        lines.append(f"- not run: {why}")
    return "\n".join(lines) + "\n"


def apply(results_path: Path, doc: Path) -> None:
    from swavctl.bench.report import update_section

    results = json.loads(results_path.read_text())
    update_section("gpu", markdown(results), doc)
    print(f"updated {doc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("BENCH_TINY") == "1")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("BENCH_BUDGET_S", "540")))
    parser.add_argument("--phase")
    parser.add_argument("--limit", type=float, default=120.0)
    parser.add_argument("--apply", type=Path, help="results JSON to write into docs/benchmarks.md")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if args.apply:
        apply(args.apply, args.doc)
        return
    if args.phase is None:
        driver(args.out, args.tiny, args.budget)
        return
    functions = {
        "jpegs": lambda: phase_jpegs(args.out, args.tiny),
        "core": lambda: phase_core(args.out, args.tiny),
        "loader": lambda: phase_loader(args.out, args.tiny),
        "step_compile": lambda: phase_step_compile(args.out, args.tiny),
        "gpu_tests": lambda: phase_gpu_tests(args.out, args.tiny, args.limit),
        "e2e_device": lambda: e2e(
            args.out, args.tiny, augment_on="device", compile_model=False, limit=args.limit - 5
        ),
        "e2e_workers": lambda: e2e(
            args.out, args.tiny, augment_on="workers", compile_model=False, limit=args.limit - 5
        ),
        "e2e_device_compile": lambda: e2e(
            args.out, args.tiny, augment_on="device", compile_model=True, limit=args.limit - 5
        ),
    }
    result = functions[args.phase]()
    write_json(args.out / "phases" / f"{args.phase}.json", result)


if __name__ == "__main__":
    main()
