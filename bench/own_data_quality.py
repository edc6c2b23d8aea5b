"""Quality on a user's own folder: ``swavctl pretrain --data DIR`` without a preset, on 2 CPU cores.

Reproducible command (the figures in docs/benchmarks.md come from it)::

    python bench/own_data_quality.py

1. Writes the labelled patch folder of :mod:`swavctl.bench.patches` (480 train and 120 val colour
   images of 64 px cut from scikit-learn's two sample photographs; val from regions the train
   patches do not touch). Not timed.
2. Runs ``swavctl pretrain --data DIR --gpus 0`` as a user would (a real process, the recipe
   chosen by swavctl from the folder and the CPU), timing the whole process, and the same
   command with ``--max-steps 1``: the same recipe stopped after one step.
3. Scores both with ``swavctl eval-linear RUN --mode fast`` and ``--mode knn`` (train/ against
   the held-out val/), and raw pixels with the same two probes: the fast probe's grid and k-NN
   run on the flattened, normalised pixels, at the model's evaluation view and at the images'
   full 64 px.
4. Checks the bar of issue 17: the run ends within 5 minutes; fast-probe top-1 >= 0.90; at least
   0.25 above the one-step model's; a k-NN top-1 no lower than the one-step model's; above raw
   pixels on both probes (the better of the two pixel views). Prints a Markdown table and writes
   it into docs/benchmarks.md (``--no-doc``: print only).

The machine's load (1-minute load average before and after, and ``uptime``) is printed with the
wall time: on a machine shared with other jobs the time is inflated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from swavctl.bench import report
from swavctl.bench.patches import write_patch_folder

BAR = {"wall_s": 300.0, "fast": 0.90, "fast_gain": 0.25}


def _swavctl(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run ``python -m swavctl ARGS``; (result, wall seconds, CPU seconds of the process tree)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "swavctl", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        sys.exit(f"swavctl {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done, wall, cpu


def _evaluate(run: Path, env: dict[str, str]) -> dict[str, float]:
    """eval-linear's fast probe and k-NN top-1 of a run, on its own data (train/ against val/)."""
    scores = {}
    for mode in ("fast", "knn"):
        done, _, _ = _swavctl("eval-linear", str(run), "--mode", mode, "--gpus", "0", "--json", env=env)
        scores[mode] = float(json.loads(done.stdout)["top1"])
    return scores


def raw_pixels(data: Path, run: Path) -> dict[str, dict[str, float]]:
    """The fast probe and k-NN top-1 of raw pixels (flattened, normalised with the run's mean and
    std), at the run's evaluation view and at the images' own size, by eval-linear's code."""
    from swavctl.eval.dataset import LabelledImages
    from swavctl.eval.fast import fast_probe
    from swavctl.eval.knn import knn_scores
    from swavctl.eval.splits import discover, holdout_split
    from swavctl.eval.views import Geometry, Normalizer, geometry_for
    from swavctl.train.run_dir import read_resolved

    settings = read_resolved(run)
    assert settings is not None
    split = discover(data)
    normalize = Normalizer(settings.data.augment.mean, settings.data.augment.std)
    with Image.open(split.train[0].path) as image:
        side = min(image.size)
    views = {"eval view": geometry_for(settings), "full image": Geometry(crop=side, resize=side)}
    _, held = holdout_split([s.label for s in split.train], 0.2, 0)
    is_held = torch.zeros(len(split.train), dtype=torch.bool)
    is_held[torch.as_tensor(held)] = True
    results = {}
    for name, geometry in views.items():

        def pixels(samples: Any, geometry: Geometry = geometry) -> tuple[torch.Tensor, torch.Tensor]:
            dataset = LabelledImages(samples, geometry, augment=False, seed=0)
            images = torch.stack([dataset[i][1] for i in range(len(dataset))])  # type: ignore[misc]
            return normalize(images).flatten(1).double(), dataset.labels

        train_x, train_y = pixels(split.train)
        val_x, val_y = pixels(split.val)
        probe = fast_probe([train_x], [train_y], [is_held], val_x, num_classes=split.num_classes)
        assert probe.scores is not None
        knn = knn_scores(train_x, train_y, val_x, num_classes=split.num_classes)
        results[f"{name} ({geometry.crop} px)"] = {
            "fast": float((probe.scores.argmax(1) == val_y).double().mean()),
            "knn": float((knn.argmax(1) == val_y).double().mean()),
        }
    return results


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"load average {_load()}"


