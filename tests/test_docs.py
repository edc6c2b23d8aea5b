"""docs/ stays true to the program: the CLI reference and the settings reference are regenerated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from swavctl.cli.reference import render_cli, render_settings

DOCS = Path(__file__).resolve().parents[1] / "docs"
HINT = "docs drifted from the program: run `python -m swavctl.cli.reference` and commit the result"


def test_cli_reference_matches_help() -> None:
    assert (DOCS / "cli.md").read_text() == render_cli(), HINT


def test_settings_reference_matches_models_and_presets() -> None:
    assert (DOCS / "settings.md").read_text() == render_settings(), HINT


def test_readme_commands_exist() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    assert "swavctl pretrain --preset demo" in readme
    assert "bash .ci/run" in readme or "pytest" in readme


def test_the_readme_library_snippet_runs() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    snippet = readme.split("## Library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scores = torch.randn(16, 5, dtype=torch.float64)
    namespace: dict[str, object] = {"scores": scores}
    exec(compile(snippet, "README.md#library", "exec"), namespace)
    codes = namespace["codes"]
    assert isinstance(codes, torch.Tensor) and codes.shape == (16, 5)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(16, dtype=torch.float64))


def test_the_command_line_starts_without_importing_torch() -> None:
    """--help, --version and a typo's error answer at once: torch (a second to import) is not loaded."""
    probe = (
        "import sys, swavctl.cli.app; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
