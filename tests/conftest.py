"""Shared fixtures: tiny real image folders, an isolated cache, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test session gets its own swavctl cache (the demo digits are written there once)."""
    cache = tmp_path_factory.getbasetemp() / "swavctl-cache"
    monkeypatch.setenv("SWAVCTL_CACHE", str(cache))


def write_image_folder(
    root: Path, *, classes: int = 2, per_class: int = 16, size: int = 16, seed: int = 0, fmt: str = "png"
) -> Path:
    """An ImageFolder of small real images: class ``c`` is a noisy image of a class-specific colour."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, size=3)
        for i in range(per_class):
            noise = rng.integers(-40, 40, size=(size, size, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A 2-class ImageFolder of 32 PNG images of 16 px."""
    return write_image_folder(tmp_path / "images")


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m swavctl ARGS`` in a real subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "swavctl", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the CLI in a subprocess with ``tmp_path`` as the working directory."""

    def _run(*args: str, cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=cwd or tmp_path, **kwargs)  # type: ignore[arg-type]

    return _run