def measure(data: Path, work: Path, overrides: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Pretrain (whole run, and one step) on ``data``, evaluate both and raw pixels (module doc)."""
    sets = [arg for text in overrides for arg in ("--set", text)]
    command = ["pretrain", "--data", str(data), "--gpus", "0", *sets]
    figures: dict[str, Any] = {"command": "swavctl " + " ".join(command), "uptime_before": _uptime()}
    load_before = _load()
    done, wall, cpu = _swavctl(*command, "--out", str(work / "full"), "--json", env=env)
    figures["recipe"] = next(line for line in done.stderr.splitlines() if line.startswith("recipe: "))
    summary = json.loads(done.stdout)
    figures["run"] = {
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": load_before, "load_after": _load(),
        "steps": summary["steps"], "samples_per_s": round(summary["samples_per_s"], 1),
        "final_loss": summary["final_loss"],
    }  # fmt: skip
    figures["uptime_after"] = _uptime()
    _swavctl(*command, "--max-steps", "1", "--out", str(work / "one-step"), "--json", env=env)
    figures["full"] = _evaluate(work / "full", env)
    figures["one_step"] = _evaluate(work / "one-step", env)
    figures["pixels"] = raw_pixels(data, work / "full")
    figures["bar"] = check(figures)
    return figures


def check(figures: dict[str, Any]) -> dict[str, bool]:
    """The bar of issue 17, each line True when met."""
    full, one = figures["full"], figures["one_step"]
    best = {mode: max(p[mode] for p in figures["pixels"].values()) for mode in ("fast", "knn")}
    return {
        f"ends within {BAR['wall_s'] / 60:.0f} min": figures["run"]["wall_s"] <= BAR["wall_s"],
        f"fast probe >= {BAR['fast']:.2f}": full["fast"] >= BAR["fast"],
        f"fast probe >= one step + {BAR['fast_gain']:.2f}": full["fast"] >= one["fast"] + BAR["fast_gain"],
        "k-NN >= one step's": full["knn"] >= one["knn"],
        "fast probe > raw pixels'": full["fast"] > best["fast"],
        "k-NN > raw pixels'": full["knn"] > best["knn"],
    }


def markdown(figures: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md."""
    run, full, one = figures["run"], figures["full"], figures["one_step"]
    rows = [
        f"| `swavctl pretrain --data DIR` (the chosen recipe, {run['steps']} steps) "
        f"| **{full['fast']:.3f}** | **{full['knn']:.3f}** |",
        "| the same recipe stopped after one step (`--max-steps 1`) "
        f"| {one['fast']:.3f} | {one['knn']:.3f} |",
        *(f"| raw pixels, {v} | {p['fast']:.3f} | {p['knn']:.3f} |" for v, p in figures["pixels"].items()),
    ]
    bar = "\n".join(f"- {'met' if ok else '**not met**'}: {name}" for name, ok in figures["bar"].items())
    return f"""## Your own folder: quality and time (CPU)

- Date: {report.today()}
- Hardware: {report.hardware()}
- Command: `{report.command_line()}`: it writes the folder (`swavctl.bench.patches`: 480 train and 120
  val colour patches of 64 px, five classes, val cut from regions of scikit-learn's two sample
  photographs that no train patch touches), runs `{figures["command"]}` and the same with
  `--max-steps 1`, and scores each with `swavctl eval-linear RUN --mode fast` and `--mode knn`
  (train/ against val/); raw pixels go through the same probe code.
- The recipe line: `{figures["recipe"]}`
- Pretraining, whole process: {run["wall_s"]} s wall, {run["cpu_s"]} s CPU, {run["samples_per_s"]} samples/s,
  final loss {run["final_loss"]:.4f}; load average {run["load_before"]} before, {run["load_after"]} after
  (`{figures["uptime_before"]}`): on a machine shared with other jobs the wall time is inflated.

| model | fast probe top-1 | 20-NN top-1 |
|---|---|---|
{chr(10).join(rows)}

The bar (issue 17):

{bar}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="Folder to write (default: a temporary one).")
    parser.add_argument("--work", type=Path, default=None, help="Run folders (default: a temporary one).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE, both runs.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object on stdout.")
    report.add_output_options(parser)
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="swavctl-own-data-") as scratch:
        data = write_patch_folder(args.data or Path(scratch) / "patches")
        work = args.work or Path(scratch) / "runs"
        figures = measure(data, work, args.overrides, env)
    text = markdown(figures)
    if args.json:
        print(json.dumps(figures))
    else:
        print(text)
    if not args.no_doc:
        report.update_section("own-data", text, args.doc)
    return 0 if all(figures["bar"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
