"""One error convention for every command, walked through the same bad inputs in real processes.

Each command meets an unknown option, a value of the wrong type, a missing model, an output that
is a file and an output that cannot be written; each answer is one ``error:`` line, exit 2. The
table below must name every command the app has (a new command fails here until it is added),
so no command can drift from the convention.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import typer.main

from swavctl import __version__
from tests.conftest import cli_env, run_cli, write_image_folder

# Per command: an option taking a number (or None), whether it takes MODEL, and what --out is.
COMMANDS: dict[str, dict[str, object]] = {
    "pretrain": {"number": "--epochs", "model": False, "out": "folder"},
    "eval-linear": {"number": "--batch-size", "model": True, "out": "folder"},
    "inspect-clusters": {"number": "--per-cluster", "model": True, "out": "folder"},
    "export": {"number": None, "model": True, "out": "file"},
    "presets list": {"number": None, "model": False, "out": None},
    "presets show": {"number": None, "model": False, "out": None},
    "bench data": {"number": "--batches", "model": False, "out": None},
    "bench step": {"number": "--steps", "model": False, "out": None},
}


def _visible_commands() -> set[str]:
    group = typer.main.get_command(__import__("swavctl.cli.app", fromlist=["app"]).app)
    ctx = typer.Context(group)
    names: set[str] = set()
    for name in group.list_commands(ctx):  # type: ignore[attr-defined]
        command = group.get_command(ctx, name)  # type: ignore[attr-defined]
        if command.hidden:
            continue
        if hasattr(command, "list_commands"):
            names.update(f"{name} {sub}" for sub in command.list_commands(ctx))
        else:
            names.add(name)
    return names


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.args, result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Usage:" not in result.stderr and "Traceback" not in result.stderr
    return lines[0]


def test_the_table_names_every_command() -> None:
    assert set(COMMANDS) == _visible_commands()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_usage_mistakes_are_one_line_with_a_help_hint(command: str, tmp_path: Path) -> None:
    words = command.split()
    hint = f"(try 'swavctl {command} --help')"
    line = _one_error_line(run_cli(*words, "--no-such-option", cwd=tmp_path))
    assert line.startswith("error: no such option '--no-such-option'") and line.endswith(hint), line
    number = COMMANDS[command]["number"]
    if isinstance(number, str):
        # A misspelt option names the nearest valid one; a wrong type names the flag and the value.
        line = _one_error_line(run_cli(*words, number[:-1], "3", cwd=tmp_path))
        assert line == f"error: no such option '{number[:-1]}'; did you mean '{number}'? {hint}"
        line = _one_error_line(run_cli(*words, number, "1.5", cwd=tmp_path))
        assert line == f"error: invalid value for {number}: expected a whole number, got '1.5' {hint}"


def test_unknown_commands_name_the_nearest_one(tmp_path: Path) -> None:
    line = _one_error_line(run_cli("pretrian", cwd=tmp_path))
    assert line == "error: no such command 'pretrian'; did you mean 'pretrain'? (try 'swavctl --help')"
    line = _one_error_line(run_cli("presets", "lst", cwd=tmp_path))
    assert line == "error: no such command 'lst'; did you mean 'list'? (try 'swavctl presets --help')"
    line = _one_error_line(run_cli("bench", "zzz", cwd=tmp_path))
    assert line == "error: no such command 'zzz'; commands: data, step (try 'swavctl bench --help')"


def test_a_flag_value_is_reported_under_the_flag_typed(tmp_path: Path) -> None:
    line = _one_error_line(run_cli("pretrain", "--preset", "smoke", "--epochs", "0", cwd=tmp_path))
    assert line == "error: invalid value for --epochs: Input should be greater than or equal to 1 (got 0)"
    # A --set override is a setting, and is named as one.
    line = _one_error_line(run_cli("pretrain", "--preset", "smoke", "--set", "train.epochs=0", cwd=tmp_path))
    assert "invalid value for 'train.epochs'" in line


@pytest.mark.parametrize("command", [c for c in sorted(COMMANDS) if COMMANDS[c]["model"]])
def test_a_missing_model_is_worded_once(command: str, tmp_path: Path) -> None:
    line = _one_error_line(run_cli(command, "no-such-run", cwd=tmp_path))
    assert line == (
        "error: model not found: no-such-run; pass MODEL as a run folder, a checkpoint (.pt) or an "
        "export (.safetensors)"
    )
    # With no MODEL the default runs/latest is missing: the hint says how to make one.
    line = _one_error_line(run_cli(command, cwd=tmp_path))
    assert line.endswith(", or pretrain one first (swavctl pretrain --preset demo)"), line


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny export with head (a real model file), a tiny image folder and a file in the way."""
    import torch

    from swavctl.config import resolve
    from swavctl.model.swav import SwAV
    from swavctl.weights.export import write_export

    root = tmp_path_factory.mktemp("convention")
    settings = resolve(preset="smoke", flags={"data.path": "images"})
    torch.manual_seed(0)
    m = settings.model
    model = SwAV(m.arch, m.hidden_dim, m.embedding_dim, m.prototypes)
    export = root / "model.safetensors"
    write_export(model, export, settings=settings, step=None, epoch=None, with_head=True)
    images = write_image_folder(root / "images", classes=2, per_class=4)
    blocker = root / "a-file"
    blocker.write_text("in the way\n")
    return {"root": root, "model": export, "images": images, "file": blocker}


