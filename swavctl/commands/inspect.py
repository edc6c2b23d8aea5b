"""``swavctl inspect-clusters`` (alias ``cluster-inspect``): its options are the fields of
:class:`swavctl.inspect.options.InspectOptions`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from swavctl.commands.common import JsonOpt, err, fail
from swavctl.commands.from_options import Flag, given, parameter, takes_options
from swavctl.errors import UserError
from swavctl.errors.messages import DEFAULT_MODEL
from swavctl.files.latest import follow
from swavctl.inspect.options import InspectOptions

#: How each option is spelled, in the order of ``--help``.
FLAGS = {
    "model": Flag(),
    "data": Flag("--data", "DIR"),
    "split": Flag("--split", "auto|val|train|none"),
    "out": Flag("--out", "DIR"),
    "assignment": Flag("--assignment", "argmax|balanced"),
    "per_cluster": Flag("--per-cluster", "N"),
    "max_clusters": Flag("--max-clusters", "N"),
    "duplicate_threshold": Flag("--duplicate-threshold", "COS"),
    "temperature": Flag("--temperature", "T"),
    "epsilon": Flag("--epsilon", "E"),
    "sinkhorn_iterations": Flag("--sinkhorn-iterations", "N"),
    "sinkhorn_tolerance": Flag("--sinkhorn-tolerance", "TOL"),
    "sort_into": Flag("--sort-into", "DIR"),
    "copy_files": Flag("--copy"),
    "batch_size": Flag("--batch-size", "N"),
    "workers": Flag("--workers", "N"),
    "image_size": Flag("--image-size", "PX"),
    "max_images": Flag("--max-images", "N"),
    "gpus": Flag("--gpus", "N"),
    "seed": Flag("--seed", "N"),
    "prototype_set": Flag("--prototype-set", "N"),
}


@takes_options(InspectOptions, FLAGS, library_only=["thumb"], extra=[parameter("as_json", JsonOpt, False)])
def inspect_clusters_command(**values: Any) -> None:
    """Prototype assignments, cluster health and browsable pictures (alias: cluster-inspect)."""
    from swavctl.errors.messages import check_output_folder
    from swavctl.weights.containers import check_model_file

    # Paths through runs/latest (a pointer file) read as the run folder it names.
    model: Path = follow(values["model"] or DEFAULT_MODEL)
    out: Path | None = None if values["out"] is None else follow(values["out"])
    try:
        # A missing or malformed MODEL is refused before torch and torchvision are imported.
        check_model_file(model)
        if out is not None:
            check_output_folder(out)
        if values["sort_into"] is not None:
            check_output_folder(values["sort_into"], "--sort-into")
        options = InspectOptions(**{**given(values, FLAGS), "model": model, "out": out})
        from swavctl.inspect.run import inspect_clusters
        from swavctl.reporting.progress import StageProgress

        summary = inspect_clusters(options, StageProgress(err))
    except UserError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if values["as_json"]:
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
