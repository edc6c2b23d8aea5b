"""Bounded per-cluster member samples: the N most confident (heaps) and N uniform (reservoirs).

Memory is at most ``N`` entries per cluster, whatever the number of images streamed through.
"""

from __future__ import annotations

import heapq

import numpy as np


class TopN:
    """The ``n`` highest-scoring items per cluster, kept in one min-heap each.

    Ties go to the earlier item (lower index): the heap orders by (score, -index), so among equal
    scores the latest item is evicted first.
    """

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        self.n = n
        self._heaps: dict[int, list[tuple[float, int]]] = {}

    def push(self, cluster: int, score: float, index: int) -> None:
        if self.n == 0:
            return
        heap = self._heaps.setdefault(cluster, [])
        entry = (score, -index)
        if len(heap) < self.n:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)

    def push_many(self, clusters: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> None:
        for cluster, score, index in zip(clusters.tolist(), scores.tolist(), indices.tolist(), strict=True):
            self.push(cluster, score, index)

    def items(self, cluster: int) -> list[tuple[int, float]]:
        """(index, score) pairs of a cluster, highest score first (earlier index first among ties)."""
        return [(-neg, score) for score, neg in sorted(self._heaps.get(cluster, []), reverse=True)]


class Reservoir:
    """A uniform random sample of ``n`` members per cluster (Vitter's algorithm R), seeded."""

    def __init__(self, n: int, *, seed: int) -> None:
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        self.n = n
        self._rng = np.random.default_rng(seed)
        self._samples: dict[int, list[int]] = {}
        self._seen: dict[int, int] = {}

    def push(self, cluster: int, index: int) -> None:
        if self.n == 0:
            return
        seen = self._seen.get(cluster, 0)
        self._seen[cluster] = seen + 1
        sample = self._samples.setdefault(cluster, [])
        if seen < self.n:
            sample.append(index)
        else:
            slot = int(self._rng.integers(seen + 1))  # keep the new item with probability n / (seen + 1)
            if slot < self.n:
                sample[slot] = index

    def push_many(self, clusters: np.ndarray, indices: np.ndarray) -> None:
        for cluster, index in zip(clusters.tolist(), indices.tolist(), strict=True):
            self.push(cluster, index)

    def items(self, cluster: int) -> list[int]:
        """The sampled indices of a cluster, in ascending order."""
        return sorted(self._samples.get(cluster, []))
