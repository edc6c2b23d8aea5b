"""Per-prototype counts gathered by the assign pass of :mod:`swavctl.inspect.run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from swavctl.inspect import metrics, stats
from swavctl.inspect.topn import Reservoir, TopN


@dataclass
class Tally:
    """Per-prototype counts of one assignment, its confidence sums and its label x cluster table."""

    k: int
    num_labels: int
    sizes: np.ndarray = field(init=False)
    confidence: np.ndarray = field(init=False)
    table: np.ndarray | None = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = np.zeros(self.k, dtype=np.int64)
        self.confidence = np.zeros(self.k, dtype=np.float64)
        self.table = np.zeros((self.num_labels, self.k), dtype=np.int64) if self.num_labels else None

    def add(self, clusters: np.ndarray, confidence: np.ndarray, labels: np.ndarray | None) -> None:
        np.add.at(self.sizes, clusters, 1)
        np.add.at(self.confidence, clusters, confidence)
        if self.table is not None and labels is not None:
            metrics.add_to_table(self.table, labels, clusters)

    def summary(self) -> dict[str, Any]:
        n = int(self.sizes.sum())
        out: dict[str, Any] = {
            "prototypes_used": int((self.sizes > 0).sum()),
            "empty_prototypes": int((self.sizes == 0).sum()),
            "entropy": stats.size_entropy(self.sizes),
            "entropy_ratio": stats.entropy_ratio(self.sizes),
            "largest": int(self.sizes.max()),
            "median_nonempty": float(np.median(self.sizes[self.sizes > 0])) if n else None,
            "largest_over_median": stats.largest_over_median(self.sizes),
            "gini": stats.gini(self.sizes),
            "mean_confidence": float(self.confidence.sum() / n) if n else None,
        }
        if self.table is not None:
            out.update(metrics.label_metrics(self.table))
        else:
            out.update({"nmi": None, "ari": None, "purity": None, "accuracy": None})
        return out


@dataclass
class PassResult:
    """What the assign pass gathered: a tally per assignment, the members for the grids, the
    largest deviation of the balanced masses from 1/K, and how many images were sorted."""

    tallies: dict[str, Tally]
    top: TopN
    sample: Reservoir
    mass_error: float
    sorted_into: int


def mean_confidence(tally: Tally, p: int) -> float:
    """Mean confidence of the members of prototype ``p`` (0 for an empty one)."""
    size = tally.sizes[p]
    return float(tally.confidence[p] / size) if size else 0.0
