"""The Python API: a light ``import swavctl``, lazy entry points, and docs/api.md's examples run."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO, cli_env


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_import_swavctl_imports_no_torch_and_exposes_the_api_lazily(tmp_path: Path) -> None:
    result = _python(
        """
        import sys
        import swavctl
        heavy = sorted(m for m in ("torch", "torchvision", "swavctl.api") if m in sys.modules)
        print("heavy", heavy)
        print("names", sorted(set(swavctl.__all__) & set(dir(swavctl))))
        import swavctl.clustering.sinkhorn_knopp  # importing the module must not rebind swavctl.sinkhorn
        print("sinkhorn", swavctl.sinkhorn.__module__, callable(swavctl.sinkhorn))
        from swavctl import sinkhorn
        print("same", sinkhorn is swavctl.sinkhorn is swavctl.clustering.sinkhorn_knopp.sinkhorn)
        import torch.nn
        print("api", all(callable(getattr(swavctl, n)) for n in
              ("pretrain", "evaluate", "load_backbone", "load_settings")))
        try:
            swavctl.no_such_name
        except AttributeError as exc:
            print("missing", exc)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "heavy []"
    assert (
        lines[1]
        == "names ['__version__', 'evaluate', 'load_backbone', 'load_settings', 'pretrain', 'sinkhorn']"
    )
    assert lines[2] == "sinkhorn swavctl.clustering.sinkhorn_knopp True"
    assert lines[3] == "same True"
    assert lines[4] == "api True"
    assert lines[5] == "missing module 'swavctl' has no attribute 'no_such_name'"


def test_bad_input_raises_the_commands_message(tmp_path: Path) -> None:
    result = _python(
        """
        import swavctl
        from swavctl.errors import UserError
        for call in (
            lambda: swavctl.load_settings(preset="smok"),
            lambda: swavctl.load_settings(overrides={"train.epoch": 3}),
            lambda: swavctl.load_settings(epoch=3),
            lambda: swavctl.evaluate("no-such-run"),
        ):
            try:
                call()
            except UserError as exc:
                print(exc)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "unknown preset 'smok'; did you mean 'smoke'?",
        "flags: unknown setting 'train.epoch'; did you mean 'train.epochs'?",
        "unknown keyword 'epoch'; use one of data, out, epochs, batch_size, arch, init, max_steps, gpus, "
        "procs, knn_data or overrides={'a.b': value}",
        "model not found: no-such-run; pass MODEL as a run folder, a checkpoint (.pt) or an export "
        "(.safetensors)",
    ]


def python_blocks(markdown: str) -> list[str]:
    """The ```python code blocks of a Markdown page, in order."""
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_the_examples_in_docs_api_md_run(tmp_path: Path) -> None:
    blocks = python_blocks((REPO / "docs" / "api.md").read_text())
    assert len(blocks) >= 4
    # One interpreter runs them in order, as a reader would in a notebook.
    result = _python("\n".join(blocks), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert re.search(r"^convnet-tiny 4 \[16, 8\]$", out, flags=re.MULTILINE), out
    assert re.search(r"^runs/\S+ 4 \d", out, flags=re.MULTILINE), out
    assert re.search(r"^torch.Size\(\[2, \d+\]\)$", out, flags=re.MULTILINE), out
    assert re.search(r"^knn top-1 \d\.\d{3}$", out, flags=re.MULTILINE), out
    assert (tmp_path / "runs" / "api" / "backbone.safetensors").is_file()
