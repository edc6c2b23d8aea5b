"""`swavctl export --from-official` and the safety rules: pickles with code, malformed safetensors.

The official-layout checkpoints are built here from torchvision models the way the official
training script saves them (DistributedDataParallel ``module.`` prefixes, ``projection_head.*``,
``prototypes.weight``, wrapped in ``{"epoch", "state_dict", "optimizer"}``).
"""

from __future__ import annotations

import builtins
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from swavctl.cli.app import app
from swavctl.errors import UserError
from swavctl.weights.model_io import load_model
from swavctl.weights.pickles import torch_version_is_safe
from tests.conftest import REPO, run_cli, write_image_folder


def _official_state(
    model: torch.nn.Module, *, hidden: int, out: int, k: int, seed: int
) -> dict[str, torch.Tensor]:
    """An official SwAV state dict: module.-prefixed backbone, MLP projection head, prototypes."""
    g = torch.Generator().manual_seed(seed)
    state = {k_: v.clone() for k_, v in model.state_dict().items() if not k_.startswith("fc.")}
    for key, value in state.items():  # non-trivial BN statistics
        if key.endswith("running_mean"):
            value.copy_(torch.randn(value.shape, generator=g) * 0.1)
        elif key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=g) + 0.5)
        elif key.endswith("num_batches_tracked"):
            value.fill_(1234)
    d = 2048 if "layer4.2.conv3.weight" in state else 512
    head = {
        "projection_head.0.weight": torch.randn(hidden, d, generator=g) * 0.02,
        "projection_head.0.bias": torch.randn(hidden, generator=g) * 0.02,
        "projection_head.1.weight": torch.rand(hidden, generator=g) + 0.5,
        "projection_head.1.bias": torch.randn(hidden, generator=g) * 0.1,
        "projection_head.1.running_mean": torch.randn(hidden, generator=g) * 0.1,
        "projection_head.1.running_var": torch.rand(hidden, generator=g) + 0.5,
        "projection_head.1.num_batches_tracked": torch.tensor(77),
        "projection_head.3.weight": torch.randn(out, hidden, generator=g) * 0.05,
        "projection_head.3.bias": torch.randn(out, generator=g) * 0.05,
        "prototypes.weight": torch.nn.functional.normalize(torch.randn(k, out, generator=g), dim=1),
    }
    state.update(head)
    return {f"module.{key}": value for key, value in state.items()}


