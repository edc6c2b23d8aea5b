"""``inspect_clusters``: the whole inspection, streaming, with bounded memory.

1. **extract**: one pass of the model over the images; embeddings z go to a disk-backed store
   (unreadable files are skipped and counted).
2. **balance**: streaming Sinkhorn passes over the stored embeddings (:mod:`.assign`).
3. **assign**: one more pass computes, per image, the argmax prototype with its softmax
   probability and the top 3, and the balanced prototype; it writes ``assignments.csv`` row by
   row and keeps only per-prototype counts, the label x cluster tables, a top-N heap and a
   reservoir per prototype.
4. **report**: statistics, ``clusters.json``, ``summary.json``, grids, the size chart and
   ``index.html``; ``--sort-into`` places every image in a folder per prototype.

Memory grows with K (and C x K for the label tables) and with one chunk of images, not with the
dataset, apart from one path and one small integer per image.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swavctl.errors import UserError
from swavctl.files.atomic import atomic_file, write_json_atomic, write_text_atomic
from swavctl.inspect import assign, grids, metrics, report, sources, stats
from swavctl.inspect.embeddings import EmbeddingStore
from swavctl.inspect.extract import Embedder, EvalView, iter_embeddings, pick_devices
from swavctl.inspect.sort_into import Sorter, folder_name
from swavctl.inspect.sources import DEFAULT_MODEL, EMBEDDINGS_FILE, default_out, prepare_out, resolve_images
from swavctl.inspect.topn import Reservoir, TopN
from swavctl.reporting.progress import QuietStages, StageReporter

ASSIGNMENTS = ("argmax", "balanced")


@dataclass
class InspectOptions:
    """Everything ``swavctl inspect-clusters`` can be told; None means "from the model's settings"."""

    model: Path | None = None
    data: str | None = None
    split: str = "auto"
    out: Path | None = None
    assignment: str = "argmax"  # which assignment drives grids, --sort-into and the top-level numbers
    per_cluster: int = 8  # N most confident + N random members per grid
    max_clusters: int = 100
    duplicate_threshold: float = 0.95
    temperature: float | None = None  # softmax temperature of the confidences (default swav.temperature)
    epsilon: float | None = None  # balanced Sinkhorn epsilon (default swav.epsilon)
    sinkhorn_iterations: int = 500
    sinkhorn_tolerance: float = 0.01
    batch_size: int = 256
    workers: int | None = None
    gpus: int | None = None
    image_size: int | None = None  # default data.crop_sizes[0]
    max_images: int | None = None
    prototype_set: int = 0  # which set of a model with several (DeepCluster-v2, SeLa-v2)
    sort_into: Path | None = None
    copy: bool = False
    thumb: int = 64
    seed: int = 0


@dataclass
class _Tally:
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


def _check_options(options: InspectOptions) -> None:
    if options.assignment not in ASSIGNMENTS:
        raise UserError(f"--assignment must be argmax or balanced, got '{options.assignment}'")
    checks = [
        (options.per_cluster >= 1, "--per-cluster must be at least 1"),
        (options.max_clusters >= 0, "--max-clusters must be 0 or more"),
        (-1.0 <= options.duplicate_threshold <= 1.0, "--duplicate-threshold must lie in [-1, 1]"),
        (options.temperature is None or options.temperature > 0, "--temperature must be positive"),
        (options.epsilon is None or options.epsilon > 0, "--epsilon must be positive"),
        (options.sinkhorn_iterations >= 1, "--sinkhorn-iterations must be at least 1"),
        (options.sinkhorn_tolerance >= 0, "--sinkhorn-tolerance must be 0 or more"),
        (options.batch_size >= 1, "--batch-size must be at least 1"),
        (options.workers is None or options.workers >= 0, "--workers must be 0 or more"),
        (options.image_size is None or options.image_size >= 1, "--image-size must be at least 1"),
        (options.max_images is None or options.max_images >= 1, "--max-images must be at least 1"),
        (options.prototype_set >= 0, "--prototype-set must be 0 or more"),
        (16 <= options.thumb <= 512, "--thumb must lie in 16..512"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def inspect_clusters(options: InspectOptions, progress: StageReporter | None = None) -> dict[str, Any]:
    """Run the inspection; returns the summary (also written to ``OUT/summary.json``)."""
    from swavctl.weights.model_io import load_model

    started = time.perf_counter()
    _check_options(options)
    progress = progress or QuietStages()
    loaded = load_model(options.model or DEFAULT_MODEL, warn=progress.warn)
    if not loaded.has_head:
        raise UserError(
            f"{loaded.source} holds no projection head or prototypes (a backbone-only export); "
            "pass the run folder or a checkpoint, or export with 'swavctl export --with-head'"
        )
    settings = loaded.settings
    layer = sources.prototype_layer(loaded, options.prototype_set)
    devices = pick_devices(options.gpus)
    images = resolve_images(options.data, split=options.split, loaded=loaded, max_images=options.max_images)
    if images.note:
        progress.warn(images.note)
    out = prepare_out(options.out or default_out(loaded, options.prototype_set))
    k = layer.weight.shape[0]
    # Checked (and prepared) before the expensive passes, so a bad folder fails at once.
    sorter = Sorter(options.sort_into, k, copy=options.copy) if options.sort_into is not None else None
    temperature = options.temperature or settings.swav.temperature
    epsilon = options.epsilon or settings.swav.epsilon
    view = EvalView(
        options.image_size or settings.data.crop_sizes[0],
        settings.data.augment.mean,
        settings.data.augment.std,
    )
    workers = options.workers if options.workers is not None else settings.data.workers
    prototypes = layer.weight.detach().float()
    sets = len(loaded.model.prototype_sets)
    which = f", prototype set {options.prototype_set} of {sets}" if sets > 1 else ""
    progress.info(
        f"model {loaded.source} (K = {k}{which}); {len(images.paths)} images under {images.folder}"
        + (f", {len(images.label_names)} labels" if images.label_names else ", no labels")
        + f"; writing to {out}"
    )

    store = EmbeddingStore(out / f".{EMBEDDINGS_FILE}.tmp-{os.getpid()}", settings.model.embedding_dim)
    try:
        kept, skipped = _extract(loaded.model, images.paths, view, devices, options, workers, store, progress)
        weight = torch.nn.functional.normalize(prototypes, dim=1).to(devices[0])
        chunk_rows = max(256, min(65536, 2**22 // k))

        def score_chunks() -> Iterator[torch.Tensor]:
            for _, z in store.chunks(chunk_rows):
                yield assign.prototype_scores(z.to(devices[0]), weight)

        with progress.stage("balance", options.sinkhorn_iterations, "passes over the embeddings") as advance:

            def on_pass(n: int, error: float | None) -> None:
                advance(1, "" if error is None else f"mass error {error:.2e}")

            scaling = assign.balance(
                score_chunks,
                epsilon=epsilon,
                iterations=options.sinkhorn_iterations,
                tolerance=options.sinkhorn_tolerance,
                on_pass=on_pass,
            )
        if not scaling.converged and options.sinkhorn_tolerance > 0:
            progress.warn(_not_converged(scaling, options))
        result = _assign_pass(
            store, kept, images, weight, scaling, temperature, options, out, chunk_rows, sorter, progress
        )
    finally:
        store.remove()

    similarity = stats.prototype_similarity(prototypes, threshold=options.duplicate_threshold)
    return _write_outputs(
        result, similarity, scaling, images, loaded, out, options, temperature, skipped, started, progress
    )


def _not_converged(scaling: assign.BalancedScaling, options: InspectOptions) -> str:
    """The warning for a balanced solve that ran out of passes before reaching the tolerance."""
    error = scaling.max_marginal_error
    measured = "" if error is None else f" (a prototype's mass was {100 * error:.2g}% off 1/K)"
    return (
        f"the balanced assignment is not equal-partition within --sinkhorn-tolerance "
        f"{options.sinkhorn_tolerance:g} after {scaling.passes} Sinkhorn passes{measured}; "
        f"raise --sinkhorn-iterations (now {options.sinkhorn_iterations})"
    )


def _extract(
    model: torch.nn.Module,
    paths: list[Path],
    view: EvalView,
    devices: list[torch.device],
    options: InspectOptions,
    workers: int,
    store: EmbeddingStore,
    progress: StageReporter,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Embed every image into ``store``; returns the kept path indices and the skipped (path, reason)."""
    embedder = Embedder(model, devices)  # type: ignore[arg-type]
    kept: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    with progress.stage("extract", len(paths), "images") as advance:
        for batch in iter_embeddings(embedder, paths, view, batch_size=options.batch_size, workers=workers):
            for index, reason in batch.skipped:
                skipped.append((str(paths[index]), reason))
                if len(skipped) <= 5:
                    progress.warn(f"skipped unreadable {paths[index]}: {reason}")
            if batch.indices:
                store.append(batch.embeddings)
                kept.append(np.asarray(batch.indices, dtype=np.int64))
            advance(len(batch.indices) + len(batch.skipped), f"{len(skipped)} skipped" if skipped else "")
    store.finish()
    if store.rows == 0:
        raise UserError(
            f"none of the {len(paths)} image files could be read (first: {skipped[0][0]}: {skipped[0][1]})"
        )
    if len(skipped) > 5:
        progress.warn(f"{len(skipped)} unreadable files skipped in all")
    return np.concatenate(kept), skipped