def _out_cases(command: str, made: dict[str, Path]) -> list[str]:
    model, images = str(made["model"]), str(made["images"])
    return {
        "pretrain": ["--preset", "smoke", "--data", images, "--max-steps", "1", "--gpus", "0"],
        "eval-linear": [model, "--data", images, "--gpus", "0", "--workers", "0"],
        "inspect-clusters": [model, "--data", images, "--gpus", "0", "--workers", "0"],
        "export": [model],
    }[command]


@pytest.mark.parametrize("command", [c for c in sorted(COMMANDS) if COMMANDS[c]["out"]])
def test_outputs_that_cannot_be_written_are_worded_once(command: str, made: dict[str, Path]) -> None:
    args = _out_cases(command, made)
    blocker = made["file"]
    cwd = made["root"]
    if COMMANDS[command]["out"] == "folder":
        line = _one_error_line(run_cli(command, *args, "--out", str(blocker), cwd=cwd, env=cli_env()))
        assert (
            line == f"error: --out {blocker} is a file, not a folder; pass a folder there (new or existing)"
        )
        under = blocker / "sub"
    else:
        folder = cwd / "folder.safetensors"
        folder.mkdir(exist_ok=True)
        line = _one_error_line(run_cli(command, *args, "--out", str(folder), cwd=cwd, env=cli_env()))
        assert line == f"error: --out {folder} is a folder, not a file; pass a file name there"
        under = blocker / "x.safetensors"
    line = _one_error_line(run_cli(command, *args, "--out", str(under), cwd=cwd, env=cli_env()))
    assert line.startswith(f"error: cannot write --out {under}: "), line
    assert line.endswith("; pass a writable location with --out"), line


def test_too_few_gpus_are_worded_once_with_gpus_0(made: dict[str, Path]) -> None:
    import torch

    from swavctl.errors.messages import not_enough_gpus

    visible = torch.cuda.device_count()
    asked = str(visible + 1)
    wording = not_enough_gpus(visible + 1, visible)
    assert wording.endswith("; use --gpus 0 to run on the CPU")
    model, images = str(made["model"]), str(made["images"])
    # Two of the three places that count devices (eval-linear's is worded by the same function).
    for args in (
        ["pretrain", "--preset", "smoke", "--data", images],
        ["inspect-clusters", model, "--data", images],
    ):
        line = _one_error_line(run_cli(*args, "--gpus", asked, cwd=made["root"], env=cli_env()))
        assert line == f"error: {wording}", (args, line)


def _without_torch(tmp_path: Path, *, failure: str = "ImportError") -> dict[str, str]:
    """An environment whose ``import torch`` (and torchvision) fails: a command that imports either
    before it answers cannot answer at all."""
    fake = tmp_path / "no-torch"
    for name in ("torch", "torchvision"):
        (fake / name).mkdir(parents=True, exist_ok=True)
        (fake / name / "__init__.py").write_text(f"raise {failure}('{name} was imported')\n")
    return cli_env(PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))


