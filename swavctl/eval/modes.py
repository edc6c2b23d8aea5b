"""The evaluation modes by ``--mode`` name; each one is ``run_mode`` of the module named for it.

A new mode is a module with a ``run_mode(ctx, out)`` (see :mod:`swavctl.eval.context`), one entry
here and its name in :data:`swavctl.eval.options.MODES`.
"""

from __future__ import annotations

from swavctl.eval import fast, finetune, knn, linear
from swavctl.eval.context import Mode

REGISTRY: dict[str, Mode] = {
    "fast": fast.run_mode,
    "linear": linear.run_mode,
    "knn": knn.run_mode,
    "finetune": finetune.run_mode,
}
