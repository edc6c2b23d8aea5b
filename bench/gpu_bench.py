"""One-shot GPU benchmark (run by bench/gpu.sh): ResNet-50 SwAV throughput, and the suite's CUDA tests.

Phases, each in its own process with its own time limit, in priority order (a phase that no
longer fits the overall budget is skipped and reported as such):

1. ``jpegs`` (in the background from the start): a folder of generated ~500 x 375 JPEGs.
2. ``core``: environment; the training step alone (``swavctl bench step``: bf16 +
   channels_last), Sinkhorn at B=4096, K=3000 and LARC.
3. ``gpu_tests``: the test suite's CUDA tests (:data:`gpu_config.GPU_TESTS`, each marked
   ``cuda``), run by name with pytest: the GPU against the CPU on small inputs (Sinkhorn codes,
   one SwAV step's loss in fp32 and in bf16 + channels_last, the batched augmentation, nvjpeg
   decoding and the loop's decode-and-augment hand-over, training steps), and the GPU paths (no
   host sync in the augmentation, nvJPEG against memory still in use, the prefetch thread's side
   stream, the k-NN monitor's fp32 reading also inside bf16 autocast, eval-linear's modes).
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

The phases are in ``gpu_phases.py``, the sizes and the plan in ``gpu_config.py``, the Markdown
report in ``gpu_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpu_config import PEAK_NOTE, PLAN, REPO, WORK, log, write_json
from gpu_phases import (
    e2e,
    phase_core,
    phase_gpu_tests,
    phase_jpegs,
    phase_loader,
    phase_step_compile,
)
from gpu_report import apply, markdown


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
