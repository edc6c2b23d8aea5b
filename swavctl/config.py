"""The settings tree: pydantic models, presets, overrides and ``resolved.toml``.

Settings come from four sources, each overriding the one before:

1. the defaults in these models (the paper's ImageNet recipe, arXiv 2006.09882);
2. a preset, ``--preset NAME|PATH`` (TOML files in ``presets/``);
3. explicit flags (``--data``, ``--epochs``, ...);
4. ``--set a.b=value`` overrides, values parsed as TOML.

Every model forbids unknown keys, so a typo anywhere is refused with the dotted path and the
nearest valid key.

The tree has a schema version (``schema_version``, :data:`SCHEMA_VERSION`). Settings read back from
a file a run or an export wrote (``resolved.toml``, a checkpoint, an export's metadata, a preset)
are first brought to the current version by :func:`migrate`, so runs and exports made by an older
swavctl still resume and load.
"""

from __future__ import annotations

import copy
import difflib
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
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

from swavctl import method_settings
from swavctl.errors import UserError
from swavctl.latest import follow

#: The name of the settings file a run writes into its folder (``swavctl.train.run_dir``).
RESOLVED_NAME = "resolved.toml"

PRESET_DIRS = (
    Path(__file__).resolve().parent / "presets",  # installed copy (package data)
    Path(__file__).resolve().parents[1] / "presets",  # source checkout
)


# Bounds on settings that size memory and processes. Settings also arrive inside checkpoints and
# exports (their metadata is not covered by the payload hash), and a file must not be able to make
# an evaluation upscale every image to 3000 px or start hundreds of loader processes.
MAX_CROP_SIZE = 1024
MAX_WORKERS = 256


#: Version of the layout of the settings tree. Bump it with every change after which a file written
#: before would not read as it was meant (a key renamed, moved, removed or given another meaning),
#: and add the step from the previous version to :data:`MIGRATIONS`. Adding a key with a default
#: that keeps the old behaviour needs no new version.
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


# ---------------------------------------------------------------------------------------------
# Field catalogue (for --help and `presets show`)