def test_malformed_containers_are_refused_before_torch_is_imported(tmp_path: Path) -> None:
    (tmp_path / "header.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    (tmp_path / "notzip.pt").write_bytes(b"PK\x03\x04 this is no zip archive")
    (tmp_path / "notpickle.pt").write_bytes(b"\x80\x09 no pickle protocol 9")
    (tmp_path / "text.pth").write_text("hello\n")
    env = _without_torch(tmp_path)
    cases = {
        "header.safetensors": "not a valid safetensors file: declared header length",
        "notzip.pt": "not a readable PyTorch checkpoint (corrupt or truncated?): not a zip archive",
        "notpickle.pt": "not a readable PyTorch checkpoint (corrupt or truncated?): not a pickle",
        "text.pth": "not a PyTorch checkpoint (neither a zip archive nor a pickle)",
    }
    commands = ["eval-linear", "inspect-clusters", "export", "inspect-clusters"]  # each command, each file
    for (name, expected), command in zip(cases.items(), commands, strict=True):
        line = _one_error_line(run_cli(command, name, cwd=tmp_path, env=env))
        assert line.startswith(f"error: {name}: {expected}"), (command, line)
    line = _one_error_line(run_cli("export", "--info", "header.safetensors", cwd=tmp_path, env=env))
    assert "not a valid safetensors file" in line
    line = _one_error_line(
        run_cli(
            "export",
            "--from-official",
            "notzip.pt",
            "--arch",
            "resnet50",
            "--out",
            "o.safetensors",
            cwd=tmp_path,
            env=env,
        )
    )
    assert "not a zip archive" in line
    # pretrain --init reads its weights file the same way, before torch, and names a missing one.
    for name, expected in (
        ("notpickle.pt", cases["notpickle.pt"]),
        ("gone.pth.tar", "no such file or folder"),
    ):
        line = _one_error_line(run_cli("pretrain", "--init", name, "--data", ".", cwd=tmp_path, env=env))
        assert expected in line and name in line, line
    # Usage errors and --help need no torch either.
    assert run_cli("pretrain", "--help", cwd=tmp_path, env=env).returncode == 0


def test_a_bad_data_folder_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    """pretrain refuses a missing folder, a file and a folder without images at once, with a
    preset or with the automatic recipe, before it imports torch."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "no-images" / "sub").mkdir(parents=True)
    (tmp_path / "no-images" / "sub" / "notes.txt").write_text("hello")
    env = _without_torch(tmp_path)
    cases = {
        "missing": "error: data folder does not exist: missing",
        "a-file": "error: data path is not a folder: a-file",
        "no-images": "error: no image files (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)"
        " found under no-images",
    }
    for preset in (("--preset", "smoke"), ()):
        for folder, expected in cases.items():
            line = _one_error_line(run_cli("pretrain", *preset, "--data", folder, cwd=tmp_path, env=env))
            assert line == expected, (preset, line)
    assert not (tmp_path / "runs").exists()


def test_an_internal_failure_exits_1_with_the_version_and_the_log(tmp_path: Path) -> None:
    env = _without_torch(tmp_path, failure="RuntimeError")
    env["SWAVCTL_CACHE"] = str(tmp_path / "cache")
    result = run_cli("pretrain", "--preset", "smoke", "--data", "demo", cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr  # a bug keeps its traceback
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: internal error in swavctl {__version__}: RuntimeError: torch was imported"
    )
    log = Path(last.rsplit("with the log: ", 1)[1])
    assert log.parent == tmp_path / "cache" / "crash"
    assert "torch was imported" in log.read_text() and f"swavctl {__version__}" in log.read_text()


def test_python_m_and_the_entry_point_say_swavctl(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "swavctl", "export", "--bogus"], cwd=tmp_path, capture_output=True, text=True
    )
    assert "(try 'swavctl export --help')" in result.stderr
