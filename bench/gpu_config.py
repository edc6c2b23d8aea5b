"""Sizes, the phase plan and the CUDA tests of the one-shot GPU benchmark (``bench/gpu_bench.py``).

Shared by the driver (``gpu_bench.py``), its phases (``gpu_phases.py``) and its report
(``gpu_report.py``); ``tests/test_gpu_script.py`` reads :data:`GPU_TESTS` from here.
"""

from __future__ import annotations

import json
import os
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
}

# Batches the loop's prefetch thread makes ready ahead of the step in the end-to-end runs (the GPU
# default; the 2026-11-28 figures predate the thread and were made without it).
PREFETCH = 1

# (phase, time limit in seconds, the least time worth starting it with)
PLAN = [
    ("core", 120, 30),
    ("gpu_tests", 150, 40),  # with the GPU-against-CPU checks, once in the core phase
    ("e2e_device_compile", 220, 100),  # the likeliest to reach the 1,500 samples/s target: first
    ("e2e_device", 110, 40),
    ("e2e_workers", 110, 40),
    ("loader", 90, 30),
    ("step_compile", 120, 40),
]

#: The test suite's CUDA tests (``@pytest.mark.cuda``), run by pytest in the ``gpu_tests`` phase:
#: the GPU paths (no host sync in the augmentation, nvJPEG against memory still in use, the
#: prefetch thread's side stream, the k-NN monitor's fp32 reading also inside bf16 autocast,
#: eval-linear's modes) and the GPU against the CPU (Sinkhorn codes, a SwAV step's loss in fp32
#: and in bf16 + channels_last, the batched augmentation, nvJPEG against the CPU decoder, the
#: loop's decode-and-augment hand-over, training steps). ``tests/test_gpu_script.py`` checks that
#: this is exactly the set of tests marked ``cuda``.
GPU_TESTS = [
    "tests/test_gpu_vs_cpu.py::test_sinkhorn_codes_on_cuda_match_the_cpu",
    "tests/test_gpu_vs_cpu.py::test_swav_step_losses_on_cuda_match_the_cpu",
    "tests/test_gpu_vs_cpu.py::test_nvjpeg_decodes_as_the_cpu_decoder_does",
    "tests/test_gpu_vs_cpu.py::test_the_loop_hands_jpeg_bytes_and_decoded_images_to_crops_on_cuda",
    "tests/test_host_reads.py::test_batched_augmentation_on_cuda_never_synchronises",
    "tests/test_host_reads.py::test_nvjpeg_decoding_never_overwrites_memory_that_queued_kernels_still_read",
    "tests/test_prefetch.py::test_on_cuda_the_side_stream_gives_the_same_run",
    "tests/test_prefetch.py::test_on_cuda_every_epoch_queues_on_the_one_stream_it_is_given",
    "tests/test_multicrop.py::test_cuda_matches_cpu",
    "tests/test_distributed.py::test_training_steps_on_cuda_match",
    "tests/test_monitor.py::test_on_cuda_a_reading_matches_the_cpu_one",
    "tests/test_eval_planted.py::test_planted_backbone_on_gpu",  # eval-linear's 5 modes on one GPU
]


def log(message: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sizes(tiny: bool) -> dict[str, Any]:
    return TINY if tiny else FULL


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
