"""swavctl: SwAV self-supervised pretraining (Caron et al. 2020, arXiv 2006.09882)."""

from __future__ import annotations

__version__ = "0.1.0"

from swavctl.sinkhorn import sinkhorn  # noqa: E402

__all__ = ["__version__", "sinkhorn"]
