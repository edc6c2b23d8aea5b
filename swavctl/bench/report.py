"""Hardware description and ``docs/benchmarks.md`` sections, each owned by one benchmark script.

A section sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` markers; a script
rewrites only its own section, so the scripts can run in any order and the rest of the page
(written by hand) stays as it is.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

from swavctl.reporting.provenance import cpu_name

DEFAULT_DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

Every CPU figure here was measured by the command printed next to it, with a baseline measured in
the same run on the same machine; ratios are ours divided by the baseline (higher is better). The
GPU section has absolute figures (samples/s, MFU) against the issue's target: no baseline runs on
the GPU machine. Each section is rewritten by its script (`bench/*.py`, `bench/gpu.sh`), except
the demo section, which records the output of the commands listed in it.
Machines shared with other jobs give noisy absolute numbers: the side-by-side ratios are the
figures to compare.
The CPU ratios against a baseline (data pipeline, batch padding, training step, Sinkhorn, LARC,
multi-crop) come from medians of at least 3 alternating rounds of the baseline and ours;
`bash bench/cpu_all.sh` re-measures them all, one script after the other, with the commands printed
in their sections.
"""


def hardware(device: torch.device | None = None) -> str:
    """One line: CPU model and cores (and the GPU on a CUDA device), torch version."""
    text = f"{cpu_name()}, {os.cpu_count()} cores"
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text = f"{props.name} ({props.total_memory / 2**30:.0f} GiB) + " + text
    return f"{text}; torch {torch.__version__}, Python {platform.python_version()}"


def today() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")


def command_line() -> str:
    """The command that is running, as typed from the repository root (``python bench/x.py ...``)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        script = Path(argv[0]).resolve()
        root = DEFAULT_DOC.parents[1]
        argv[0] = str(script.relative_to(root)) if script.is_relative_to(root) else os.path.relpath(script)
        argv.insert(0, "python")
    return shlex.join(argv)


def update_section(name: str, body: str, doc: Path = DEFAULT_DOC) -> Path:
    """Replace (or append) section ``name`` of ``doc`` with ``body`` (Markdown)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else _HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text if text.endswith("\n") else text + "\n")
    return doc


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark script shares: ``--threads``, ``--doc`` and ``--no-doc``."""
    parser.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="the page to update")
    parser.add_argument("--no-doc", action="store_true", help="print only, leave the page alone")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from ``--threads`` (0 keeps torch's default)."""
    if args.threads:
        torch.set_num_threads(args.threads)
