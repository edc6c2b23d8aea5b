"""The settings tree: one pydantic model per section, every field described, unknown keys refused.

The tree has a schema version (``schema_version``, :data:`SCHEMA_VERSION`); files written by an
older swavctl are brought to it by :mod:`swavctl.config.migrations`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from swavctl.config import method_settings
from swavctl.config.tree import dotted

#: The name of the settings file a run writes into its folder (``swavctl.train.run_dir``).
RESOLVED_NAME = "resolved.toml"


# Bounds on settings that size memory and processes. Settings also arrive inside checkpoints and
# exports (their metadata is not covered by the payload hash), and a file must not be able to make
# an evaluation upscale every image to 3000 px or start hundreds of loader processes.
MAX_CROP_SIZE = 1024
MAX_WORKERS = 256


#: Version of the layout of the settings tree. Bump it with every change after which a file written
#: before would not read as it was meant (a key renamed, moved, removed or given another meaning),
#: and add the step from the previous version to :data:`swavctl.config.migrations.MIGRATIONS`. Adding a
#: key with a default that keeps the old behaviour needs no new version.
SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentSettings(_Strict):
    """Per-crop photometric augmentation (the paper's, in this order).

    Also the multi-crop code's own spec (``swavctl.data.multicrop.AugmentSpec`` is this class), so
    the fields are declared and validated here only.
    """

    flip_prob: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    jitter_prob: float = Field(0.8, ge=0, le=1, description="Probability of applying colour jitter.")
    brightness: float = Field(0.8, ge=0, description="Colour-jitter brightness strength.")
    contrast: float = Field(0.8, ge=0, description="Colour-jitter contrast strength.")
    saturation: float = Field(0.8, ge=0, description="Colour-jitter saturation strength.")
    hue: float = Field(0.2, ge=0, le=0.5, description="Colour-jitter hue strength.")
    grayscale_prob: float = Field(0.2, ge=0, le=1, description="Probability of converting to grayscale.")
    blur_prob: float = Field(0.5, ge=0, le=1, description="Probability of a Gaussian blur.")
    blur_sigma_min: float = Field(0.1, gt=0, description="Smallest blur sigma, in output pixels.")
    blur_sigma_max: float = Field(2.0, gt=0, description="Largest blur sigma, in output pixels.")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Normalisation mean (RGB).")
    std: tuple[float, float, float] = Field(
        (0.228, 0.224, 0.225), description="Normalisation std (RGB); the official code uses 0.228."
    )

    @model_validator(mode="after")
    def _sigma_order(self) -> AugmentSettings:
        if self.blur_sigma_min > self.blur_sigma_max:
            raise ValueError("blur_sigma_min must not exceed blur_sigma_max")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std entries must be positive, got {list(self.std)}")
        return self


class DataSettings(_Strict):
    """Where images come from and how the multi-crop views are made."""

    path: str | None = Field(
        None, description="Image folder to pretrain on ('demo' = built-in digits); train/ is used if present."
    )
    crop_counts: list[int] = Field([2, 6], description="Number of crops of each size, high resolution first.")
    crop_sizes: list[int] = Field([224, 96], description="Side in pixels of each crop group.")
    min_scales: list[float] = Field([0.14, 0.05], description="Smallest area fraction of each crop group.")
    max_scales: list[float] = Field([1.0, 0.14], description="Largest area fraction of each crop group.")
    augment: AugmentSettings = Field(default_factory=AugmentSettings, description="Photometric augmentation.")
    augment_on: Literal["workers", "device"] = Field(
        "workers",
        description="Where crops are made: per image in loader workers, or batched on the training device.",
    )
    workers: int = Field(
        4, ge=0, le=MAX_WORKERS, description="DataLoader worker processes per training process."
    )
    prefetch: int | None = Field(
        None,
        ge=0,
        le=8,
        description="Batches made ready ahead of the step by a background thread (decoded, augmented or "
        "copied to the device, on a side CUDA stream); 0 = in the loop, one at a time (default: 1 on a "
        "GPU, 0 on the CPU, where the thread competes with the step for the cores).",
    )
    on_bad_image: Literal["skip", "error"] = Field(
        "skip", description="Unreadable image files: skip and count them, or stop at the first."
    )
    max_images: int | None = Field(None, ge=1, description="Use only the first N images (sorted paths).")

    @model_validator(mode="after")
    def _crop_lists(self) -> DataSettings:
        lengths = {len(self.crop_counts), len(self.crop_sizes), len(self.min_scales), len(self.max_scales)}
        if len(lengths) != 1:
            raise ValueError("crop_counts, crop_sizes, min_scales and max_scales must have the same length")
        if not self.crop_counts or any(c < 1 for c in self.crop_counts):
            raise ValueError("crop_counts must be positive")
        if any(not 1 <= s <= MAX_CROP_SIZE for s in self.crop_sizes):
            raise ValueError(f"crop_sizes must be between 1 and {MAX_CROP_SIZE} pixels")
        for lo, hi in zip(self.min_scales, self.max_scales, strict=True):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got ({lo}, {hi})")
        return self

    @property
    def total_crops(self) -> int:
        return sum(self.crop_counts)


_PROTOTYPE_COUNT: TypeAdapter[int] = TypeAdapter(Annotated[int, Field(ge=2)])


def _prototype_count(value: Any, where: str) -> int:
    """One set's K, validated as a plain ``int`` field with ``ge=2`` would be."""
    try:
        return _PROTOTYPE_COUNT.validate_python(value)
    except ValidationError as exc:
        raise PydanticCustomError("prototype_sets", where + exc.errors()[0]["msg"]) from None


class ModelSettings(_Strict):
    """Backbone, projection head and prototypes."""

    arch: str = Field(
        "resnet50",
        description="Backbone: resnet18/34/50, resnet50w2/w4/w5, a '-small' stem variant, or convnet-tiny.",
    )
    hidden_dim: int = Field(2048, ge=0, description="Projection-head hidden width (0 = one linear layer).")
    embedding_dim: int = Field(128, ge=1, description="Dimension of the L2-normalised embedding z.")
    prototypes: int | list[int] = Field(
        3000,
        description="Number of prototypes K, or a list of prototype-set sizes [K_0, K_1, ...] (several "
        "sets, as DeepCluster-v2 and SeLa-v2 use: [3000, 3000, 3000]); each at least 2, and a list of one "
        "is that one set. SwAV trains one set (a list is refused under method 'swav'); models with several "
        "sets load, export and inspect whatever their method.",
    )
    init: str | None = Field(
        None,
        description="Weights a new run starts from (--init): a swavctl run folder, checkpoint or export, an "
        "official SwAV checkpoint (.pth.tar) or a torchvision state dict; recorded as the file read. "
        "Without --arch the backbone is the file's; read when a run starts, never when it resumes.",
    )
    init_sha256: str | None = Field(
        None,
        description="SHA-256 of the model.init file, recorded when the run is set up; a run that starts "
        "from a file that no longer has it is refused.",
    )

    @field_validator("prototypes", mode="before")
    @classmethod
    def _prototype_sets(cls, value: Any) -> int | list[int]:
        """K, or a list of set sizes, each an integer >= 2; a list of one is that set's K, so the
        model's layout (``prototypes.weight``, or ``prototypes.h.weight`` for several sets)
        follows the number of sets alone."""
        if not isinstance(value, list | tuple):
            return _prototype_count(value, "")
        if not value:
            raise PydanticCustomError("prototype_sets", "a list of prototype sets needs at least one size")
        sizes = [_prototype_count(k, f"set {h}: ") for h, k in enumerate(value)]
        return sizes[0] if len(sizes) == 1 else sizes


class SwavSettings(_Strict):
    """The swapped-prediction objective and its codes."""

    temperature: float = Field(0.1, gt=0, description="Softmax temperature tau of the predictions.")
    epsilon: float = Field(0.05, gt=0, description="Sinkhorn entropy regularisation.")
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations.")
    assignment_crops: list[int] = Field([0, 1], description="Indices of the crops whose codes are targets.")
    freeze_prototypes_steps: int = Field(
        313, ge=0, description="Steps during which prototype gradients are dropped (set to None)."
    )
    queue_length: int = Field(0, ge=0, description="Global queue length (0 = no queue); split over ranks.")
    queue_start_epoch: int = Field(15, ge=0, description="Epoch at which the queue starts filling.")


class DeepClusterSettings(_Strict):
    """DeepCluster-v2's own settings (``method = "deepcluster-v2"``; docs/methods.md)."""

    kmeans_iterations: int = Field(
        10,
        ge=1,
        description="Spherical k-means rounds (E-step, all-reduced M-step) over the memory bank at each "
        "epoch start, one final E-step after them (official: 10).",
    )


class SelaSettings(_Strict):
    """SeLa-v2's own settings (``method = "sela-v2"``): the offline Sinkhorn-Knopp over the bank."""

    epsilon: float = Field(
        0.004,
        gt=0,
        description="Entropy regularisation of the offline Sinkhorn-Knopp on the bank's scores "
        "(P = exp(score / epsilon)); epsilon = swav.temperature / lambda, so SeLa's lambda = 25 at "
        "tau = 0.1 is 0.004 (solved in float64, in the log domain where needed).",
    )
    tolerance: float = Field(
        0.1,
        ge=0,
        description="Stop when sum_i |c_i / c_new,i - 1| is at most this (SeLa's rule and value: 0.1).",
    )
    check_every: int = Field(
        10, ge=1, description="Check the stopping rule every this many iterations (SeLa: 10)."
    )
    max_iterations: int = Field(
        1000, ge=1, description="Stop the offline Sinkhorn-Knopp after this many iterations at most."
    )


class OptimSettings(_Strict):
    """SGD + LARC and the learning-rate schedule."""

    base_lr: float = Field(4.8, gt=0, description="Peak learning rate after warmup.")
    final_lr: float = Field(0.0048, ge=0, description="Learning rate at the end of the cosine decay.")
    warmup_epochs: float = Field(10, ge=0, description="Epochs of linear warmup (per-iteration).")
    start_warmup_lr: float = Field(0.3, ge=0, description="Learning rate at the start of the warmup.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-6, ge=0, description="Weight decay.")
    lars: bool = Field(True, description="Wrap SGD in LARC (layer-wise adaptive rate).")
    lars_trust: float = Field(0.001, gt=0, description="LARC trust coefficient.")
    lars_clip: bool = Field(False, description="LARC clipping mode (official: off).")
    lars_exclude_bias_norm: bool = Field(
        False, description="Exclude biases and norm weights (1-D params) from LARC and weight decay."
    )


class TrainSettings(_Strict):
    """Length, batch, precision and seed of the run."""

    epochs: int = Field(800, ge=1, description="Number of epochs.")
    batch_size: int = Field(
        64, ge=1, description="Images per device (the global batch is this x world size)."
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps in total.")
    max_seconds: float | None = Field(
        None, gt=0, description="Stop (with a checkpoint) after this much wall time in this process."
    )
    seed: int = Field(31, description="Seed for initialisation, shuffling and augmentation.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast precision: auto = bf16 on a GPU, fp32 on a CPU; bf16 on a CPU runs oneDNN's "
        "bf16 kernels (fast on CPUs with AMX; the automatic recipe picks it there); fp16 needs a GPU.",
    )
    channels_last: bool = Field(
        True,
        description="Model and crops in the channels_last memory format (NHWC): tensor-core "
        "convolutions on GPUs, vectorised convolutions and pooling on CPUs.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model (inductor; the first steps compile; for GPUs, runs on CPUs).",
    )
    log_every: int = Field(1, ge=1, description="Steps between metrics lines.")
    profile_steps: int = Field(
        0,
        ge=0,
        description="Profile this many steps (after 3 warm-up steps) with torch.profiler into OUT/profile/ "
        "(phases.txt, ops.txt, trace.json); 0 = off.",
    )


class CheckpointSettings(_Strict):
    """When checkpoints are written and how many are kept."""

    every_steps: int = Field(
        500, ge=1, description="Steps between checkpoints (one is also written per epoch)."
    )
    keep: int = Field(3, ge=1, description="Number of committed checkpoints to keep.")


class DistSettings(_Strict):
    """Devices and processes."""

    gpus: int | None = Field(None, ge=0, description="GPUs to use (None = 1 if CUDA is available, else 0).")
    procs: int = Field(1, ge=1, description="CPU worker processes when gpus is 0 (gloo on 127.0.0.1).")
    sync_batchnorm: bool = Field(True, description="Use SyncBatchNorm with more than one process.")
    sync_batchnorm_group: int = Field(
        0,
        ge=0,
        description="Processes per SyncBatchNorm group, of consecutive ranks (0, or at least the "
        "process count, = all; otherwise it must divide the process count). The official 800-epoch "
        "run normalised over groups of 8 GPUs.",
    )
    timeout_s: float = Field(1800, gt=0, description="Process-group timeout in seconds.")


class HealthSettings(_Strict):
    """Collapse detection."""

    collapse_tolerance: float = Field(
        0.01, ge=0, description="Warn when loss stays within this fraction of ln K after warmup."
    )
    collapse_patience: int = Field(50, ge=1, description="Steps the loss must stay near ln K before warning.")


class MonitorSettings(_Strict):
    """Evaluation during pretraining: a k-NN top-1 of the backbone as it trains."""

    knn_data: str | None = Field(
        None,
        description="Labelled folder (DIR/train + DIR/val, or DIR/<class>/*) for a k-NN top-1 during "
        "pretraining, as eval-linear --mode knn computes it; 'demo' for the demo digits; None = off.",
    )
    knn_every_epochs: int = Field(
        1, ge=1, description="Epochs between k-NN evaluations (one also runs at the end of the run)."
    )
    knn_k: int = Field(20, ge=1, description="Neighbours of the k-NN vote.")


class LogSettings(_Strict):
    """Logs besides metrics.jsonl."""

    tensorboard: bool = Field(
        False,
        description="Also write metrics.jsonl's scalars and the k-NN readings as TensorBoard events "
        "in RUN/tb/ (needs the tensorboard package: pip install 'swavctl[tensorboard]').",
    )


class Settings(_Strict):
    """All settings of a pretraining run."""

    schema_version: int = Field(
        SCHEMA_VERSION,
        ge=SCHEMA_VERSION,
        le=SCHEMA_VERSION,
        description="Version of this settings layout; files of older versions are migrated when read.",
    )
    preset: str | None = Field(
        None,
        description="Preset the run started from (informational); 'auto' = the recipe pretrain --data "
        "chose from the data and devices without --preset.",
    )
    method: str = Field(
        "swav",
        description="Training method: 'swav' (online codes, Sec. 3), 'deepcluster-v2' (k-means over a "
        "memory bank, Sec. 5.1) or 'sela-v2' (offline Sinkhorn over a memory bank, App. D); see "
        "docs/methods.md. Settings of another method are refused.",
    )
    out: str | None = Field(
        None,
        description="Output folder (default: a new folder under runs/); not written to resolved.toml, "
        "checkpoints or exports, so a resolved.toml passed to --preset starts a new run.",
    )
    data: DataSettings = Field(default_factory=DataSettings, description="Data and multi-crop.")
    model: ModelSettings = Field(default_factory=ModelSettings, description="Model.")
    swav: SwavSettings = Field(
        default_factory=SwavSettings,
        description="SwAV objective (temperature and assignment_crops are every method's).",
    )
    deepcluster: DeepClusterSettings = Field(
        default_factory=DeepClusterSettings, description="DeepCluster-v2's k-means."
    )
    sela: SelaSettings = Field(default_factory=SelaSettings, description="SeLa-v2's offline Sinkhorn-Knopp.")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="Optimizer and schedule.")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Training length and precision.")
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings, description="Checkpoints.")
    dist: DistSettings = Field(default_factory=DistSettings, description="Devices and processes.")
    health: HealthSettings = Field(default_factory=HealthSettings, description="Health checks.")
    monitor: MonitorSettings = Field(
        default_factory=MonitorSettings, description="Evaluation during pretraining."
    )
    log: LogSettings = Field(default_factory=LogSettings, description="Logs besides metrics.jsonl.")

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, value: Any) -> str:
        if value not in method_settings.METHODS:
            raise PydanticCustomError("method", method_settings.unknown_method_message(value))
        return str(value)

    @model_validator(mode="after")
    def _method_settings(self) -> Settings:
        """Refuse a value other than the default for a setting the method does not use (the source
        a value came from is named earlier, by :func:`resolve`)."""
        flat = dotted(self.model_dump(mode="json"))
        for key, reason in method_settings_in_use(self.method, flat, prototype_sets=False).items():
            raise ValueError(f"{key} does not apply to method '{self.method}': {reason}")
        return self

    @model_validator(mode="after")
    def _assignment_crops(self) -> Settings:
        total = self.data.total_crops
        bad = [i for i in self.swav.assignment_crops if not 0 <= i < total]
        if bad or not self.swav.assignment_crops:
            raise ValueError(f"swav.assignment_crops must name crops in 0..{total - 1}, got {bad or '[]'}")
        if len(set(self.swav.assignment_crops)) != len(self.swav.assignment_crops):
            raise ValueError("swav.assignment_crops has duplicates")
        if total < 2:
            raise ValueError("the swapped prediction needs at least two crops in total")
        return self


