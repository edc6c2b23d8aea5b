"""bf16 on a CPU: ``train.precision = "bf16"`` runs oneDNN's bf16 kernels under autocast, the
automatic recipe picks it on CPUs with AMX, and fp16 on a CPU is refused (real processes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from swavctl import config
from swavctl.train.precision import autocast_dtype
from swavctl.train.survey import cpu_has_amx
from tests.conftest import cli_env, run_cli, write_image_folder

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("precision", "dtype"), [("auto", None), ("fp32", None), ("bf16", torch.bfloat16)], ids=str
)
def test_the_cpu_autocasts_to_bf16_only_when_asked(precision: str, dtype: torch.dtype | None) -> None:
    settings = config.resolve(preset="smoke", overrides=[f"train.precision={precision}"])
    assert autocast_dtype(settings, CPU) == dtype


def test_amx_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile amx_int8\n\n")
    assert cpu_has_amx(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\n")
    assert not cpu_has_amx(info)
    assert not cpu_has_amx(tmp_path / "missing")


def test_a_bf16_run_on_the_cpu_trains_and_differs_from_fp32(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "images", per_class=8, size=16)
    losses = {}
    for precision in ("fp32", "bf16"):
        done = run_cli(
            "pretrain", "--preset", "smoke", "--data", str(data), "--gpus", "0", "--max-steps", "2",
            "--out", precision, "--json", "--set", f"train.precision={precision}",
            cwd=tmp_path, env=cli_env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        losses[precision] = json.loads(done.stdout)["final_loss"]
    assert all(math.isfinite(v) for v in losses.values())
    # The same seed and data: only the kernels' precision differs, and it shows in the loss.
    assert losses["bf16"] != losses["fp32"]
    assert math.isclose(losses["bf16"], losses["fp32"], rel_tol=0.05)


def test_fp16_on_a_cpu_is_refused_in_one_line(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "images", per_class=4, size=16)
    done = run_cli(
        "pretrain", "--preset", "smoke", "--data", str(data), "--gpus", "0", "--max-steps", "1",
        "--set", "train.precision=fp16", cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: train.precision=fp16 needs a CUDA GPU; on a CPU use bf16 (fast on CPUs with AMX) or fp32 "
        "(e.g. --set train.precision=bf16)"
    )


@pytest.mark.parametrize("method", ["deepcluster-v2", "sela-v2"])
def test_the_bank_methods_fill_their_bank_and_train_in_bf16(tmp_path: Path, method: str) -> None:
    """The bank's initial pass runs the forward under autocast and makes its batches outside it
    (the batched crops in bf16 once stopped both methods before their first step)."""
    data = write_image_folder(tmp_path / "images", per_class=8, size=16)
    done = run_cli(
        "pretrain", "--preset", "smoke", "--data", str(data), "--gpus", "0", "--max-steps", "2",
        "--method", method, "--set", "train.precision=bf16", "--json", cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
