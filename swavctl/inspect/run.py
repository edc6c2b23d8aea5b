"""``inspect_clusters``: the whole inspection, streaming, with bounded memory.

1. **extract**: one pass of the model over the images; embeddings z go to a disk-backed store
   (unreadable files are skipped and counted).
2. **balance**: streaming Sinkhorn passes over the stored embeddings (:mod:`.assign`).
3. **assign**: one more pass computes, per image, the argmax prototype with its softmax
   probability and the top 3, and the balanced prototype; it writes ``assignments.csv`` row by
   row and keeps only per-prototype counts, the label x cluster tables, a top-N heap and a
   reservoir per prototype.
4. **report**: statistics, ``clusters.json``, ``summary.json``, grids, the size chart and
   ``index.html`` (:mod:`.outputs`); ``--sort-into`` places every image in a folder per prototype
   (during the assign pass).

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swavctl.distributed.device import pick_devices
from swavctl.errors import UserError
from swavctl.files.atomic import atomic_file
from swavctl.inspect import assign, sources, stats
from swavctl.inspect.embeddings import EmbeddingStore
from swavctl.inspect.extract import Embedder, EvalView, iter_embeddings
from swavctl.inspect.options import ASSIGNMENTS, InspectOptions
from swavctl.inspect.outputs import write_outputs
from swavctl.inspect.sort_into import Sorter
from swavctl.inspect.sources import DEFAULT_MODEL, EMBEDDINGS_FILE, default_out, prepare_out, resolve_images
from swavctl.inspect.tally import PassResult, Tally
from swavctl.inspect.topn import Reservoir, TopN
from swavctl.reporting.progress import QuietStages, StageReporter


def inspect_clusters(options: InspectOptions, progress: StageReporter | None = None) -> dict[str, Any]:
    """Run the inspection; returns the summary (also written to ``OUT/summary.json``)."""
    from swavctl.weights.model_io import load_model

    started = time.perf_counter()
    progress = progress or QuietStages()
    loaded = load_model(options.model or DEFAULT_MODEL, warn=progress.warn)
    if not loaded.has_head:
        raise UserError(
            f"{loaded.source} holds no projection head or prototypes (a backbone-only export); "
            "pass the run folder or a checkpoint, or export with 'swavctl export --with-head'"
        )
    settings = loaded.settings
    layer = sources.prototype_layer(loaded, options.prototype_set)
    devices = pick_devices(options.gpus, in_this_process=True)
    images = resolve_images(options.data, split=options.split, loaded=loaded, max_images=options.max_images)
    if images.note:
        progress.warn(images.note)
    out = prepare_out(options.out or default_out(loaded, options.prototype_set))
    k = layer.weight.shape[0]
    # Checked (and prepared) before the expensive passes, so a bad folder fails at once.
    sorter = Sorter(options.sort_into, k, copy=options.copy_files) if options.sort_into is not None else None
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
    return write_outputs(
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
) -> PassResult:
    k = weight.shape[0]
    num_labels = len(images.label_names) if images.label_names else 0
    all_labels = np.asarray(images.labels, dtype=np.int64) if images.labels is not None else None
    tallies = {name: Tally(k, num_labels) for name in ASSIGNMENTS}
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
    return PassResult(tallies, top, sample, mass_error, sorter.placed if sorter else 0)
