"""``swavctl inspect-clusters`` (alias ``cluster-inspect``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from swavctl.commands.common import JsonOpt, err, fail
from swavctl.errors import UserError
from swavctl.errors.messages import DEFAULT_MODEL
from swavctl.files.latest import follow


def inspect_clusters_command(
    model: Annotated[
        Path | None,
        typer.Argument(
            help="Run folder, checkpoint, or export with head and prototypes (default: runs/latest).",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            metavar="DIR",
            help="Image folder or 'demo' (default: the data the model was trained on; a model that "
            "records none needs --data).",
        ),
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            "--split",
            metavar="auto|val|train|none",
            help="Subfolder of DATA to read; auto = val/ if present, else train/, else DATA itself.",
        ),
    ] = "auto",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Output folder (default: <run folder>/clusters; clusters-setN with --prototype-set N > 0).",
        ),
    ] = None,
    assignment: Annotated[
        str,
        typer.Option(
            "--assignment",
            metavar="argmax|balanced",
            help="Assignment behind grids, --sort-into and the top-level numbers (both are reported).",
        ),
    ] = "argmax",
    per_cluster: Annotated[
        int,
        typer.Option(
            "--per-cluster", metavar="N", help="Most confident and random members per grid (N each)."
        ),
    ] = 8,
    max_clusters: Annotated[
        int,
        typer.Option(
            "--max-clusters", metavar="N", help="Draw grids for at most N prototypes, largest first."
        ),
    ] = 100,
    duplicate_threshold: Annotated[
        float,
        typer.Option(
            "--duplicate-threshold",
            metavar="COS",
            help="Prototype pairs above this cosine are near-duplicates.",
        ),
    ] = 0.95,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            metavar="T",
            help="Softmax temperature of the confidences (default: swav.temperature).",
        ),
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option(
            "--epsilon",
            metavar="E",
            help="Sinkhorn epsilon of the balanced assignment (default: swav.epsilon).",
        ),
    ] = None,
    sinkhorn_iterations: Annotated[
        int, typer.Option("--sinkhorn-iterations", metavar="N", help="Most passes of the balanced Sinkhorn.")
    ] = 500,
    sinkhorn_tolerance: Annotated[
        float,
        typer.Option(
            "--sinkhorn-tolerance",
            metavar="TOL",
            help="Stop when every prototype's mass is within TOL of 1/K (relative).",
        ),
    ] = 0.01,
    sort_into: Annotated[
        Path | None,
        typer.Option("--sort-into", metavar="DIR", help="Link every image into DIR/prototype-NNNN/ folders."),
    ] = None,
    copy: Annotated[
        bool, typer.Option("--copy", help="With --sort-into: copy the files instead of linking.")
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", metavar="N", help="Images per forward pass.")
    ] = 256,
    workers: Annotated[
        int | None,
        typer.Option("--workers", metavar="N", help="Image decoding processes (default: data.workers)."),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", metavar="PX", help="Side of the centred view (default: data.crop_sizes[0])."
        ),
    ] = None,
    max_images: Annotated[
        int | None, typer.Option("--max-images", metavar="N", help="Only the first N images (sorted paths).")
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus", metavar="N", help="GPUs to embed on (default: 1 if CUDA is available; 0 = CPU)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", metavar="N", help="Seed of the random members in the grids.")
    ] = 0,
    prototype_set: Annotated[
        int,
        typer.Option(
            "--prototype-set",
            metavar="N",
            help="Prototype set to inspect, of a model with several (DeepCluster-v2, SeLa-v2); 0 is the "
            "only set of a SwAV model.",
        ),
    ] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Prototype assignments, cluster health and browsable pictures (alias: cluster-inspect)."""
    from swavctl.errors.messages import check_output_folder
    from swavctl.weights.containers import check_model_file

    # Paths through runs/latest (a pointer file) read as the run folder it names.
    model, out = follow(model or DEFAULT_MODEL), (None if out is None else follow(out))
    if copy and sort_into is None:
        raise fail("--copy needs --sort-into DIR")
    try:
        # A missing or malformed MODEL is refused before torch and torchvision are imported.
        check_model_file(model)
        if out is not None:
            check_output_folder(out)
        if sort_into is not None:
            check_output_folder(sort_into, "--sort-into")
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    from swavctl.inspect.run import InspectOptions, inspect_clusters
    from swavctl.reporting.progress import StageProgress

    options = InspectOptions(
        model=model,
        data=data,
        split=split,
        out=out,
        assignment=assignment,
        per_cluster=per_cluster,
        max_clusters=max_clusters,
        duplicate_threshold=duplicate_threshold,
        temperature=temperature,
        epsilon=epsilon,
        sinkhorn_iterations=sinkhorn_iterations,
        sinkhorn_tolerance=sinkhorn_tolerance,
        batch_size=batch_size,
        workers=workers,
        gpus=gpus,
        image_size=image_size,
        max_images=max_images,
        prototype_set=prototype_set,
        sort_into=sort_into,
        copy=copy,
        seed=seed,
    )
    try:
        summary = inspect_clusters(options, StageProgress(err))
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if as_json:
        print(json.dumps(summary))
    else:
        err.print(_human(summary), markup=False)


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _human(s: dict[str, Any]) -> str:
    a = s["assignment"]
    sets = s["prototype_sets"]
    which = f" (prototype set {s['prototype_set']} of {sets})" if sets > 1 else ""
    lines = [
        f"{s['n_images']} images ({s['skipped_images']} unreadable skipped), "
        f"K = {s['num_prototypes']} prototypes{which}",
        f"{a}: {s['prototypes_used']} prototypes used, {s['empty_prototypes']} empty, entropy/ln K "
        f"{_num(s['entropy_ratio'])}, largest/median {_num(s['largest_over_median'], 2)}, "
        f"Gini {_num(s['gini'])}",
    ]
    if s["nmi"] is not None:
        for name in ("argmax", "balanced"):
            m = s[name]
            lines.append(
                f"{name:>8} vs labels: NMI {_num(m['nmi'])}  ARI {_num(m['ari'])}  "
                f"purity {_num(m['purity'])}  accuracy {_num(m['accuracy'])}"
            )
    dups = s["near_duplicates"]
    lines.append(f"near-duplicate prototype pairs (cos > {s['duplicate_threshold']}): {len(dups)}")
    if s["sort_into"]:
        lines.append(f"sorted {s['sorted_images']} images into {s['sort_into']}")
    lines.append(f"report: {s['report']}")
    return "\n".join(lines)
