"""The Markdown report of the one-shot GPU benchmark: ``gpu_bench.md`` and the GPU section of
docs/benchmarks.md (``python bench/gpu_bench.py --apply OUT/gpu_bench.json``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gpu_config import sizes

#: Issue 7's end-to-end target on one H200 (GPU augmentation, from JPEG files).
TARGET_SAMPLES_PER_S = 1500


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _target_text(phases: dict[str, Any]) -> str:
    runs = ("e2e_device", "e2e_device_compile")
    best = max((phases.get(k, {}).get("samples_per_s", 0.0) for k in runs), default=0.0)
    if not best:
        return "not measured in this run"
    return f"**{'met' if best >= TARGET_SAMPLES_PER_S else 'not met'}** (best {best:,.0f} samples/s)"


def _header(results: dict[str, Any]) -> list[str]:
    phases = results["phases"]
    env = phases.get("core", {}).get("environment", {})
    cfg = sizes(results["tiny"])
    return [
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
        f"{cfg['batch']}, bf16 autocast + channels_last; samples/s over the logged steps "
        f"after the first {cfg['e2e_warmup']} (data wait + step time from metrics.jsonl).",
        f"- Target (issue 7): at least {TARGET_SAMPLES_PER_S:,} samples/s end to end with GPU augmentation: "
        + _target_text(phases),
        "- No baseline runs on the GPU machine (no peer tool there): these are absolute figures, to read "
        "against the target and the official code's ~91 images/s per V100.",
        "",
        "| run | samples/s | MFU | data wait | notes |",
        "|---|---|---|---|---|",
    ]


def _end_to_end_rows(phases: dict[str, Any]) -> list[str]:
    lines = []
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
    return lines


def _step_rows(phases: dict[str, Any]) -> list[str]:
    lines = []
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
    return lines


def _loader_rows(phases: dict[str, Any]) -> list[str]:
    loader = phases.get("loader", {})
    lines = []
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
    return lines


def _profile_lines(phases: dict[str, Any]) -> list[str]:
    profiled = [(key, phases.get(key, {}).get("profile_phases")) for key in ("e2e_device", "e2e_workers")]
    if not any(text for _, text in profiled):
        return []
    lines = ["", "Where an end-to-end step's time goes (`train.profile_steps`, torch.profiler; ms per step):"]
    for key, text in profiled:
        if text:
            lines += ["", f"{key}:", "", "```", text.rstrip(), "```"]
    return lines


def _kernel_lines(phases: dict[str, Any]) -> list[str]:
    """torch.compile against eager (first-step loss), Sinkhorn and LARC on the GPU."""
    core, lines = phases.get("core", {}), []
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
    return lines


def _gpu_tests_lines(phases: dict[str, Any]) -> list[str]:
    tests = phases.get("gpu_tests", {})
    lines = [
        "",
        "Correctness: the suite's CUDA tests (`gpu_tests`: the GPU paths, and the GPU against the CPU; "
        "their printed figures are in `OUT/gpu_tests.log`):",
        "",
    ]
    if "summary" in tests:
        lines.append(f"- pytest: {tests['summary']}")
        lines += [f"- {line}" for line in tests.get("outcomes", [])]
    else:
        why = tests.get("skipped") or ("timed out" if "timed_out_after_s" in tests else "not run")
        lines.append(f"- not run: {why}")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The whole report: the figures table, the step profiles, the kernels, the CUDA tests."""
    phases = results["phases"]
    lines = [
        *_header(results),
        *_end_to_end_rows(phases),
        *_step_rows(phases),
        *_loader_rows(phases),
        *_profile_lines(phases),
        *_kernel_lines(phases),
        *_gpu_tests_lines(phases),
    ]
    return "\n".join(lines) + "\n"


def apply(results_path: Path, doc: Path) -> None:
    """Write the report of ``results_path`` (a gpu_bench.json) into ``doc``'s ``gpu`` section."""
    from swavctl.bench.report import update_section

    results = json.loads(results_path.read_text())
    update_section("gpu", markdown(results), doc)
    print(f"updated {doc}")
