"""The files of an inspection, from what the assign pass gathered.

``clusters.json`` (every prototype), ``label_cluster_table.csv`` (with labels), one grid per
prototype with members (largest first, at most ``--max-clusters``), ``sizes.png``, ``index.html``
and, last, ``summary.json``: its presence marks a complete folder.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from swavctl.files.atomic import write_json_atomic, write_text_atomic
from swavctl.inspect import assign, grids, report, stats
from swavctl.inspect.options import ASSIGNMENTS, InspectOptions
from swavctl.inspect.sort_into import folder_name
from swavctl.inspect.tally import PassResult, Tally, mean_confidence
from swavctl.reporting.progress import StageReporter


def write_outputs(
    result: PassResult,
    similarity: stats.PrototypeSimilarity,
    scaling: assign.BalancedScaling,
    images: Any,
    loaded: Any,
    out: Path,
    options: InspectOptions,
    temperature: float,
    skipped: list[tuple[str, str]],
    started: float,
    progress: StageReporter,
) -> dict[str, Any]:
    """Write every output (``summary.json`` last) and return the summary."""
    primary = options.assignment
    tallies = result.tallies
    names = images.label_names
    entries = _cluster_entries(result, similarity, images, primary)
    k = len(entries)
    head = {"num_prototypes": k, "prototype_set": options.prototype_set, "assignment_for_members": primary}
    write_json_atomic(out / "clusters.json", {**head, "prototypes": entries})
    if names:
        _write_label_table(out / "label_cluster_table.csv", tallies, names)
    shown = _draw_grids(result, similarity, images, entries, out, options, progress)
    summaries = _assignment_summaries(result, scaling, options)
    grids.size_chart(tallies[primary].sizes, out / "sizes.png", assignment=primary)
    summary: dict[str, Any] = {
        "n_images": int(tallies[primary].sizes.sum()),
        "skipped_images": len(skipped),
        "num_prototypes": k,
        "prototype_set": options.prototype_set,
        "prototype_sets": len(loaded.model.prototype_sets),
        "assignment": primary,
        **{key: summaries[primary][key] for key in _HEADLINE},
        "num_labels": len(names) if names else 0,
        "duplicate_threshold": options.duplicate_threshold,
        "near_duplicates": [[i, j, round(c, 6)] for i, j, c in similarity.duplicates],
        "temperature": temperature,
        "argmax": summaries["argmax"],
        "balanced": summaries["balanced"],
        "model": str(Path(loaded.source).resolve()),
        "data": str(images.folder),
        "out": str(out.resolve()),
        "report": str((out / "index.html").resolve()),
        "grids": len(shown),
        "sort_into": None if options.sort_into is None else str(options.sort_into),
        "sorted_images": result.sorted_into,
        "skipped_files": [{"path": p, "reason": r} for p, r in skipped[:100]],
        "seconds": round(time.perf_counter() - started, 3),
    }
    table_by_prototype = None
    if names:
        table = tallies[primary].table
        assert table is not None
        table_by_prototype = {str(c["prototype"]): table[:, c["prototype"]].tolist() for c in shown}
    write_text_atomic(
        out / "index.html",
        report.render_report(summary, shown, label_names=names, table=table_by_prototype, chart="sizes.png"),
    )
    write_json_atomic(out / "summary.json", summary)  # last: the commit
    return summary


def _assignment_summaries(
    result: PassResult, scaling: assign.BalancedScaling, options: InspectOptions
) -> dict[str, dict[str, Any]]:
    """Each assignment's statistics; the balanced one with its Sinkhorn solve."""
    summaries = {name: tally.summary() for name, tally in result.tallies.items()}
    summaries["balanced"]["sinkhorn"] = {
        "epsilon": scaling.epsilon,
        "iterations": scaling.passes,
        "passes_over_embeddings": scaling.data_passes,  # the progress line's count
        "converged": scaling.converged,
        "tolerance": options.sinkhorn_tolerance,
        "max_marginal_error": result.mass_error,
    }
    return summaries


