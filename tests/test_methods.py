"""DeepCluster-v2 and SeLa-v2 (``--method``) trained end to end: the settings each method refuses,
DeepCluster-v2's prototypes as the k-means centroids of the bank, exact resume at an epoch boundary
and mid-epoch for both methods, and SeLa-v2 on two gloo ranks equal to one process.

The runs are the smoke preset's tiny convnet on 24 images (3 steps of 8 per epoch, 2 epochs), in
real processes. The clustering math itself is tested in test_clustering.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from swavctl import config
from swavctl.errors import UserError
from swavctl.weights import checkpoint as ckpt
from tests.conftest import cli_env, run_cli, write_image_folder
from tests.test_resume import _assert_equal_trees, assert_bitwise_equal_exports

SMOKE = ("pretrain", "--preset", "smoke", "--gpus", "0", "--set", "checkpoint.keep=10")
SETS = ("--set", "model.prototypes=[8, 6]")
STEPS = 6  # 2 epochs of 3 steps
KEYS = {"deepcluster-v2": "deepcluster_bank", "sela-v2": "sela_bank"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_image_folder(tmp_path_factory.mktemp("data") / "images", classes=2, per_class=12))


def _state(run: Path, step: int) -> dict:  # type: ignore[type-arg]
    return torch.load(ckpt.checkpoint_at(run, step).state_path, weights_only=True)


def _pretrain(cwd: Path, *args: str) -> dict:  # type: ignore[type-arg]
    done = run_cli(*SMOKE, *args, "--json", cwd=cwd, env=cli_env())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, images: str) -> dict[str, Path]:
    """One uninterrupted run per method, two prototype sets."""
    cwd = tmp_path_factory.mktemp("ref")
    for method in KEYS:
        summary = _pretrain(cwd, "--method", method, *SETS, "--data", images, "--out", method)
        assert summary["steps"] == STEPS and math.isfinite(summary["final_loss"])
    return {method: cwd / method for method in KEYS}


# ---- settings ---------------------------------------------------------------------------------


def _refusal(**kwargs: object) -> str:
    with pytest.raises(UserError) as caught:
        config.resolve(**kwargs)  # type: ignore[arg-type]
    return str(caught.value)


def test_unknown_method_is_refused_with_the_nearest_name() -> None:
    message = _refusal(flags={"method": "deepclustr-v2"}, flag_names={"method": "--method"})
    assert message.startswith(
        "invalid value for --method: unknown method 'deepclustr-v2'; did you mean 'deepcluster-v2'?"
    )


@pytest.mark.parametrize(
    ("method", "setting", "reason"),
    [
        ("deepcluster-v2", "swav.queue_length=3840", "not a queue"),
        ("deepcluster-v2", "swav.epsilon=0.05", "spherical k-means"),
        ("deepcluster-v2", "swav.freeze_prototypes_steps=5", "never take a gradient"),
        ("deepcluster-v2", "sela.epsilon=0.01", "[sela] holds SeLa-v2's"),
        ("sela-v2", "swav.sinkhorn_iterations=3", "offline Sinkhorn-Knopp"),
        ("sela-v2", "deepcluster.kmeans_iterations=5", "[deepcluster] holds"),
        ("swav", "sela.tolerance=0.01", "pass --method sela-v2"),
        ("swav", "model.prototypes=[10, 10]", "SwAV trains one prototype set"),
    ],
)
def test_a_setting_of_another_method_is_refused_with_the_reason(
    method: str, setting: str, reason: str
) -> None:
    key = setting.split("=")[0]
    message = _refusal(preset="smoke", overrides=[f"method={method}", setting])
    assert message.startswith(f"--set {key}: {key} does not apply to method '{method}': ")
    assert reason in message


def test_a_recipe_of_one_method_is_refused_for_another_and_a_shared_preset_leaves_out_the_rest() -> None:
    message = _refusal(preset="swav-rn50-400ep-bs256", flags={"method": "sela-v2"})
    assert message.startswith(
        "preset swav-rn50-400ep-bs256 (a swav recipe): swav.queue_length does not apply"
    )
    notes: list[str] = []
    settings = config.resolve(preset="smoke", flags={"method": "deepcluster-v2"}, notes=notes)
    assert notes == [
        "preset smoke: left out swav.freeze_prototypes_steps, which method 'deepcluster-v2' does not use"
    ]
    assert settings.swav.freeze_prototypes_steps == config.SwavSettings().freeze_prototypes_steps
    assert config.resolve(preset="smoke", flags={"method": "sela-v2"}).swav.freeze_prototypes_steps == 2
    # Settings the methods share keep their names and apply.
    shared = config.resolve(
        preset="smoke", flags={"method": "deepcluster-v2"}, overrides=["swav.temperature=0.2"]
    )
    assert shared.swav.temperature == 0.2
    # A run's settings read back (every key written, at its default) load again.
    assert config.from_toml_text(config.to_toml(settings), "resolved.toml") == settings


def test_a_preset_carries_values_for_one_method_that_apply_only_under_it(tmp_path: Path) -> None:
    notes: list[str] = []
    dc = config.resolve(preset="demo", flags={"method": "deepcluster-v2"}, notes=notes)
    assert (dc.swav.temperature, dc.model.prototypes) == (0.1, [10, 30, 100])
    assert notes[0] == (
        "preset demo: with method 'deepcluster-v2', its [by_method.deepcluster-v2] values: "
        "swav.temperature=0.1, model.prototypes=[10, 30, 100]"
    )
    for others in ({}, {"method": "sela-v2"}, {"method": "swav"}):
        plain = config.resolve(preset="demo", flags=others)
        assert (plain.swav.temperature, plain.model.prototypes) == (0.3, 10)
    # --set method= chooses them as the flag does, and the user's values still win over them.
    chosen = config.resolve(preset="demo", overrides=["method=deepcluster-v2", "swav.temperature=0.2"])
    assert (chosen.swav.temperature, chosen.model.prototypes) == (0.2, [10, 30, 100])
    # A preset that extends demo inherits them; a misspelt method is refused with the nearest name.
    (tmp_path / "mine.toml").write_text('extends = "demo"\n[train]\nepochs = 3\n')
    mine = config.resolve(preset=str(tmp_path / "mine.toml"), flags={"method": "deepcluster-v2"})
    assert (mine.train.epochs, mine.model.prototypes) == (3, [10, 30, 100])
    (tmp_path / "typo.toml").write_text("[by_method.deepclustr-v2.swav]\ntemperature = 0.1\n")
    with pytest.raises(UserError, match="by_method.deepclustr-v2.*did you mean 'deepcluster-v2'"):
        config.resolve(preset=str(tmp_path / "typo.toml"))
    # Each table is validated as it would apply.
    (tmp_path / "bad.toml").write_text("[by_method.sela-v2.swav]\ntemperature = -1\n")
    with pytest.raises(UserError, match=r"bad.toml \[by_method.sela-v2\]"):
        config.resolve(preset=str(tmp_path / "bad.toml"))


# ---- DeepCluster-v2's prototypes ---------------------------------------------------------------


def test_deepcluster_prototypes_are_the_unit_centroids_of_the_bank_and_take_no_gradient(
    references: dict[str, Path],
) -> None:
    run = references["deepcluster-v2"]
    clustered = _state(run, 3)["deepcluster_bank"][0][
        "bank"
    ]  # written in epoch 0, clustered at epoch 1's start
    final = _state(run, STEPS)
    labels = final["deepcluster_bank"][0]["labels"]  # epoch 1's
    for h, k in enumerate((8, 6)):
        prototypes = final["model"][f"prototypes.{h}.weight"]
        assert prototypes.shape == (k, 16)
        torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(k), atol=1e-6, rtol=0)
        # Copied in at epoch 1's start, never moved by the optimizer since (mid-epoch 1 is the same).
        assert torch.equal(_state(run, 4)["model"][f"prototypes.{h}.weight"], prototypes)
        rows = clustered["indices"] >= 0
        assert int(rows.sum()) == 24
        nearest = (clustered["embeddings"][h % 2][rows] @ prototypes.t()).argmax(dim=1)
        assert torch.equal(labels[h][clustered["indices"][rows]], nearest)


# ---- exact resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(KEYS))
def test_resume_at_an_epoch_boundary_and_mid_epoch_is_bitwise_exact(
    tmp_path: Path, images: str, references: dict[str, Path], method: str
) -> None:
    command = ("--method", method, *SETS, "--data", images, "--out", "run")
    assert _pretrain(tmp_path, *command, "--max-steps", "3")["steps"] == 3  # stops at the epoch's end
    resumed = _pretrain(tmp_path, *command, "--max-steps", "4")  # clusters afresh, stops mid-epoch
    assert resumed["resumed_from_step"] == 3
    final = _pretrain(tmp_path, *command)  # resumes mid-epoch with the saved labels and bank
    assert final["resumed_from_step"] == 4 and final["steps"] == STEPS
    reference = references[method]
    assert_bitwise_equal_exports(
        tmp_path / "run" / "backbone.safetensors", reference / "backbone.safetensors", same_metadata=False
    )
    got, expected = _state(tmp_path / "run", STEPS), _state(reference, STEPS)
    for key in ("model", "optimizer", KEYS[method], "rng", "step"):
        _assert_equal_trees(got[key], expected[key], key)


def test_a_resume_on_another_world_size_is_refused(tmp_path: Path, images: str) -> None:
    command = ("--method", "deepcluster-v2", "--data", images, "--out", "run", "--batch-size", "4")
    assert _pretrain(tmp_path, *command, "--max-steps", "2")["steps"] == 2
    again = run_cli(*SMOKE, *command, "--procs", "2", cwd=tmp_path, env=cli_env())
    assert again.returncode == 2
    assert "world_size (deepcluster-v2's memory bank is per rank): 1 -> 2" in again.stderr


# ---- two ranks ----------------------------------------------------------------------------------


def test_sela_v2_on_two_gloo_ranks_equals_one_process(tmp_path: Path, images: str) -> None:
    """The offline Sinkhorn is global (sums all-reduced) and the init pass and steps use SyncBN, so
    2 ranks x 4 images train as 1 x 8: the same labels, the same weights to fp32 summation order."""
    common = ("--method", "sela-v2", *SETS, "--data", images, "--max-steps", "4")
    one = _pretrain(tmp_path, *common, "--batch-size", "8", "--out", "one")
    two = _pretrain(tmp_path, *common, "--batch-size", "4", "--procs", "2", "--out", "two")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert math.isclose(one["final_loss"], two["final_loss"], rel_tol=1e-5)
    a, b = _state(tmp_path / "one", 4), _state(tmp_path / "two", 4)
    assert torch.equal(a["sela_bank"][0]["labels"], b["sela_bank"][0]["labels"])
    noise = {"head.0.bias", "head.1.running_mean"}  # see test_distributed: arbitrary in both runs
    for key, value in a["model"].items():
        if key not in noise and value.dtype.is_floating_point:
            torch.testing.assert_close(b["model"][key], value, atol=5e-6, rtol=1e-5, msg=key)