_DEFAULTS: dict[str, Any] = {}


def setting_defaults() -> dict[str, Any]:
    """Every setting's default, by dotted key (JSON values)."""
    if not _DEFAULTS:
        _DEFAULTS.update(dotted(Settings.model_construct().model_dump(mode="json")))
    return _DEFAULTS


def method_settings_in_use(
    method: str, flat: Mapping[str, Any], *, all_keys: bool = False, prototype_sets: bool = True
) -> dict[str, str]:
    """The dotted keys of ``flat`` that do not apply to ``method``, with why.

    Only values other than the default count, unless ``all_keys`` (a flag or ``--set`` that names
    such a setting is refused whatever its value). With ``prototype_sets``, a list of prototype
    sets counts for SwAV (the settings tree itself accepts one: a model imported with several sets
    loads, exports and inspects; training it is what is refused).
    """
    defaults = setting_defaults()
    found: dict[str, str] = {}
    for key, value in flat.items():
        reason = method_settings.inapplicable_reason(method, key)
        if reason is not None and (all_keys or value != defaults.get(key, value)):
            found[key] = reason
    prototypes = flat.get("model.prototypes")
    if (
        prototype_sets
        and method == method_settings.SWAV
        and isinstance(prototypes, list)
        and len(prototypes) > 1
    ):
        found["model.prototypes"] = method_settings.SWAV_ONE_SET
    return found