#: The summary's top-level numbers: those of the ``--assignment`` (both are reported in full).
_HEADLINE = (
    "prototypes_used",
    "empty_prototypes",
    "entropy",
    "entropy_ratio",
    "largest_over_median",
    "gini",
    "nmi",
    "ari",
    "purity",
    "accuracy",
)


def _cluster_entries(
    result: PassResult, similarity: stats.PrototypeSimilarity, images: Any, primary: str
) -> list[dict[str, Any]]:
    """``clusters.json``'s entry of every prototype."""
    tallies = result.tallies
    names = images.label_names
    entries = []
    for p in range(len(tallies[primary].sizes)):
        members = result.top.items(p)
        entry: dict[str, Any] = {
            "prototype": p,
            "size_argmax": int(tallies["argmax"].sizes[p]),
            "size_balanced": int(tallies["balanced"].sizes[p]),
            "mean_confidence_argmax": mean_confidence(tallies["argmax"], p),
            "mean_confidence_balanced": mean_confidence(tallies["balanced"], p),
            "most_confident": [{"path": str(images.paths[i]), "confidence": round(c, 6)} for i, c in members],
            "nearest_prototype": int(similarity.nearest[p]),
            "nearest_cosine": float(similarity.nearest_cosine[p]),
        }
        table = tallies[primary].table
        if table is not None and names:
            column = table[:, p]
            entry["labels"] = {
                names[c]: int(column[c]) for c in np.argsort(-column, kind="stable") if column[c]
            }
        entries.append(entry)
    return entries


def _write_label_table(path: Path, tallies: dict[str, Tally], names: list[str]) -> None:
    """The label x prototype counts of both assignments, one block each."""
    k = len(tallies["argmax"].sizes)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    for assignment in ASSIGNMENTS:
        table = tallies[assignment].table
        assert table is not None
        writer.writerow([f"label \\ prototype ({assignment})", *range(k)])
        for c, name in enumerate(names):
            writer.writerow([name, *table[c].tolist()])
    write_text_atomic(path, text.getvalue())


def _draw_grids(
    result: PassResult,
    similarity: stats.PrototypeSimilarity,
    images: Any,
    entries: list[dict[str, Any]],
    out: Path,
    options: InspectOptions,
    progress: StageReporter,
) -> list[dict[str, Any]]:
    """One grid per prototype with members, largest first, at most ``--max-clusters``; returns
    the report's entry of each one drawn."""
    primary = options.assignment
    other = "balanced" if primary == "argmax" else "argmax"
    tallies = result.tallies
    sizes = tallies[primary].sizes
    k = len(sizes)
    names = images.label_names

    def label_of(index: int) -> str:
        return names[images.labels[index]] if names else ""

    order = [int(p) for p in np.lexsort((np.arange(k), -sizes)) if sizes[p] > 0][: options.max_clusters]
    grid_dir = out / "grids"
    if grid_dir.is_dir():
        for stale in grid_dir.glob("prototype-*.png"):
            stale.unlink()
    shown: list[dict[str, Any]] = []
    with progress.stage("grids", len(order), "grids") as advance:
        for p in order:
            top = result.top.items(p)
            confident = [grids.Member(images.paths[i], f"{c:.3f}", label_of(i)) for i, c in top]
            randoms = [grids.Member(images.paths[i], "", label_of(i)) for i in result.sample.items(p)]
            name = f"{folder_name(p, k)}.png"
            title = f"prototype {p}: {int(sizes[p])} images ({primary}), "
            title += f"mean confidence {mean_confidence(tallies[primary], p):.3f}"
            grids.cluster_grid(
                title,
                [("most confident", confident), ("random", randoms)],
                grid_dir / name,
                columns=options.per_cluster,
                thumb=options.thumb,
            )
            label_counts = entries[p].get("labels", {})
            shown.append(
                {
                    "prototype": p,
                    "size": int(sizes[p]),
                    "size_other": int(tallies[other].sizes[p]),
                    "mean_confidence": mean_confidence(tallies[primary], p),
                    "nearest": int(similarity.nearest[p]),
                    "nearest_cosine": float(similarity.nearest_cosine[p]),
                    "grid": f"grids/{name}",
                    "labels": [[label, count] for label, count in list(label_counts.items())[:6]],
                }
            )
            advance()
    return shown