def _in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real CLI app invoked in this process (no interpreter start-up; same exit codes/output)."""
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(previous)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += f"\n{type(result.exception).__name__}: {result.exception}"
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


def _tv(arch: str) -> torch.nn.Module:
    model = getattr(torchvision.models, arch)()
    model.fc = torch.nn.Identity()
    return model


@pytest.fixture(scope="module")
def official50(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("official50")
    torch.manual_seed(0)
    state = _official_state(_tv("resnet50"), hidden=64, out=16, k=30, seed=1)
    checkpoint = root / "swav_official.pth.tar"
    torch.save({"epoch": 7, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, checkpoint)
    return {"root": root, "ckpt": checkpoint, "state": state}


def test_official_resnet50_converts_and_loads_strictly(official50: dict[str, Any]) -> None:
    root, state = official50["root"], official50["state"]
    result = run_cli(
        "export",
        "--from-official",
        official50["ckpt"].name,
        "--arch",
        "resnet50",
        "--out",
        "swav50.safetensors",
        "--with-head",
        "--json",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["contents"] == "backbone+head" and summary["tensors"] == len(state)

    tensors = load_file(root / "swav50.safetensors")
    expected = {k[len("module.") :]: v for k, v in state.items()}
    expected = {
        ("head." + k[len("projection_head.") :] if k.startswith("projection_head.") else k): v
        for k, v in expected.items()
    }
    assert set(tensors) == set(expected)  # every key accounted for, none invented
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)

    # The imported file works wherever an export does: load_model ...
    loaded = load_model(root / "swav50.safetensors")
    model_settings = loaded.settings.model
    assert (model_settings.arch, model_settings.hidden_dim, model_settings.embedding_dim) == (
        "resnet50",
        64,
        16,
    )
    assert model_settings.prototypes == 30 and loaded.has_head and loaded.epoch == 7 and loaded.step is None
    assert loaded.settings.data.crop_sizes == [224, 96] and loaded.settings.data.crop_counts == [2, 6]
    assert loaded.settings.data.augment.std == (0.228, 0.224, 0.225)
    assert loaded.settings.data.augment.mean == (0.485, 0.456, 0.406)
    reference = _tv("resnet50")
    reference.load_state_dict(
        {k: v for k, v in expected.items() if not k.startswith(("head.", "prototypes."))}
    )
    reference.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (loaded.model.backbone(x) - reference(x)).abs().max().item() == 0.0
        z, scores = loaded.model([x])
        # z = normalize(head(f)); scores = z C^T, recomputed in float64 from the checkpoint tensors.
        f = reference(x).double()
        h = f @ expected["head.0.weight"].double().T + expected["head.0.bias"].double()
        h = (h - expected["head.1.running_mean"].double()) / torch.sqrt(
            expected["head.1.running_var"].double() + 1e-5
        ) * expected["head.1.weight"].double() + expected["head.1.bias"].double()
        h = h.clamp_min(0) @ expected["head.3.weight"].double().T + expected["head.3.bias"].double()
        z64 = h / h.norm(dim=1, keepdim=True)
        assert torch.allclose(z.double(), z64, atol=1e-5)
        assert torch.allclose(scores.double(), z64 @ expected["prototypes.weight"].double().T, atol=1e-5)

    # ... and a plain re-export of it is backbone-only and loads strictly into torchvision.
    again = _in_process("export", "swav50.safetensors", "--out", "swav50-backbone.safetensors", cwd=root)
    assert again.returncode == 0, again.stderr
    backbone = load_file(root / "swav50-backbone.safetensors")
    strict = _tv("resnet50")
    strict.load_state_dict(backbone, strict=True)
    assert all(torch.equal(backbone[k], v) for k, v in strict.state_dict().items())
    with safe_open(root / "swav50-backbone.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["source"] == "official" and meta["source_file"] == official50["ckpt"].name
    assert meta["arch"] == "resnet50" and meta["feature_dim"] == "2048" and meta["num_prototypes"] == "30"
    assert meta["crop_size"] == "224" and json.loads(meta["std"]) == [0.228, 0.224, 0.225]


def test_official_bare_state_dict_resnet18(tmp_path: Path) -> None:
    """A bare state dict (as the official releases are), backbone-only export by default."""
    torch.manual_seed(0)
    state = _official_state(_tv("resnet18"), hidden=16, out=8, k=10, seed=2)
    torch.save(state, tmp_path / "bare.pth")
    result = _in_process(
        "export",
        "--from-official",
        "bare.pth",
        "--arch",
        "resnet18",
        "--out",
        "r18.safetensors",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    tensors = load_file(tmp_path / "r18.safetensors")
    model = _tv("resnet18")
    model.load_state_dict(tensors, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"module.{key}"]), key
    loaded = load_model(tmp_path / "r18.safetensors")
    assert not loaded.has_head and loaded.settings.model.prototypes == 10 and loaded.epoch is None


@pytest.mark.parametrize("command", ["eval-linear", "inspect-clusters"])
def test_an_imported_model_records_no_data_so_evaluation_asks_for_data(tmp_path: Path, command: str) -> None:
    """No guess: the demo digits upscaled to 224 px once gave an imported model a meaningless score."""
    torch.manual_seed(0)
    torch.save(_official_state(_tv("resnet18"), hidden=16, out=8, k=10, seed=2), tmp_path / "bare.pth")
    made = _in_process(
        "export",
        "--from-official",
        "bare.pth",
        "--arch",
        "resnet18",
        "--with-head",
        "--out",
        "r18.safetensors",
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    result = _in_process(command, "r18.safetensors", "--gpus", "0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: r18.safetensors records no dataset"), lines
    assert "pass --data DIR" in lines[0] and "--data demo for the built-in digits" in lines[0]
    assert not any(
        (tmp_path / name).exists() for name in ("eval-knn", "eval-fast", "eval-linear", "clusters")
    )


def test_official_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = _official_state(_tv("resnet18"), hidden=16, out=8, k=10, seed=3)
    del state["module.layer4.1.bn2.weight"]
    state["module.fc.weight"] = torch.zeros(10, 512)
    torch.save({"state_dict": state}, tmp_path / "odd.pth")
    result = _in_process(
        "export", "--from-official", "odd.pth", "--arch", "resnet18", "--out", "odd.safetensors", cwd=tmp_path
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert (
        "missing 1 key(s): layer4.1.bn2.weight" in lines[0] and "unexpected 1 key(s): fc.weight" in lines[0]
    )
    assert not (tmp_path / "odd.safetensors").exists()


def test_official_wrong_arch_and_non_finite_are_refused(tmp_path: Path) -> None:
    state = _official_state(_tv("resnet18"), hidden=16, out=8, k=10, seed=4)
    torch.save(state, tmp_path / "r18.pth")
    result = _in_process(
        "export", "--from-official", "r18.pth", "--arch", "resnet34", "--out", "x.safetensors", cwd=tmp_path
    )
    assert result.returncode == 2 and "missing" in result.stderr and "layer1.2.bn1.weight" in result.stderr
    state["module.layer2.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    torch.save(state, tmp_path / "inf.pth")
    result = _in_process(
        "export", "--from-official", "inf.pth", "--arch", "resnet18", "--out", "x.safetensors", cwd=tmp_path
    )
    assert (
        result.returncode == 2 and "NaN or Inf" in result.stderr and "layer2.0.conv1.weight" in result.stderr
    )
    assert not (tmp_path / "x.safetensors").exists()


# ---- pickles that run code -------------------------------------------------------------------


class _WritesAFile:
    """Unpickling this calls builtins.exec, which creates ``target``: what a hostile checkpoint does."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return builtins.exec, (f"open({str(self.target)!r}, 'w').write('pwned')",)