@dataclass
class _PassResult:
    tallies: dict[str, _Tally]
    top: TopN
    sample: Reservoir
    mass_error: float
    sorted_into: int


def _assign_pass(
    store: EmbeddingStore,
    kept: np.ndarray,
    images: Any,
    weight: torch.Tensor,
    scaling: assign.BalancedScaling,
    temperature: float,
    options: InspectOptions,
    out: Path,
    chunk_rows: int,
    sorter: Sorter | None,
    progress: StageReporter,
) -> _PassResult:
    k = weight.shape[0]
    num_labels = len(images.label_names) if images.label_names else 0
    all_labels = np.asarray(images.labels, dtype=np.int64) if images.labels is not None else None
    tallies = {name: _Tally(k, num_labels) for name in ASSIGNMENTS}
    top, sample = TopN(options.per_cluster), Reservoir(options.per_cluster, seed=options.seed)
    log_mass: torch.Tensor | None = None
    header = ["path", "label", "argmax", "argmax_prob", "top2", "top2_prob", "top3", "top3_prob"]
    header += ["balanced", "balanced_prob"]
    with (
        atomic_file(out / "assignments.csv") as binary,
        progress.stage("assign", store.rows, "images") as advance,
    ):
        handle = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        writer = csv.writer(handle)
        writer.writerow(header)
        for start, z in store.chunks(chunk_rows):
            scores = assign.prototype_scores(z.to(weight.device), weight)
            top_idx, top_prob = assign.top_predictions(scores, temperature=temperature, k=3)
            logits = scaling.logits(scores)
            codes = torch.log_softmax(logits, dim=1)
            part = torch.logsumexp(codes, dim=0).cpu()
            log_mass = part if log_mass is None else torch.logaddexp(log_mass, part)
            best = codes.max(dim=1)
            balanced = best.indices.cpu().numpy()
            balanced_prob = best.values.exp().cpu().numpy()
            top_idx_np, top_prob_np = top_idx.cpu().numpy(), top_prob.cpu().numpy()
            index = kept[start : start + z.shape[0]]
            labels = all_labels[index] if all_labels is not None else None
            argmax, argmax_prob = top_idx_np[:, 0], top_prob_np[:, 0]
            tallies["argmax"].add(argmax, argmax_prob, labels)
            tallies["balanced"].add(balanced, balanced_prob, labels)
            primary, confidence = (
                (argmax, argmax_prob) if options.assignment == "argmax" else (balanced, balanced_prob)
            )
            top.push_many(primary, confidence, index)
            sample.push_many(primary, index)
            for row in range(len(index)):
                path = images.paths[index[row]]
                label = images.label_names[labels[row]] if labels is not None else ""
                line: list[Any] = [str(path), label]
                for j in range(3):
                    if j < top_idx_np.shape[1]:
                        line += [int(top_idx_np[row, j]), f"{top_prob_np[row, j]:.6f}"]
                    else:
                        line += ["", ""]
                line += [int(balanced[row]), f"{balanced_prob[row]:.6f}"]
                writer.writerow(line)
                if sorter is not None:
                    sorter.place(path, path.relative_to(images.folder), int(primary[row]))
            advance(len(index))
        handle.flush()
        handle.detach()  # atomic_file closes the file
    assert log_mass is not None
    # Largest deviation of the soft balanced prototype masses from the even share 1/K.
    mass_error = float((torch.exp(log_mass - math.log(store.rows) + math.log(k)) - 1).abs().max())
    return _PassResult(tallies, top, sample, mass_error, sorter.placed if sorter else 0)


