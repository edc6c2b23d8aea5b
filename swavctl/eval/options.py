"""What ``swavctl eval-linear`` accepts, declared once: each option is one field here.

The field's description is the option's ``--help`` text (the command's parameters are built from
these fields, see :mod:`swavctl.commands.from_options`), its validators raise :class:`UserError`,
and the model's JSON carries the options to the worker processes of a multi-process evaluation.
This module stays free of torch, so that the command line can be built and checked without it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from swavctl.errors import UserError
from swavctl.errors.messages import DEFAULT_MODEL

#: The modes, in the order ``--help`` names them (each is a module of :mod:`swavctl.eval`, found
#: through :data:`swavctl.eval.modes.REGISTRY`).
MODES = ("fast", "linear", "knn", "finetune")
#: Epochs of the modes that train a probe (finetune's depend on the subset: finetune.paper_recipe).
DEFAULT_EPOCHS = {"linear": 100, "fast": 100}
#: The fast probe's grid of learning rates and weight decays.
DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DEFAULT_WDS = (0.0, 1e-5, 1e-4, 1e-3)
#: DINO's neighbours k and vote temperature T (eval-linear's ``--k`` and ``--temperature`` defaults,
#: and the monitor's; ``monitor.knn_k`` repeats 20 because the settings module stays torch-free).
KNN_K = 20
KNN_TEMPERATURE = 0.07
#: Images per feature-extraction batch (eval-linear's ``--batch-size`` default, and the monitor's).
FEATURE_BATCH = 256
#: The val fraction and seed of a single folder's split (eval-linear's defaults, and the monitor's).
VAL_SPLIT = 0.2
SPLIT_SEED = 0


def check(ok: Callable[[Any], bool], message: str | Callable[[Any], str]) -> AfterValidator:
    """A field validator: a value other than None for which ``ok`` is false raises ``UserError``."""

    def validate(value: Any) -> Any:
        if value is not None and not ok(value):
            raise UserError(message(value) if callable(message) else message)
        return value

    return AfterValidator(validate)


def _numbers(flag: str) -> BeforeValidator:
    """Comma-separated text (as typed after ``flag``) read as a tuple of numbers."""

    def parse(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            numbers = tuple(float(part) for part in value.split(",") if part.strip())
        except ValueError:
            raise UserError(f"{flag} expects comma-separated numbers, got '{value}'") from None
        if not numbers:
            raise UserError(f"{flag} expects at least one number")
        return numbers

    return BeforeValidator(parse)


_GRID = "the fast grid needs positive learning rates and non-negative weight decays"
_POSITIVE_LRS = check(lambda v: len(v) > 0 and min(v) > 0, _GRID)
_NON_NEGATIVE_WDS = check(lambda v: len(v) > 0 and min(v) >= 0, _GRID)


class EvalOptions(BaseModel):
    """Everything ``swavctl eval-linear`` accepts (None = the mode's default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path = Field(
        DEFAULT_MODEL,
        description="Run folder, checkpoint (.pt) or export (.safetensors) (default: runs/latest).",
    )
    data: str | None = Field(
        None,
        description="ImageFolder with train/ and val/, or one folder (split by --val-split), or 'demo' "
        "(default: the dataset recorded in the model; a model that records none needs --data).",
    )
    mode: Annotated[
        str, check(lambda v: v in MODES, lambda v: f"--mode must be one of {', '.join(MODES)}, got '{v}'")
    ] = Field("fast", description="fast (default), linear, knn or finetune.")
    out: Path | None = Field(None, description="Output folder (default: <run folder>/eval-<mode>/).")
    val_split: float = Field(VAL_SPLIT, description="Val fraction when the data has no train/ and val/.")
    seed: int = Field(SPLIT_SEED, description="Seed for splits, subsets, crops and initialisation.")
    epochs: Annotated[int | None, check(lambda v: v >= 1, "--epochs must be at least 1")] = Field(
        None, description="Epochs (default: linear 100, fast 100, finetune max(20, 200 steps))."
    )
    batch_size: Annotated[int, check(lambda v: v >= 1, "--batch-size must be at least 1")] = Field(
        FEATURE_BATCH, description="Batch size (paper: 256)."
    )
    lr: Annotated[float | None, check(lambda v: v > 0, lambda v: f"--lr must be positive, got {v}")] = Field(
        None, description="linear: learning rate (0.3); finetune: head learning rate."
    )
    weight_decay: Annotated[
        float | None, check(lambda v: v >= 0, lambda v: f"--weight-decay must be 0 or more, got {v}")
    ] = Field(None, description="linear: weight decay (1e-6); finetune: (0).")
    k: Annotated[int, check(lambda v: v >= 1, "--k must be at least 1")] = Field(
        KNN_K, description="knn: number of neighbours."
    )
    temperature: Annotated[float, check(lambda v: v > 0, "--temperature must be positive")] = Field(
        KNN_TEMPERATURE, description="knn: vote temperature."
    )
    # Checked with --mode below: whether it applies comes first.
    label_fraction: float | None = Field(
        None, description="finetune: fraction of train labels (0.01 or 0.1)."
    )
    aug_passes: Annotated[int, check(lambda v: v >= 0, "--aug-passes must be 0 or more")] = Field(
        0, description="fast: extra augmented feature passes over train."
    )
    holdout: Annotated[
        float, check(lambda v: 0 < v < 1, lambda v: f"--holdout must be in (0, 1), got {v}")
    ] = Field(0.2, description="fast: fraction of train held out to choose the probe.")
    standardize: bool = Field(
        False, description="fast: standardise features first (estimates a converged probe)."
    )
    fast_lrs: Annotated[tuple[float, ...], _numbers("--fast-lrs"), _POSITIVE_LRS] = Field(
        DEFAULT_LRS, description="fast: comma-separated learning rates of the grid."
    )
    fast_wds: Annotated[tuple[float, ...], _numbers("--fast-wds"), _NON_NEGATIVE_WDS] = Field(
        DEFAULT_WDS, description="fast: comma-separated weight decays of the grid."
    )
    crop_size: Annotated[int | None, check(lambda v: v >= 1, "--crop-size must be positive")] = Field(
        None, description="Evaluation crop side (default: the pretraining crop size)."
    )
    min_scale: Annotated[
        float | None, check(lambda v: 0 < v <= 1, lambda v: f"--min-scale must be in (0, 1], got {v}")
    ] = Field(
        None,
        description="linear/finetune: smallest training-crop area (default: the paper's 0.08, scaled like "
        "the model's pretraining crops).",
    )
    gpus: Annotated[int | None, check(lambda v: v >= 0, "--gpus must be 0 or more")] = Field(
        None, description="GPUs to use (default: 1 if CUDA is available)."
    )
    procs: Annotated[int, check(lambda v: v >= 1, "--procs must be at least 1")] = Field(
        1, description="CPU processes with --gpus 0 (gloo on 127.0.0.1)."
    )
    workers: Annotated[int | None, check(lambda v: v >= 0, "--workers must be 0 or more")] = Field(
        None, description="Loader worker processes (default: the model's setting)."
    )

    @model_validator(mode="after")
    def _label_fraction_goes_with_finetune(self) -> EvalOptions:
        fraction = self.label_fraction
        if self.mode == "finetune" and fraction is None:
            raise UserError("--mode finetune needs --label-fraction (the paper's: 0.01 or 0.1)")
        if fraction is not None and self.mode != "finetune":
            raise UserError("--label-fraction only applies to --mode finetune")
        if fraction is not None and not 0 < fraction <= 1:
            raise UserError(f"--label-fraction must be in (0, 1], got {fraction}")
        return self

    @property
    def resolved_epochs(self) -> int | None:
        """``--epochs`` or the mode's default (None: knn has none, finetune's depends on the subset)."""
        return self.epochs or DEFAULT_EPOCHS.get(self.mode)
