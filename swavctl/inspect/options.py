"""What ``swavctl inspect-clusters`` accepts, declared once: each option is one field here.

The field's description is the option's ``--help`` text (the command's parameters are built from
these fields, see :mod:`swavctl.commands.from_options`) and its validators raise
:class:`UserError`. None means "from the model's settings". Free of torch, like the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from swavctl.errors import UserError
from swavctl.eval.options import check

#: The assignments the report shows side by side; ``--assignment`` picks the one that drives the
#: grids, ``--sort-into`` and the top-level numbers.
ASSIGNMENTS = ("argmax", "balanced")


class InspectOptions(BaseModel):
    """Everything ``swavctl inspect-clusters`` can be told; None means "from the model's settings"."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    model: Path | None = Field(
        None, description="Run folder, checkpoint, or export with head and prototypes (default: runs/latest)."
    )
    data: str | None = Field(
        None,
        description="Image folder or 'demo' (default: the data the model was trained on; a model that "
        "records none needs --data).",
    )
    split: str = Field(
        "auto",
        description="Subfolder of DATA to read; auto = val/ if present, else train/, else DATA itself.",
    )
    out: Path | None = Field(
        None,
        description="Output folder (default: <run folder>/clusters; clusters-setN with --prototype-set "
        "N > 0).",
    )
    assignment: Annotated[
        str,
        check(lambda v: v in ASSIGNMENTS, lambda v: f"--assignment must be argmax or balanced, got '{v}'"),
    ] = Field(
        "argmax",
        description="Assignment behind grids, --sort-into and the top-level numbers (both are reported).",
    )
    per_cluster: Annotated[int, check(lambda v: v >= 1, "--per-cluster must be at least 1")] = Field(
        8, description="Most confident and random members per grid (N each)."
    )
    max_clusters: Annotated[int, check(lambda v: v >= 0, "--max-clusters must be 0 or more")] = Field(
        100, description="Draw grids for at most N prototypes, largest first."
    )
    duplicate_threshold: Annotated[
        float, check(lambda v: -1.0 <= v <= 1.0, "--duplicate-threshold must lie in [-1, 1]")
    ] = Field(0.95, description="Prototype pairs above this cosine are near-duplicates.")
    temperature: Annotated[float | None, check(lambda v: v > 0, "--temperature must be positive")] = Field(
        None, description="Softmax temperature of the confidences (default: swav.temperature)."
    )
    epsilon: Annotated[float | None, check(lambda v: v > 0, "--epsilon must be positive")] = Field(
        None, description="Sinkhorn epsilon of the balanced assignment (default: swav.epsilon)."
    )
    sinkhorn_iterations: Annotated[
        int, check(lambda v: v >= 1, "--sinkhorn-iterations must be at least 1")
    ] = Field(500, description="Most passes of the balanced Sinkhorn.")
    sinkhorn_tolerance: Annotated[
        float, check(lambda v: v >= 0, "--sinkhorn-tolerance must be 0 or more")
    ] = Field(0.01, description="Stop when every prototype's mass is within TOL of 1/K (relative).")
    batch_size: Annotated[int, check(lambda v: v >= 1, "--batch-size must be at least 1")] = Field(
        256, description="Images per forward pass."
    )
    workers: Annotated[int | None, check(lambda v: v >= 0, "--workers must be 0 or more")] = Field(
        None, description="Image decoding processes (default: data.workers)."
    )
    gpus: Annotated[int | None, check(lambda v: v >= 0, lambda v: f"--gpus must be 0 or more, got {v}")] = (
        Field(None, description="GPUs to embed on (default: 1 if CUDA is available; 0 = CPU).")
    )
    image_size: Annotated[int | None, check(lambda v: v >= 1, "--image-size must be at least 1")] = Field(
        None, description="Side of the centred view (default: data.crop_sizes[0])."
    )
    max_images: Annotated[int | None, check(lambda v: v >= 1, "--max-images must be at least 1")] = Field(
        None, description="Only the first N images (sorted paths)."
    )
    prototype_set: Annotated[int, check(lambda v: v >= 0, "--prototype-set must be 0 or more")] = Field(
        0,
        description="Prototype set to inspect, of a model with several (DeepCluster-v2, SeLa-v2); 0 is the "
        "only set of a SwAV model.",
    )
    sort_into: Path | None = Field(None, description="Link every image into DIR/prototype-NNNN/ folders.")
    # Named copy_files (``copy`` would hide BaseModel.copy); ``copy=`` and ``--copy`` still set it.
    copy_files: bool = Field(
        False, alias="copy", description="With --sort-into: copy the files instead of linking."
    )
    thumb: Annotated[int, check(lambda v: 16 <= v <= 512, "--thumb must lie in 16..512")] = Field(
        64, description="Side of each grid thumbnail in pixels (Python API only)."
    )
    seed: int = Field(0, description="Seed of the random members in the grids.")

    @model_validator(mode="after")
    def _copy_needs_sort_into(self) -> InspectOptions:
        if self.copy_files and self.sort_into is None:
            raise UserError("--copy needs --sort-into DIR")
        return self
