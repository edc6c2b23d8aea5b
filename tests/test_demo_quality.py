"""The demo recipe learns: a short seeded run of ``--preset demo`` beats random init on held-out digits.

This runs ``bench/demo_quality.py`` (the benchmark behind docs/benchmarks.md) in a real process
on the demo recipe shortened to 12 of its 50 epochs (a complete warmup + cosine schedule; about
33 s of training on one thread). One torch thread: on a shared 2-core machine two OpenMP threads
can run many times slower than one, and a fixed thread count keeps the run's arithmetic fixed.

What it checks, against figures measured by the same script on the same val digits:

* the randomly initialised model (same architecture and seed) sends every digit to one
  prototype: NMI 0;
* after 12 epochs the prototypes split the digits by class. Seeds 31/1/2/3 measured NMI
  0.73/0.66/0.67/0.81 with all 10 prototypes used (0.75/0.69/0.66/0.72 before issue 19 changed
  which crops a seed draws); the bound, 0.55, leaves a 0.1 margin under the worst seed and is
  far above random init;
* 20-NN accuracy stays high: 0.96/0.93/0.93/0.96 measured (0.94/0.97/0.93/0.94 before), bound
  0.90. Random features already score 0.96 on these easy 8x8 digits and a short run dips below
  that before the full 50-epoch run passes it (0.98), so this bound guards against damaged
  features, not for learning; the
  NMI bound is the learning check. The full run's targets (NMI >= 0.80, 20-NN >= 0.97) are
  measured by the benchmark, too slow for the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHORT_EPOCHS = 12


def test_short_demo_run_learns_digit_clusters(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, str(REPO / "bench" / "demo_quality.py"),
            "--out", str(tmp_path / "run"),
            "--set", f"train.epochs={SHORT_EPOCHS}",
            "--threads", "1",
            "--json",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)

    assert figures["epochs_done"] == SHORT_EPOCHS
    assert figures["prototypes"] == 10 and figures["eval_size"] == 16
    # Random init: one prototype takes every digit.
    assert figures["random_init_clusters_used"] <= 2
    assert figures["random_init_nmi"] < 0.2
    # Trained: the prototypes split the digits by class.
    assert figures["clusters_used"] >= 9
    assert figures["nmi"] >= 0.55
    assert figures["nmi"] >= figures["random_init_nmi"] + 0.5
    assert figures["knn20"] >= 0.90
