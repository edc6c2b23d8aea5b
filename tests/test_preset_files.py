"""Presets as files: ``presets show --toml`` round trips, ``extends``, descriptions, shell-safe docs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from swavctl import config
from swavctl.errors import UserError
from tests.conftest import REPO, cli_env, run_cli


def _settings_json(name: str, cwd: Path) -> dict[str, object]:
    shown = run_cli("presets", "show", name, "--json", cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    values: dict[str, object] = json.loads(shown.stdout)
    values.pop("preset")  # the name it was loaded by
    return values


@pytest.mark.parametrize("name", ["demo", "swav-rn50-400ep-bs256"])
def test_presets_show_toml_reads_back_to_the_same_settings(name: str, tmp_path: Path) -> None:
    printed = run_cli("presets", "show", name, "--toml", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    (tmp_path / "mine.toml").write_text(printed.stdout)
    assert printed.stdout.startswith("# swavctl preset: every setting of")
    assert f'description = "{config.preset_description(name)}"' in printed.stdout
    assert _settings_json("mine.toml", tmp_path) == _settings_json(name, tmp_path)


def test_a_printed_preset_runs_as_is(tmp_path: Path) -> None:
    printed = run_cli("presets", "show", "smoke", "--toml", cwd=tmp_path)
    (tmp_path / "smoke-copy.toml").write_text(printed.stdout)
    run = run_cli(
        "pretrain", "--preset", "smoke-copy.toml", "--data", "demo", "--max-steps", "1", "--gpus", "0",
        "--out", "run", "--json", cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["steps"] == 1


def test_a_preset_extends_another(tmp_path: Path) -> None:
    (tmp_path / "more.toml").write_text(
        'description = "The demo with 20 prototypes."\nextends = "demo"\n\n[model]\nprototypes = 20\n'
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "longer.toml").write_text('extends = "../more.toml"\n\n[train]\nepochs = 80\n')
    expected = _settings_json("demo", tmp_path)
    expected["model.prototypes"] = 20
    assert _settings_json("more.toml", tmp_path) == expected
    expected["train.epochs"] = 80
    assert _settings_json("sub/longer.toml", tmp_path) == expected
    # The description is the file's own, else the one of the preset it extends.
    assert config.preset_description(str(tmp_path / "more.toml")) == "The demo with 20 prototypes."
    assert config.preset_description(str(tmp_path / "sub" / "longer.toml")) == "The demo with 20 prototypes."


def test_extends_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    (tmp_path / "typo.toml").write_text('extends = "dmeo"\n')
    (tmp_path / "bad.toml").write_text('extends = "demo"\n[model]\nprototype = 3\n')
    with pytest.raises(
        UserError, match=r"preset a.toml: 'extends' goes round in a circle \(a.toml -> b.toml"
    ):
        config.resolve(preset=str(tmp_path / "a.toml"))
    with pytest.raises(UserError, match="unknown preset 'dmeo'; did you mean 'demo'"):
        config.resolve(preset=str(tmp_path / "typo.toml"))
    result = run_cli("pretrain", "--preset", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: preset bad.toml: unknown setting 'model.prototype'; did you mean 'model.prototypes'?"
    )


def test_presets_list_describes_each_preset(tmp_path: Path) -> None:
    listed = run_cli("presets", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == config.preset_names()
    for line in lines:
        name, description = line.split(None, 1)
        assert description == config.preset_description(name) and len(description) > 20, line


def _doc_pages() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").rglob("*.md")),
        *sorted((REPO / "docs").rglob("*.sbatch")),
    ]


def test_every_set_example_in_the_docs_works_in_bash_and_zsh() -> None:
    """An unquoted ``[`` (or ``*``, ``?``) is a glob: zsh stops with "no matches found"."""
    examples = 0
    for page in _doc_pages():
        for match in re.finditer(r"--set\s+('[^']*'|\"[^\"]*\"|[^\s`]+)", page.read_text()):
            word = match.group(1)
            if "=" not in word:
                continue  # prose ("--set overrides"), not an example
            examples += 1
            if word[0] not in "'\"":
                assert not set(word) & set("[]*?{}"), f"{page.name}: quote --set {word}"
            (value,) = shlex.split(word)
            if value.split("=", 1)[0] != "KEY":  # a placeholder, not an example
                path, _ = config.parse_override(value)
                assert path, value
    assert examples >= 10