def _write_outputs(
    result: _PassResult,
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
    primary = options.assignment
    other = "balanced" if primary == "argmax" else "argmax"
    tallies = result.tallies
    k = len(tallies[primary].sizes)
    names = images.label_names
    summaries = {name: tally.summary() for name, tally in tallies.items()}
    summaries["balanced"]["sinkhorn"] = {
        "epsilon": scaling.epsilon,
        "iterations": scaling.passes,
        "passes_over_embeddings": scaling.data_passes,  # the progress line's count
        "converged": scaling.converged,
        "tolerance": options.sinkhorn_tolerance,
        "max_marginal_error": result.mass_error,
    }
    top = summaries[primary]
    n_images = int(tallies[primary].sizes.sum())

    def label_of(index: int) -> str | None:
        return names[images.labels[index]] if names else None

    # clusters.json: every prototype.
    entries = []
    for p in range(k):
        members = result.top.items(p)
        entry: dict[str, Any] = {
            "prototype": p,
            "size_argmax": int(tallies["argmax"].sizes[p]),
            "size_balanced": int(tallies["balanced"].sizes[p]),
            "mean_confidence_argmax": _mean(tallies["argmax"], p),
            "mean_confidence_balanced": _mean(tallies["balanced"], p),
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
    head = {"num_prototypes": k, "prototype_set": options.prototype_set, "assignment_for_members": primary}
    write_json_atomic(out / "clusters.json", {**head, "prototypes": entries})
    if names:
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        for assignment in ASSIGNMENTS:
            table = tallies[assignment].table
            assert table is not None
            writer.writerow([f"label \\ prototype ({assignment})", *range(k)])
            for c, name in enumerate(names):
                writer.writerow([name, *table[c].tolist()])
        write_text_atomic(out / "label_cluster_table.csv", text.getvalue())

    # Grids: prototypes with members, largest first, at most --max-clusters.
    sizes = tallies[primary].sizes
    order = [int(p) for p in np.lexsort((np.arange(k), -sizes)) if sizes[p] > 0][: options.max_clusters]
    grid_dir = out / "grids"
    if grid_dir.is_dir():
        for stale in grid_dir.glob("prototype-*.png"):
            stale.unlink()
    shown: list[dict[str, Any]] = []
    with progress.stage("grids", len(order), "grids") as advance:
        for p in order:
            confident = [
                grids.Member(images.paths[i], f"{c:.3f}", label_of(i) or "") for i, c in result.top.items(p)
            ]
            randoms = [grids.Member(images.paths[i], "", label_of(i) or "") for i in result.sample.items(p)]
            name = f"{folder_name(p, k)}.png"
            title = f"prototype {p}: {int(sizes[p])} images ({primary}), "
            title += f"mean confidence {_mean(tallies[primary], p):.3f}"
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
                    "mean_confidence": _mean(tallies[primary], p),
                    "nearest": int(similarity.nearest[p]),
                    "nearest_cosine": float(similarity.nearest_cosine[p]),
                    "grid": f"grids/{name}",
                    "labels": [[label, count] for label, count in list(label_counts.items())[:6]],
                }
            )
            advance()
    grids.size_chart(sizes, out / "sizes.png", assignment=primary)

    summary: dict[str, Any] = {
        "n_images": n_images,
        "skipped_images": len(skipped),
        "num_prototypes": k,
        "prototype_set": options.prototype_set,
        "prototype_sets": len(loaded.model.prototype_sets),
        "assignment": primary,
        "prototypes_used": top["prototypes_used"],
        "empty_prototypes": top["empty_prototypes"],
        "entropy": top["entropy"],
        "entropy_ratio": top["entropy_ratio"],
        "largest_over_median": top["largest_over_median"],
        "gini": top["gini"],
        "nmi": top["nmi"],
        "ari": top["ari"],
        "purity": top["purity"],
        "accuracy": top["accuracy"],
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


def _mean(tally: _Tally, p: int) -> float:
    size = tally.sizes[p]
    return float(tally.confidence[p] / size) if size else 0.0
