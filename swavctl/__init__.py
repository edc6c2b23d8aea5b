"""swavctl: SwAV self-supervised pretraining (Caron et al. 2020, arXiv 2006.09882).

The package itself imports nothing heavy, so ``swavctl --help`` and ``--version`` answer at once
(torch takes about a second to import); the commands import what they need when they run.
The library's entry points are modules: ``from swavctl.sinkhorn import sinkhorn``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
