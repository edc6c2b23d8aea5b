"""The Python API: what the commands do, as functions for notebooks and scripts.

``import swavctl`` stays light; these are reached as ``swavctl.pretrain``, ``swavctl.evaluate``,
``swavctl.load_backbone`` and ``swavctl.load_settings`` and imported on first use (torch with
them). Bad input raises :class:`swavctl.errors.UserError` with the message the command would
print. See ``docs/api.md``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from swavctl.config import Settings
from swavctl.errors import UserError

#: Keyword arguments of :func:`pretrain` and :func:`load_settings` that stand for a setting (as
#: the ``pretrain`` flags of the same names do).
SHORT_KEYS = {
    "data": "data.path",
    "out": "out",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "arch": "model.arch",
    "init": "model.init",
    "max_steps": "train.max_steps",
    "gpus": "dist.gpus",
    "procs": "dist.procs",
    "knn_data": "monitor.knn_data",
}


def load_settings(
    preset: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    **keywords: Any,
) -> Settings:
    """Validated settings: the defaults, then ``preset`` (a name or TOML path), then ``keywords``
    (``epochs=``, ``data=``, ... as the ``pretrain`` flags), then ``overrides``.

    Without a preset, and with data, the recipe is chosen from the data and the devices, as
    ``swavctl pretrain --data DIR`` chooses it (:mod:`swavctl.train.auto_recipe`); the keywords
    and overrides win over it.

    ``overrides`` maps dotted keys to values (``{"train.epochs": 1}``) or lists ``--set``
    strings (``["data.crop_sizes=[64,32]"]``). Raises :class:`UserError` naming a bad key or value.
    """
    return _settings(preset, overrides, keywords)[0]


def _settings(
    preset: str | None, overrides: Mapping[str, Any] | Sequence[str] | None, keywords: Mapping[str, Any]
) -> tuple[Settings, str | None]:
    """The settings of :func:`load_settings`, and the line that says which recipe was chosen
    (followed by its warnings, one per line)."""
    unknown = sorted(set(keywords) - set(SHORT_KEYS))
    if unknown:
        raise UserError(
            f"unknown keyword {unknown[0]!r}; use one of {', '.join(SHORT_KEYS)} "
            "or overrides={'a.b': value}"
        )
    from swavctl import config

    flags = {SHORT_KEYS[name]: value for name, value in keywords.items()}
    texts: list[str] = []
    if isinstance(overrides, Mapping):
        flags.update(overrides)
    elif overrides is not None:
        texts = list(overrides)
    settings = config.resolve(preset=preset, flags=flags, overrides=texts)
    named = set(flags) | {".".join(config.parse_override(text)[0]) for text in texts}
    line = None
    if preset is None and settings.data.path:
        from swavctl.train.survey import auto_recipe

        recipe_flags = dict(flags)
        if settings.model.init and "model.arch" not in named:
            from swavctl.weights.init_weights import arch_of_init

            recipe_flags["model.arch"] = arch_of_init(settings.model.init)  # the recipe is built around it
        choice = auto_recipe(flags=recipe_flags, overrides=texts)
        settings, line = choice.settings, "\n".join([choice.line, *choice.warnings])
    if not settings.model.init:
        return settings, line
    from swavctl.weights.init_weights import resolve_init

    # Without an architecture of its own choosing, the run takes the init weights' (as --init does).
    arch_where = "model.arch" if "model.arch" in named else None
    return resolve_init(settings, arch_where=arch_where, where="init"), line


def _summary(outcome: Any) -> dict[str, Any]:
    """The summary of an :class:`swavctl.distributed.outcomes.Outcome`, or its failure raised."""
    from swavctl.distributed import outcomes

    if outcome.status == outcomes.OK:
        return dict(outcome.summary or {})
    if outcome.status == outcomes.USER_ERROR:
        raise UserError(outcome.message)
    if outcome.status == outcomes.INTERRUPTED:
        raise KeyboardInterrupt(outcome.message)
    raise RuntimeError(f"{outcome.status}: {outcome.message}")


def pretrain(
    settings: Settings | None = None,
    *,
    preset: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    fresh: bool = False,
    **keywords: Any,
) -> dict[str, Any]:
    """Pretrain (or resume) as ``swavctl pretrain`` does; returns the run summary.

    Pass ``settings`` (from :func:`load_settings`), or build them here from ``preset``,
    ``keywords`` (``data=``, ``epochs=``, ``out=``, ...) and ``overrides`` (without a preset, the
    recipe chosen from the data, its line on stderr, as the command). The summary holds
    ``out_dir``, ``steps``, ``final_loss``, ``backbone`` (the exported backbone) and more.
    """
    if settings is None:
        settings, line = _settings(preset, overrides, keywords)
        if line:
            print(line, file=sys.stderr)
    elif preset is not None or overrides is not None or keywords:
        raise UserError("pass either settings or preset/overrides/keywords, not both")
    from swavctl.data.demo import anchored_data_path
    from swavctl.model.backbones import check_backbone_name
    from swavctl.train.job import run_pretrain

    check_backbone_name(settings.model.arch)
    if settings.model.init and not settings.model.init_sha256:  # settings made by hand: taken as they are
        from swavctl.weights.init_weights import resolve_init

        settings = resolve_init(settings, arch_where="model.arch", where="model.init")
    settings = settings.model_copy(
        update={
            "data": settings.data.model_copy(update={"path": anchored_data_path(settings.data.path)}),
            "monitor": settings.monitor.model_copy(
                update={"knn_data": anchored_data_path(settings.monitor.knn_data)}
            ),
        }
    )
    return _summary(run_pretrain(settings, fresh=fresh))


def load_backbone(path: str | Path = "runs/latest") -> Any:
    """The trained backbone (a ``torch.nn.Module`` in eval mode, on the CPU) of a run folder, a
    checkpoint (``.pt``) or an export (``.safetensors``).

    It maps images (N x 3 x H x W, normalised with the run's ``data.augment.mean``/``std``) to
    pooled features (N x d).
    """
    from swavctl.weights.containers import check_model_file

    check_model_file(Path(path))
    from swavctl.weights.model_io import load_model

    return load_model(Path(path)).model.backbone.eval()


def evaluate(model: str | Path = "runs/latest", data: str | None = None, **options: Any) -> dict[str, Any]:
    """Evaluate a backbone as ``swavctl eval-linear`` does; returns its summary (``top1``, ...).

    ``options`` are those of the command, by their Python names: ``mode`` (``fast``, ``linear``,
    ``knn``, ``finetune``), ``epochs``, ``k``, ``out``, ``gpus``, ``workers``, ...
    """
    from swavctl.weights.containers import check_model_file

    check_model_file(Path(model))  # a missing or malformed file is refused before torch is imported
    from swavctl.eval.job import run_evaluation
    from swavctl.eval.run import EvalOptions

    known = set(EvalOptions.model_fields)
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r}; evaluate takes {', '.join(sorted(known))}")
    if "out" in options and options["out"] is not None:
        options["out"] = Path(options["out"])
    return _summary(run_evaluation(EvalOptions(model=Path(model), data=data, **options)))
