"""The package as pip builds it: a wheel holds every module and the presets, and they load from it.

The presets live in the top-level presets/ folder; pyproject maps them into the package as
swavctl/presets/. An editable install (the README's) reads them from the checkout, so only a
built wheel shows whether a normal ``pip install`` ships them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_built_wheel_ships_every_module_and_the_presets(tmp_path: Path) -> None:
    # Built from a clean copy: setuptools reuses a build/ folder left in a checkout.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("swavctl", "presets"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("swavctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "swavctl").rglob("*.py")}
    assert modules - names == set()  # no subpackage left out of pyproject's list
    presets = sorted(p.name for p in (ROOT / "presets").glob("*.toml"))
    assert len(presets) >= 4 and {f"swavctl/presets/{name}" for name in presets} <= names

    # Installed from the wheel alone, run from a folder that is not the checkout.
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    probe = (
        "import json, swavctl, swavctl.config as c\n"
        "print(json.dumps({'file': swavctl.__file__, 'names': c.preset_names(),\n"
        "  'demo': c.resolve(preset='demo').model_dump(mode='json')}))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert Path(found["file"]).is_relative_to(target)  # the wheel's copy, not the checkout
    assert found["names"] == sorted(name.removesuffix(".toml") for name in presets)
    from swavctl import config

    assert found["demo"] == config.resolve(preset="demo").model_dump(mode="json")