def test_pickle_payload_that_writes_a_file_is_refused(tmp_path: Path) -> None:
    # Control: the payload really writes its file when unpickled without weights_only.
    control = tmp_path / "control-marker"
    torch.save(
        {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _WritesAFile(control)}, tmp_path / "c.pth"
    )
    torch.load(tmp_path / "c.pth", weights_only=False)
    assert control.read_text() == "pwned"

    marker = tmp_path / "marker"
    evil = {"state_dict": {"module.conv1.weight": torch.zeros(1)}, "epoch": _WritesAFile(marker)}
    torch.save(evil, tmp_path / "evil.pth.tar")
    result = run_cli(
        "export",
        "--from-official",
        "evil.pth.tar",
        "--arch",
        "resnet50",
        "--out",
        "evil.safetensors",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused for safety" in lines[0] and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()

    # The same payload given as a swavctl checkpoint (load_model's path) is refused too.
    torch.save({"model": {}, "settings": "", "step": _WritesAFile(marker)}, tmp_path / "evil.pt")
    result = _in_process("export", "evil.pt", "--out", "evil2.safetensors", cwd=tmp_path)
    assert result.returncode == 2 and "refused for safety" in result.stderr
    assert not marker.exists() and not (tmp_path / "evil2.safetensors").exists()


def test_torch_requirement_closes_weights_only_bypasses() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_req = next(d for d in project["dependencies"] if d.replace(" ", "").startswith("torch>="))
    low = torch_req.replace(" ", "").split(">=")[1].split(",")[0]
    assert torch_version_is_safe(low), torch_req
    assert torch_version_is_safe()  # the installed torch
    assert not torch_version_is_safe("2.9.1") and not torch_version_is_safe("2.5.0+cu121")
    assert torch_version_is_safe("2.10.0a0+git123") and torch_version_is_safe("3.0")


# ---- malformed safetensors, through the real CLI ---------------------------------------------


def _file(path: Path, header: dict[str, Any], data: bytes, *, declared: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if declared is None else declared) + blob + data)
    return path


