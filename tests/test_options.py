"""Options declared once: eval-linear's and inspect-clusters' pydantic models feed the command
line, the checks and the JSON; one device rule; the eval modes behind their registry."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import torch

from swavctl.commands.eval import FLAGS as EVAL_FLAGS
from swavctl.commands.eval import eval_linear_command
from swavctl.commands.from_options import Flag, option_parameters
from swavctl.commands.inspect import FLAGS as INSPECT_FLAGS
from swavctl.commands.inspect import inspect_clusters_command
from swavctl.distributed.device import pick_devices
from swavctl.errors import UserError
from swavctl.errors.messages import not_enough_gpus
from swavctl.eval.options import DEFAULT_LRS, MODES, EvalOptions
from swavctl.inspect.options import InspectOptions


def _help_of(annotation: Any) -> str:
    return next(a for a in get_args(annotation)[1:] if hasattr(a, "help")).help


@pytest.mark.parametrize(
    ("command", "model", "flags"),
    [
        (eval_linear_command, EvalOptions, EVAL_FLAGS),
        (inspect_clusters_command, InspectOptions, INSPECT_FLAGS),
    ],
)
def test_the_command_takes_each_field_with_its_description_as_help(
    command: Any, model: Any, flags: dict[str, Flag]
) -> None:
    parameters = inspect.signature(command).parameters
    assert list(parameters) == [*flags, "as_json"]
    for name in flags:
        assert _help_of(parameters[name].annotation) == model.model_fields[name].description, name
    assert set(model.model_fields) - set(flags) <= {"thumb"}  # Python API only


def test_a_field_without_a_flag_is_refused_when_the_command_is_built() -> None:
    flags = {name: flag for name, flag in EVAL_FLAGS.items() if name != "seed"}
    with pytest.raises(TypeError, match="no command-line flag for \\['seed'\\]"):
        option_parameters(EvalOptions, flags)


def test_eval_options_reach_the_workers_unchanged_through_json() -> None:
    options = EvalOptions(
        model=Path("runs/x"), mode="finetune", label_fraction=0.1, out=Path("o"), fast_lrs="0.5,2", lr=0.1
    )
    assert options.fast_lrs == (0.5, 2.0) and options.fast_wds == EvalOptions().fast_wds
    again = EvalOptions.model_validate_json(options.model_dump_json())
    assert again == options and isinstance(again.model, Path) and again.fast_lrs == (0.5, 2.0)
    assert EvalOptions().fast_lrs == DEFAULT_LRS


EVAL_REFUSALS = [
    ({"mode": "svm"}, "--mode must be one of fast, linear, knn, finetune, got 'svm'"),
    ({"mode": "finetune"}, "--mode finetune needs --label-fraction (the paper's: 0.01 or 0.1)"),
    ({"label_fraction": 0.1}, "--label-fraction only applies to --mode finetune"),
    ({"mode": "finetune", "label_fraction": 1.5}, "--label-fraction must be in (0, 1], got 1.5"),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"k": 0}, "--k must be at least 1"),
    ({"temperature": 0.0}, "--temperature must be positive"),
    ({"aug_passes": -1}, "--aug-passes must be 0 or more"),
    ({"holdout": 1.0}, "--holdout must be in (0, 1), got 1.0"),
    ({"crop_size": 0}, "--crop-size must be positive"),
    ({"min_scale": 0.0}, "--min-scale must be in (0, 1], got 0.0"),
    ({"fast_lrs": "0.1,x"}, "--fast-lrs expects comma-separated numbers, got '0.1,x'"),
    ({"fast_wds": " , "}, "--fast-wds expects at least one number"),
    ({"fast_lrs": "0,1"}, "the fast grid needs positive learning rates and non-negative weight decays"),
    ({"fast_wds": "-1"}, "the fast grid needs positive learning rates and non-negative weight decays"),
    ({"lr": -1.0}, "--lr must be positive, got -1.0"),
    ({"weight_decay": -1.0}, "--weight-decay must be 0 or more, got -1.0"),
    ({"workers": -1}, "--workers must be 0 or more"),
    ({"gpus": -1}, "--gpus must be 0 or more"),
    ({"procs": 0}, "--procs must be at least 1"),
]


@pytest.mark.parametrize(("keywords", "message"), EVAL_REFUSALS, ids=[m for _, m in EVAL_REFUSALS])
def test_eval_options_refuse_bad_values_in_one_line(keywords: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as caught:
        EvalOptions(**keywords)
    assert str(caught.value) == message


INSPECT_REFUSALS = [
    ({"assignment": "kmeans"}, "--assignment must be argmax or balanced, got 'kmeans'"),
    ({"per_cluster": 0}, "--per-cluster must be at least 1"),
    ({"max_clusters": -1}, "--max-clusters must be 0 or more"),
    ({"duplicate_threshold": 1.5}, "--duplicate-threshold must lie in [-1, 1]"),
    ({"temperature": 0.0}, "--temperature must be positive"),
    ({"epsilon": -1.0}, "--epsilon must be positive"),
    ({"sinkhorn_iterations": 0}, "--sinkhorn-iterations must be at least 1"),
    ({"sinkhorn_tolerance": -0.1}, "--sinkhorn-tolerance must be 0 or more"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"workers": -1}, "--workers must be 0 or more"),
    ({"gpus": -2}, "--gpus must be 0 or more, got -2"),
    ({"image_size": 0}, "--image-size must be at least 1"),
    ({"max_images": 0}, "--max-images must be at least 1"),
    ({"prototype_set": -1}, "--prototype-set must be 0 or more"),
    ({"thumb": 8}, "--thumb must lie in 16..512"),
    ({"copy": True}, "--copy needs --sort-into DIR"),
]


@pytest.mark.parametrize(("keywords", "message"), INSPECT_REFUSALS, ids=[m for _, m in INSPECT_REFUSALS])
def test_inspect_options_refuse_bad_values_in_one_line(keywords: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as caught:
        InspectOptions(**keywords)
    assert str(caught.value) == message


def test_inspect_copy_is_set_by_its_flag_name() -> None:
    assert InspectOptions(copy=True, sort_into=Path("d")).copy_files
    assert InspectOptions(copy_files=True, sort_into=Path("d")).copy_files
    assert not InspectOptions().copy_files


def test_the_options_are_built_without_torch() -> None:
    probe = (
        "import sys, swavctl.eval.options, swavctl.inspect.options, swavctl.commands.from_options; "
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_mode_has_its_module_in_the_registry() -> None:
    from swavctl.eval import fast, finetune, knn, linear
    from swavctl.eval.modes import REGISTRY

    assert tuple(REGISTRY) == MODES
    assert [REGISTRY[m] for m in MODES] == [fast.run_mode, linear.run_mode, knn.run_mode, finetune.run_mode]


def test_one_device_rule_for_every_command() -> None:
    assert pick_devices(0) == [torch.device("cpu")]
    assert pick_devices(0, in_this_process=True) == [torch.device("cpu")]
    with pytest.raises(UserError, match="^--gpus must be 0 or more, got -1$"):
        pick_devices(-1)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(UserError) as caught:
        pick_devices(visible + 1, in_this_process=True)
    assert str(caught.value) == not_enough_gpus(visible + 1, visible)
    if visible == 0:
        assert pick_devices(None) == [torch.device("cpu")]
        with pytest.raises(UserError) as caught:
            pick_devices(2)  # one of 2 workers, with no GPU to run on
        assert str(caught.value) == not_enough_gpus(2, 0)
    else:
        assert pick_devices(None) == [torch.device("cuda", torch.cuda.current_device())]
        every = [torch.device("cuda", i) for i in range(visible)]
        assert pick_devices(visible, in_this_process=True) == every
