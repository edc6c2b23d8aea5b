"""docs/ stays true to the program: the CLI reference and the settings reference are regenerated."""

from __future__ import annotations

from pathlib import Path

from swavctl.cli_reference import render_cli, render_settings

DOCS = Path(__file__).resolve().parents[1] / "docs"
HINT = "docs drifted from the program: run `python -m swavctl.cli_reference` and commit the result"


def test_cli_reference_matches_help() -> None:
    assert (DOCS / "cli.md").read_text() == render_cli(), HINT


def test_settings_reference_matches_models_and_presets() -> None:
    assert (DOCS / "settings.md").read_text() == render_settings(), HINT


def test_readme_commands_exist() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    assert "swavctl pretrain --preset demo" in readme
    assert "bash .ci/run" in readme or "pytest" in readme