MALFORMED: dict[str, tuple[Any, str]] = {
    # name: (writer, reason expected in the message)
    "huge-header": (
        lambda p: _file(
            p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, declared=2**60
        ),
        "declared header length",
    ),
    "offsets-past-end": (
        lambda p: _file(p, {"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, b"\0" * 8),
        "past the end",
    ),
    "shape-vs-dtype": (
        lambda p: _file(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        "shape disagrees with dtype",
    ),
    "trailing-bytes": (
        lambda p: _file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 24),
        "trailing bytes",
    ),
}


def _run_measured(args: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str, float, float, int]:
    """Run the CLI; return (exit status, stderr, wall seconds, CPU seconds, peak RSS in KiB).

    CPU time and peak RSS come from ``wait4`` for that one process.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "swavctl", *args], cwd=cwd, stdout=out, stderr=err)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        cpu = usage.ru_utime + usage.ru_stime
        return proc.returncode, err.read().decode(), elapsed, cpu, usage.ru_maxrss


@pytest.fixture(scope="module")
def info_baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[float, float, int]:
    """Wall time, CPU time and peak memory of `export --info` on a valid file (start-up cost)."""
    root = tmp_path_factory.mktemp("baseline")
    _file(root / "ok.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    status, stderr, wall, cpu, peak = _run_measured(["export", "--info", "ok.safetensors"], root)
    assert status == 0, stderr
    return wall, cpu, peak


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_exit_2_fast(
    case: str, tmp_path: Path, info_baseline: tuple[float, float, int]
) -> None:
    writer, reason = MALFORMED[case]
    path = writer(tmp_path / f"{case}.safetensors")
    status, stderr, wall, cpu, peak_kib = _run_measured(["export", "--info", path.name], tmp_path)
    lines = stderr.strip().splitlines()
    assert status == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], stderr
    base_wall, base_cpu, base_kib = info_baseline
    # Within 2 s of what start-up (Python, torch) costs for a valid file. CPU time is the strict
    # bound (the test machine may be shared); wall time only guards against a hang.
    assert cpu < base_cpu + 2.0, (cpu, base_cpu)
    assert wall < 2 * base_wall + 10.0, (wall, base_wall)
    assert peak_kib < base_kib + 64 * 1024, (peak_kib, base_kib)  # no allocation for declared sizes

    # load_model (used by eval-linear, inspect-clusters and export MODEL) refuses it the same way.
    start = time.perf_counter()
    with pytest.raises(UserError, match=reason):
        load_model(path)
    assert time.perf_counter() - start < 2.0


def test_malformed_safetensors_as_model_exits_2(tmp_path: Path) -> None:
    writer, reason = MALFORMED["offsets-past-end"]
    (tmp_path / "run").mkdir()
    writer(tmp_path / "run" / "backbone.safetensors")
    # A run folder whose only model is that file: resolved, then refused by the loader.
    result = _in_process("export", "run", "--out", "x.safetensors", cwd=tmp_path)
    assert result.returncode == 2 and reason in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_malformed_safetensors_given_to_eval_and_inspect_exit_2(tmp_path: Path) -> None:
    """The other commands that take a model go through the same validated loader."""
    writer, reason = MALFORMED["offsets-past-end"]
    writer(tmp_path / "bad.safetensors")
    for command in ("eval-linear", "inspect-clusters"):
        result = run_cli(command, "bad.safetensors", "--data", "demo", cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (command, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], (command, lines)


def test_imported_file_works_in_eval_and_inspect(tmp_path: Path) -> None:
    """An official import with its head is a model like any export: k-NN eval and cluster inspection."""
    state = _official_state(_tv("resnet18"), hidden=16, out=8, k=10, seed=6)
    torch.save({"state_dict": state}, tmp_path / "official.pth")
    images = write_image_folder(tmp_path / "images", per_class=8)
    result = run_cli(
        "export", "--from-official", "official.pth", "--arch", "resnet18", "--with-head",
        "--out", "imported.safetensors", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "eval-linear", "imported.safetensors", "--data", str(images), "--mode", "knn", "--crop-size", "32",
        "--workers", "0", "--out", "eval", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert 0.0 <= json.loads(result.stdout)["top1"] <= 1.0
    result = run_cli(
        "inspect-clusters", "imported.safetensors", "--data", str(images), "--out", "clusters", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_prototypes"] == 10 and summary["n_images"] == 16
