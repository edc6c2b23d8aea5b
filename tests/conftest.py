"""Shared fixtures: tiny real image folders, an isolated cache, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# One thread per process: the suite runs many small torch processes on 2 cores, and oversubscribed
# threads made tiny ops 10-30x slower. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for a module of tiny-tensor tests (threads there only add waiting,
    far more so on a loaded machine); the previous count is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    try:
        return subprocess.run(
            [sys.executable, "-m", "swavctl", *args],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:  # say where it hung: what it printed so far
        errors = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"swavctl {' '.join(args)} timed out after {timeout} s; its stderr:\n{errors[-4000:]}")


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the CLI in a subprocess with ``tmp_path`` as the working directory."""

    def _run(*args: str, cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=cwd or tmp_path, **kwargs)  # type: ignore[arg-type]

    return _run


# ---------------------------------------------------------------------------------------------
# Real processes: start, watch, signal (used by the multi-process and fault tests)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this one, one thread per process (so runs are
    bitwise reproducible whatever the machine), plus ``extra``."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def start_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, **popen: object
) -> subprocess.Popen[str]:
    """Start ``python -m swavctl ARGS`` without waiting (stdout/stderr piped)."""
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "swavctl", *args],
        cwd=cwd,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


class Watched:
    """A CLI process whose stderr goes to a file, so that a test can wait for a line it prints
    (a state the process reached) while it runs, instead of sleeping for a guessed time."""

    def __init__(self, proc: subprocess.Popen[str], stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        """What the process has written to stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, text: str, *, timeout: float = 180) -> None:
        """Wait until ``text`` appears in stderr; fail if the process exits first."""
        wait_until(lambda: text in self.stderr(), timeout=timeout, proc=self.proc, stderr=self.stderr)

    def exit_within(self, seconds: float) -> tuple[int, str]:
        """Wait for the exit, failing unless it comes within ``seconds``; (status, stderr)."""
        import time

        started = time.monotonic()
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit within {seconds} s; stderr so far:\n{self.stderr()[-3000:]}")
        assert time.monotonic() - started < seconds
        return self.proc.returncode, self.stderr()

    def kill(self) -> None:
        """Kill the process (if it still runs) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_watched(*args: str, cwd: Path, env: dict[str, str] | None = None, **popen: object) -> Watched:
    """Start ``python -m swavctl ARGS`` with stderr to a file in ``cwd`` (see :class:`Watched`)."""
    stderr_path = cwd / f"stderr-{len(list(cwd.glob('stderr-*.txt')))}.txt"
    with stderr_path.open("w") as sink:
        proc = subprocess.Popen(  # type: ignore[call-overload]
            [sys.executable, "-m", "swavctl", *args],
            cwd=cwd,
            env=env or cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=sink,
            text=True,
            **popen,
        )
    return Watched(proc, stderr_path)


def last_logged_step(run_dir: Path) -> int:
    """The last step in ``run_dir/metrics.jsonl`` (0 when there is none yet)."""
    import json

    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    proc: subprocess.Popen[str] | None = None,
    stderr: Callable[[], str] | None = None,
) -> None:
    """Poll ``predicate`` every 20 ms; fail on timeout or when ``proc`` exits first.

    ``stderr`` reads the process's stderr for the failure message where it is not piped.
    """
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            _, errs = proc.communicate()
            errs = stderr() if stderr is not None else errs or ""
            pytest.fail(f"process exited ({proc.returncode}) before the condition held:\n{errs[-3000:]}")
        if time.monotonic() > deadline:
            errs = stderr() if stderr is not None else ""
            pytest.fail(f"timed out after {timeout} s waiting for the condition\n{errs[-3000:]}")
        time.sleep(0.02)


def spawned_workers(marker: str) -> list[int]:
    """The launcher's live worker processes among those with ``marker`` in their environment
    (spawned: ``multiprocessing.spawn``; not the launcher, nor multiprocessing's resource tracker)."""
    found = []
    for pid in pids_with_env(marker):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:  # exited since
            continue
    return found


def pids_with_env(marker: str) -> list[int]:
    """Live processes whose environment contains ``marker`` (to find workers, or leftovers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            found.append(int(entry.name))
    return sorted(found)
