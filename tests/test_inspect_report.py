"""The HTML report in a real headless Chromium: it renders the right number of cluster sections,
logs no console errors, and leaves a screenshot in ``test-artifacts/``.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it); without it the test is
skipped with the reason printed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from swavctl.inspect.run import InspectOptions, inspect_clusters
from tests.conftest import REPO
from tests.test_inspect_cli import build_planted

ARTIFACTS = REPO / "test-artifacts"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    reason = "chromium not found (apt-get install -y chromium); the report rendering test cannot run"
    print(f"SKIPPED: {reason}")
    pytest.skip(reason)


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def _console_messages(stderr: str) -> list[str]:
    """Chromium's log lines for page console output (``...:INFO:CONSOLE:1] "message", source: ...``)."""
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE\b", line)]


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = _chromium()
    profile = tmp_path / "profile"

    # The console check itself must be able to fail: a page with a script error is caught.
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    control = _run_chromium(chromium, profile, "--dump-dom", broken.as_uri())
    assert any("undefinedFunction" in line for line in _console_messages(control.stderr)), control.stderr[
        -2000:
    ]

    planted = build_planted(tmp_path / "planted")
    out = tmp_path / "out"
    summary = inspect_clusters(
        InspectOptions(model=planted.model, data=str(planted.data), out=out, max_clusters=2, per_cluster=4)
    )
    assert summary["prototypes_used"] == 3 and summary["grids"] == 2  # capped by --max-clusters
    page = out / "index.html"

    dom = _run_chromium(chromium, profile, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_messages(dom.stderr) == [], dom.stderr[-2000:]
    sections = re.findall(r'<section class="cluster" id="prototype-(\d+)"', dom.stdout)
    assert sections == ["0", "1"]  # largest first (equal sizes: lower prototype first), two drawn
    assert 'data-rendered="2"' in dom.stdout
    assert re.search(r'<div id="js-error">\s*</div>', dom.stdout), "the page's error trap fired"
    assert dom.stdout.count('src="grids/prototype-') == 2
    body = re.search(r'<tbody id="label-table-body">(.*?)</tbody>', dom.stdout, re.S)
    assert body is not None  # the label x cluster table: one row per drawn prototype, in order
    assert re.findall(r'<a href="#prototype-(\d+)">', body.group(1)) == ["0", "1"]

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "inspect-report.png"
    screenshot.unlink(missing_ok=True)
    shot = _run_chromium(
        chromium, profile, f"--screenshot={screenshot}", "--window-size=1200,2000", page.as_uri()
    )
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    assert _console_messages(shot.stderr) == [], shot.stderr[-2000:]
    with Image.open(screenshot) as image:
        assert image.size == (1200, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # text, cards, chart and grids, not a blank page
