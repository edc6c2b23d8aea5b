"""Agreement between clusters and labels, from the label x cluster contingency table alone.

The table ``n_ck`` (C labels x K clusters) is accumulated while streaming, so no per-image arrays
are needed. With ``N = sum n``, ``a_c = sum_k n_ck`` and ``b_k = sum_c n_ck``:

* **NMI** = ``I(Y; K) / ((H(Y) + H(K)) / 2)`` (the arithmetic normalisation, scikit-learn's default);
  1 when the clusters are the classes up to renaming, 0 when they are independent.
* **ARI** = ``(sum_ck C(n_ck, 2) - E) / ((sum_c C(a_c, 2) + sum_k C(b_k, 2)) / 2 - E)`` with
  ``E = sum_c C(a_c, 2) sum_k C(b_k, 2) / C(N, 2)`` (Hubert & Arabie 1985); 0 for chance, 1 when equal.
* **purity** = ``sum_k max_c n_ck / N``: each cluster votes for its majority label (many-to-one).
* **accuracy** = ``max_pi sum_c n_{c, pi(c)} / N`` over one-to-one maps pi from labels to clusters
  (the Hungarian algorithm; scipy's ``linear_sum_assignment``). With more clusters than labels the
  unmatched clusters count as wrong, so it is a strict lower bound next to purity.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import mutual_info_score


def add_to_table(table: np.ndarray, labels: np.ndarray, clusters: np.ndarray) -> None:
    """Count (label, cluster) pairs into ``table`` (C x K) in place; labels < 0 are skipped."""
    keep = labels >= 0
    np.add.at(table, (labels[keep], clusters[keep]), 1)


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    p = counts[counts > 0].astype(np.float64) / total
    return float(-(p * np.log(p)).sum())


def nmi(table: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean of the two entropies) of a contingency table."""
    table = np.asarray(table, dtype=np.int64)
    h_labels, h_clusters = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    if h_labels == 0.0 and h_clusters == 0.0:
        return 1.0  # one label and one cluster: identical partitions
    if h_labels == 0.0 or h_clusters == 0.0:
        return 0.0
    mi = float(mutual_info_score(None, None, contingency=table))
    return float(np.clip(mi / ((h_labels + h_clusters) / 2.0), 0.0, 1.0))


def _pairs(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float((x * (x - 1) / 2.0).sum())


def ari(table: np.ndarray) -> float:
    """Adjusted Rand index of a contingency table (Hubert & Arabie)."""
    table = np.asarray(table, dtype=np.int64)
    n = float(table.sum())
    together = _pairs(table)
    rows, cols = _pairs(table.sum(axis=1)), _pairs(table.sum(axis=0))
    all_pairs = n * (n - 1) / 2.0
    if all_pairs == 0:
        return 1.0
    expected = rows * cols / all_pairs
    maximum = (rows + cols) / 2.0
    if maximum == expected:  # both partitions trivial (all one group, or all singletons)
        return 1.0
    return float((together - expected) / (maximum - expected))


def purity(table: np.ndarray) -> float:
    """Fraction of images whose cluster's majority label is their label."""
    table = np.asarray(table, dtype=np.int64)
    total = table.sum()
    return float(table.max(axis=0).sum() / total) if total else 0.0


def hungarian_accuracy(table: np.ndarray) -> tuple[float, dict[int, int]]:
    """Best one-to-one label -> cluster matching: (accuracy, {label index: cluster index})."""
    table = np.asarray(table, dtype=np.int64)
    total = table.sum()
    if not total:
        return 0.0, {}
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / total), {int(r): int(c) for r, c in zip(rows, cols, strict=True)}


def label_metrics(table: np.ndarray) -> dict[str, float]:
    """NMI, ARI, purity and Hungarian accuracy of one contingency table."""
    accuracy, _ = hungarian_accuracy(table)
    return {"nmi": nmi(table), "ari": ari(table), "purity": purity(table), "accuracy": accuracy}
