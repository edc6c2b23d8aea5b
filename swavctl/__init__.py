"""swavctl: SwAV self-supervised pretraining (Caron et al. 2020, arXiv 2006.09882).

The package itself imports nothing heavy, so ``swavctl --help`` and ``--version`` answer at once
(torch takes about a second to import). The library's entry points are loaded on first use
(module ``__getattr__``, PEP 562)::

    from swavctl import sinkhorn            # the Sinkhorn-Knopp function (swavctl.clustering.sinkhorn_knopp)
    swavctl.load_settings(preset="smoke", overrides={"train.epochs": 1})
    swavctl.pretrain(preset="smoke", data="demo", out="runs/demo")   # -> summary dict
    swavctl.load_backbone("runs/demo")       # -> torch.nn.Module
    swavctl.evaluate("runs/demo", mode="knn")  # -> summary dict

See docs/api.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> (module, attribute), imported on first access.
_LAZY = {
    "sinkhorn": ("swavctl.clustering.sinkhorn_knopp", "sinkhorn"),
    "pretrain": ("swavctl.api", "pretrain"),
    "evaluate": ("swavctl.api", "evaluate"),
    "load_backbone": ("swavctl.api", "load_backbone"),
    "load_settings": ("swavctl.api", "load_settings"),
}

__all__ = ["__version__", "evaluate", "load_backbone", "load_settings", "pretrain", "sinkhorn"]

if TYPE_CHECKING:
    from swavctl.api import evaluate, load_backbone, load_settings, pretrain
    from swavctl.clustering.sinkhorn_knopp import sinkhorn


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'swavctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