def iter_fields(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """Yield (dotted key, description, default) for every leaf setting."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        key = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_fields(annotation, key + ".")
        else:
            default = field.get_default(call_default_factory=True)
            yield key, field.description or "", default


def dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": value}`` (the form ``--set`` and the docs use)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _valid_keys(model: type[BaseModel], path: Sequence[str]) -> list[str]:
    current: type[BaseModel] = model
    for part in path:
        field = current.model_fields.get(part)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        current = field.annotation
    return list(current.model_fields)


def _format_error(error: ValidationError, source: str, flag_names: Mapping[str, str] | None = None) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"] if not isinstance(p, int)]
    dotted = ".".join(loc) or "(root)"
    flag = (flag_names or {}).get(dotted)
    if flag is not None and first["type"] != "extra_forbidden":
        # A value the user typed as a flag is reported under that flag, not the setting's key.
        message = f"invalid value for {flag}: {first['msg']}"
        if "input" in first and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
        return message
    if first["type"] == "extra_forbidden":
        candidates = _valid_keys(Settings, loc[:-1])
        close = difflib.get_close_matches(loc[-1], candidates, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join([*loc[:-1], close[0]])}'?" if close else ""
        if not close and candidates:
            hint = f"; valid keys here: {', '.join(candidates)}"
        message = f"unknown setting '{dotted}'{hint}"
    else:
        message = f"invalid value for '{dotted}': {first['msg']}"
        if "input" in first and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
    more = len(error.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return f"{source}: {message}"


# ---------------------------------------------------------------------------------------------
# Sources


def preset_names() -> list[str]:
    """Names of the presets that ship with swavctl."""
    names: set[str] = set()
    for folder in PRESET_DIRS:
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.toml"))
    return sorted(names)


def preset_path(name_or_path: str) -> Path:
    """Resolve a preset name (``demo``) or a TOML path to a file."""
    candidate = follow(Path(name_or_path).expanduser())  # runs/latest/resolved.toml too
    # A file path; a folder of the same name as a preset (a 'demo/' here) does not hide the preset.
    if candidate.suffix == ".toml" or "/" in name_or_path or candidate.is_file():
        if not candidate.is_file():
            raise UserError(f"preset file not found: {candidate}")
        return candidate
    for folder in PRESET_DIRS:
        path = folder / f"{name_or_path}.toml"
        if path.is_file():
            return path
    close = difflib.get_close_matches(name_or_path, preset_names(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; available: {', '.join(preset_names())}"
    raise UserError(f"unknown preset '{name_or_path}'{hint}")


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def preset_description(name_or_path: str) -> str:
    """The preset's one-line ``description`` (that of the preset it extends when it has none)."""
    path = preset_path(name_or_path)
    raw = load_toml(path)
    text = raw.get("description")
    if isinstance(text, str):
        return " ".join(text.split())
    base = raw.get("extends")
    return preset_description(_base_ref(base, path)) if isinstance(base, str) else ""


@dataclass(frozen=True)
class TunedFor:
    """What a recipe was tuned for: the global batch (images per step over all devices) and the
    number of devices. The learning rate, the queue and the prototype freeze of a SwAV recipe are
    tied to its global batch; they are preset metadata (``[tuned_for]``), not settings."""

    global_batch: int
    devices: int


#: The built-in defaults are the paper's 800-epoch recipe: 64 images per GPU on 64 GPUs.
DEFAULTS_TUNED_FOR = TunedFor(global_batch=4096, devices=64)


def _tuned_for(raw: Any, source: str) -> TunedFor | None:
    """A preset's ``[tuned_for]`` table (``global_batch``, ``devices``: whole numbers >= 1)."""
    if raw is None:
        return None
    fix = "'[tuned_for]' needs global_batch and devices, whole numbers >= 1"
    if not isinstance(raw, dict) or set(raw) != {"global_batch", "devices"}:
        raise UserError(f"{source}: {fix}")
    values = [raw["global_batch"], raw["devices"]]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise UserError(f"{source}: {fix}")
    return TunedFor(global_batch=values[0], devices=values[1])


def preset_tuned_for(name_or_path: str | None) -> TunedFor | None:
    """The global batch and devices a preset was tuned for (``None``: the built-in defaults').

    A preset that records no ``[tuned_for]`` has that of the preset it ``extends``; one that
    extends none is unknown (None), as is a preset file that can no longer be read.
    """
    if name_or_path is None:
        return DEFAULTS_TUNED_FOR
    try:
        path = preset_path(name_or_path)
        raw = load_toml(path)
        tuned = _tuned_for(raw.get("tuned_for"), f"preset {path.name}")
    except UserError:
        return None
    if tuned is not None:
        return tuned
    base = raw.get("extends")
    return preset_tuned_for(_base_ref(base, path)) if isinstance(base, str) else None


def _base_ref(base: str, path: Path) -> str:
    """``extends`` names a preset, or a TOML path relative to the extending file's folder."""
    if base.endswith(".toml") or "/" in base:
        return str((path.parent / Path(base).expanduser()).resolve())
    return base


def load_preset(
    name_or_path: str, _seen: tuple[Path, ...] = (), *, by_method: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A preset's settings as a validated nested mapping, with the presets it ``extends`` applied
    first (``extends = "demo"``: the demo's settings, then this file's on top).

    The ``description``, ``extends``, ``tuned_for`` and ``by_method`` keys are the preset's own
    and are not settings. ``by_method``, when given, receives the per-method tables
    (``[by_method.deepcluster-v2.swav]``, :data:`method_settings.BY_METHOD`), each validated on
    top of the preset's values.
    """
    path = preset_path(name_or_path)
    if path.resolve() in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path.resolve()))
        raise UserError(f"preset {path.name}: 'extends' goes round in a circle ({chain})")
    source = f"preset {path.name}"
    tree = migrate(load_toml(path), source=source)
    description = tree.pop("description", None)
    if description is not None and not isinstance(description, str):
        raise UserError(f"{source}: 'description' must be a string")
    _tuned_for(tree.pop("tuned_for", None), source)
    try:
        own = method_settings.split_by_method(tree)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None
    base = tree.pop("extends", None)
    inherited: dict[str, dict[str, Any]] = {}
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{source}: 'extends' must name a preset or a TOML file")
        base_tree = load_preset(_base_ref(base, path), (*_seen, path.resolve()), by_method=inherited)
        tree = _deep_merge(base_tree, tree)
    validate(tree, source=source)
    for method, values in _deep_merge(inherited, own).items():
        validate(_deep_merge(tree, values), source=f"{source} [{method_settings.BY_METHOD}.{method}]")
        if by_method is not None:
            by_method[method] = values
    return tree


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as TOML, falling back to a plain string."""
    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set has an empty key in '{text}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _v0_to_v1(tree: dict[str, Any]) -> dict[str, Any]:
    """v0 (no ``schema_version``; swavctl 0.1.0 up to commit 5ec31d5) to v1.

    v0 recorded the run folder, ``out``, in ``resolved.toml``, checkpoints and exports, so a
    ``resolved.toml`` passed to ``--preset`` resumed the old run instead of starting a new one. v1
    records no folder: ``out`` is dropped. Nothing else changed.
    """
    tree.pop("out", None)
    return tree


#: ``MIGRATIONS[v]`` brings a tree of version ``v`` to ``v + 1``. A migration touches only the keys
#: it is about, so a file without a version that already uses the new layout (a preset written by
#: hand) passes through unchanged.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1}


def migrate(tree: Mapping[str, Any], source: str = "settings") -> dict[str, Any]:
    """A settings tree of any older schema version (none = 0) brought to :data:`SCHEMA_VERSION`.

    Raises a one-line :class:`UserError` for a version this swavctl does not know (a newer one).
    """
    version = tree.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise UserError(f"{source}: schema_version must be a whole number, got {version!r}")
    if version > SCHEMA_VERSION:
        from swavctl import __version__

        raise UserError(
            f"{source}: settings schema version {version} is newer than this swavctl {__version__} "
            f"reads (up to {SCHEMA_VERSION}); use the swavctl that wrote it, or a newer one"
        )
    migrated = {k: v for k, v in tree.items() if k != "schema_version"}
    for step in range(version, SCHEMA_VERSION):
        migrated = MIGRATIONS[step](migrated)
    migrated["schema_version"] = SCHEMA_VERSION
    return migrated


def read_tree(tree: Mapping[str, Any], source: str) -> Settings:
    """Settings read back from a file (resolved.toml, a checkpoint, an export): migrated, validated."""
    return validate(migrate(tree, source), source=source)


def validate(
    tree: Mapping[str, Any], source: str = "settings", flag_names: Mapping[str, str] | None = None
) -> Settings:
    """Validate a nested mapping into :class:`Settings`, or raise a one-line :class:`UserError`.

    ``flag_names`` maps dotted keys to the flags that set them (``train.epochs`` -> ``--epochs``),
    so that a bad value is reported under the flag the user typed.
    """
    try:
        return Settings.model_validate(dict(tree))
    except ValidationError as exc:
        raise UserError(_format_error(exc, source, flag_names)) from None


def resolve(
    *,
    preset: str | None = None,
    base: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    flag_names: Mapping[str, str] | None = None,
    notes: list[str] | None = None,
) -> Settings:
    """Build settings from defaults, a preset, explicit flags (dotted keys) and ``--set`` overrides.

    ``base`` is a settings tree applied after the preset and before the flags: the recipe that
    ``swavctl pretrain --data DIR`` chooses without a preset (:mod:`swavctl.train.auto_recipe`).
    ``flag_names`` maps the dotted keys of ``flags`` to the flags typed (``--epochs``), which then
    name a bad value in the error. Lines worth telling the user (a preset setting not applied)
    are appended to ``notes``.

    A setting that belongs to the preset's data, the k-NN monitor's ``monitor.knn_data``, does not
    follow the preset onto other data: when the data differ from the preset's ``data.path`` and
    neither a flag nor ``--set`` names ``monitor.knn_data``, the monitor is off.

    The preset and the flags are validated as they are applied, so an error names the source
    that caused it; the ``--set`` overrides are validated together.
    """
    tree: dict[str, Any] = {}
    preset_tree: dict[str, Any] = {}
    if preset is not None:
        path = preset_path(preset)
        # A preset is a recipe, not a run folder: an ``out`` in it (an older run's resolved.toml has
        # one) is dropped, so the run goes to --out or a new folder.
        by_method: dict[str, dict[str, Any]] = {}
        preset_tree = load_preset(preset, by_method=by_method)
        preset_tree.pop("out", None)
        method = method_settings.chosen_method(
            preset_tree, flags or {}, [parse_override(t) for t in overrides]
        )
        if by_method.get(method):  # the preset's values for this method, on top of its own
            preset_tree = _deep_merge(preset_tree, by_method[method])
            if notes is not None:
                values = ", ".join(f"{k}={v}" for k, v in dotted(by_method[method]).items())
                notes.append(
                    f"preset {preset}: with method '{method}', its [by_method.{method}] values: {values}"
                )
        tree = _deep_merge(tree, copy.deepcopy(preset_tree))  # flags must not change preset_tree
        # A run's resolved.toml keeps naming the preset the recipe came from.
        if not isinstance(preset_tree.get("preset"), str) or path.name != RESOLVED_NAME:
            tree["preset"] = preset
    if base:
        tree = _deep_merge(tree, copy.deepcopy(dict(base)))
    for key, value in (flags or {}).items():
        if value is not None:
            _set_path(tree, key.split("."), value)
    parsed = [parse_override(text) for text in overrides]
    method_note = _method_sources(tree, preset_tree, preset, flags or {}, parsed, flag_names or {})
    if method_note and notes is not None:
        notes.append(method_note)
    validate(tree, source="flags", flag_names=flag_names)
    # The overrides are validated together, so several of them can change related settings at
    # once (e.g. the lengths of all four crop lists).
    for path_parts, value in parsed:
        _set_path(tree, path_parts, value)
    explicit = set(explicit_keys(flags, overrides))
    note = _unbind_preset_data(tree, preset_tree, explicit, preset)
    if note and notes is not None:
        notes.append(note)
    return validate(tree, source="--set" if overrides else "settings")


def explicit_keys(flags: Mapping[str, Any] | None, overrides: Sequence[str]) -> frozenset[str]:
    """The dotted keys the user set: flags given a value, and every ``--set`` key."""
    keys = {key for key, value in (flags or {}).items() if value is not None}
    keys.update(".".join(parse_override(text)[0]) for text in overrides)
    return frozenset(keys)


def _method_sources(
    tree: dict[str, Any],
    preset_tree: Mapping[str, Any],
    preset: str | None,
    flags: Mapping[str, Any],
    parsed: Sequence[tuple[list[str], Any]],
    flag_names: Mapping[str, str],
) -> str | None:
    """Refuse a flag, ``--set`` or preset setting that does not apply to the chosen method.

    A flag or ``--set`` naming such a setting is refused whatever its value. A preset that names
    its ``method`` is a recipe for that method: its values (other than the defaults) that do not
    apply to the chosen method are refused too. A preset without ``method`` (``demo``, ``smoke``)
    carries settings for several methods: those that do not apply are left out, with a note (the
    returned line). ``tree`` is changed in place.
    """
    method = method_settings.chosen_method(tree, {}, parsed)  # the flags are in ``tree`` already
    if method not in method_settings.METHODS:
        return None  # refused with the nearest name by validation
    given = [(flag_names.get(k, k), {k: v}) for k, v in flags.items() if v is not None]
    given += [(f"--set {'.'.join(p)}", _flat_at(p, v)) for p, v in parsed]
    for source, flat in given:
        for key, reason in method_settings_in_use(method, flat, all_keys=True).items():
            raise UserError(f"{source}: {key} does not apply to method '{method}': {reason}")
    found = method_settings_in_use(method, dotted(preset_tree))
    if not found:
        return None
    key, reason = next(iter(found.items()))
    own = preset_tree.get("method")
    if own is not None or key == "model.prototypes":
        recipe = f" (a {own} recipe)" if own else ""
        raise UserError(f"preset {preset}{recipe}: {key} does not apply to method '{method}': {reason}")
    for key in found:
        _drop_path(tree, key.split("."))
    return f"preset {preset}: left out {', '.join(found)}, which method '{method}' does not use"


def _flat_at(path: Sequence[str], value: Any) -> dict[str, Any]:
    key = ".".join(path)
    return dotted(value, key + ".") if isinstance(value, Mapping) else {key: value}


def _drop_path(tree: dict[str, Any], path: Sequence[str]) -> None:
    node: Any = tree
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _same_data(a: Any, b: Any) -> bool:
    """Whether two ``data.path`` values name the same data: ``demo`` only itself, folders by their
    absolute path (a run's ``resolved.toml`` records ``photos`` as ``/home/me/photos``)."""
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b or "demo" in (a, b):
        return False
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def _unbind_preset_data(
    tree: dict[str, Any], preset_tree: Mapping[str, Any], explicit: set[str], preset: str | None
) -> str | None:
    """Turn off a k-NN monitor that came with the preset when the run's data are not the preset's.

    Returns the line to tell the user (None when nothing changed).
    """
    preset_knn = preset_tree.get("monitor", {}).get("knn_data")
    if not preset_knn or any(key in ("monitor", "monitor.knn_data") for key in explicit):
        return None
    data = tree.get("data", {}).get("path")
    if _same_data(data, preset_tree.get("data", {}).get("path")):
        return None
    del tree["monitor"]["knn_data"]
    return (
        f"no k-NN monitor: preset {preset}'s monitor.knn_data ({preset_knn}) belongs to its data, not "
        f"to {data}; to report a k-NN top-1 on your own labelled data, pass --knn-data DIR "
        "(DIR/train + DIR/val, or DIR/<class>/*)"
    )


#: Settings a run does not record (in resolved.toml, checkpoints, exports): where it writes.
NOT_RECORDED = {"out"}


def recorded_json(settings: Settings) -> str:
    """The settings as JSON, as an export's metadata records them (no ``out``)."""
    return settings.model_dump_json(exclude=NOT_RECORDED)


def preset_toml(settings: Settings, *, description: str = "", tuned_for: TunedFor | None = None) -> str:
    """``settings`` as a preset file that ``--preset`` reads back to the same settings: every
    setting (``None`` values, which TOML cannot write, are the defaults anyway), headed by the
    description and what the recipe was tuned for."""
    tree = settings.model_dump(mode="json", exclude_none=True, exclude=NOT_RECORDED)
    tree.pop("preset", None)  # which preset a run started from is set by --preset itself
    head: dict[str, Any] = {"description": description} if description else {}
    if tuned_for is not None:
        head["tuned_for"] = {"global_batch": tuned_for.global_batch, "devices": tuned_for.devices}
    return tomli_w.dumps({**head, **tree})


def to_toml(settings: Settings) -> str:
    """The settings as TOML (``None`` values are omitted, as TOML has no null; ``out`` is not written)."""
    return tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True, exclude=NOT_RECORDED))


def from_toml_text(text: str, source: str) -> Settings:
    """Settings from the TOML a run wrote (``resolved.toml``, a checkpoint's), migrated and validated."""
    try:
        return read_tree(tomllib.loads(text), source=source)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML: {exc}") from None
