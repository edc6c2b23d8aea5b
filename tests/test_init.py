"""``swavctl pretrain --init PATH``: a run that starts from weights (swavctl/weights/init_weights.py).

The sources are real files: a swavctl export written by the exporter, torchvision ResNet-18
state dicts saved with ``torch.save`` and as safetensors (classifier included), and a checkpoint
in the official facebookresearch/swav layout (``module.`` prefixes, ``projection_head.*``,
``prototypes.weight``, wrapped in ``{"epoch", "state_dict", "optimizer"}``), built here as the
official training script saves it.

"Step 0" is read from a real run's checkpoint: the run is given a stop flag that has already
recorded SIGTERM, so it checkpoints at its first step boundary, before any step, and stops.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import signal
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import swavctl
from swavctl import config
from swavctl.distributed.stop import StopFlag
from swavctl.errors import UserError
from swavctl.files.latest import latest_run
from swavctl.train.build import build_model
from swavctl.train.loop import Interrupted, pretrain
from swavctl.weights.export import write_export
from swavctl.weights.init_weights import arch_of_init, read_init
from swavctl.weights.pickles import load_pickle_weights
from tests.conftest import cli_env, run_cli, write_image_folder


class _Lines:
    """A reporter that keeps the loop's lines."""

    def __init__(self) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def start(self, total_steps: int, done_steps: int, *, steps_per_epoch: int = 0) -> None:
        pass

    def step(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _resnet18(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 state dict, classifier included, with non-trivial BN statistics."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18().state_dict()
    g = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.copy_(torch.randn(value.shape, generator=g) * 0.1)
        elif key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=g) + 0.5)
        elif key.endswith("num_batches_tracked"):
            value.fill_(321)
    return state


def _official_layout(backbone: dict[str, torch.Tensor], *, hidden: int, out: int, k: int) -> dict[str, Any]:
    """An official SwAV checkpoint: DDP keys, an MLP projection head and prototypes, no classifier."""
    g = torch.Generator().manual_seed(7)
    last = "layer4.2.bn3.weight" if "layer4.2.bn3.weight" in backbone else "layer4.1.bn2.weight"
    d = backbone[last].shape[0]  # the pooled feature dimension: 2048 (ResNet-50), 512 (ResNet-18)
    state = {key: value for key, value in backbone.items() if not key.startswith("fc.")}
    state.update(
        {
            "projection_head.0.weight": torch.randn(hidden, d, generator=g) * 0.05,
            "projection_head.0.bias": torch.randn(hidden, generator=g) * 0.05,
            "projection_head.1.weight": torch.rand(hidden, generator=g) + 0.5,
            "projection_head.1.bias": torch.randn(hidden, generator=g) * 0.1,
            "projection_head.1.running_mean": torch.randn(hidden, generator=g) * 0.1,
            "projection_head.1.running_var": torch.rand(hidden, generator=g) + 0.5,
            "projection_head.1.num_batches_tracked": torch.tensor(99),
            "projection_head.3.weight": torch.randn(out, hidden, generator=g) * 0.1,
            "projection_head.3.bias": torch.randn(out, generator=g) * 0.1,
            "prototypes.weight": torch.nn.functional.normalize(torch.randn(k, out, generator=g), dim=1),
        }
    )
    return {
        "epoch": 800,
        "state_dict": {f"module.{key}": value for key, value in state.items()},
        "optimizer": {"state": {}, "param_groups": []},
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Images and every kind of source, written once for the module."""
    root = tmp_path_factory.mktemp("init-sources")
    images = write_image_folder(root / "images")
    smoke = config.resolve(preset="smoke", overrides=["train.seed=123"])
    model = build_model(smoke)  # a convnet-tiny SwAV of the smoke preset's head, other weights than seed 0
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
    write_export(model, root / "model.safetensors", settings=smoke, step=8, epoch=2, with_head=True)
    write_export(model, root / "backbone.safetensors", settings=smoke, step=8, epoch=2, with_head=False)
    tv18 = _resnet18(seed=5)
    torch.save(tv18, root / "tv18.pth")
    save_file({k: v.contiguous() for k, v in tv18.items()}, root / "tv18.safetensors")
    official = _official_layout(_resnet18(seed=6), hidden=32, out=16, k=8)  # the smoke preset's head
    torch.save(official, root / "swav_official.pth.tar")
    return {
        "root": root,
        "images": images,
        "export": {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
        | {f"head.{k}": v for k, v in model.head.state_dict().items()}
        | {"prototypes.weight": model.prototypes.weight.detach().clone()},
        "tv18": tv18,
        "official": {k[len("module.") :]: v for k, v in official["state_dict"].items()},
    }


def _step_zero(source: Path, images: Path, out: Path) -> tuple[dict[str, torch.Tensor], list[str], Any]:
    """The model state of a new ``--init source`` run at step 0 (from its checkpoint), its lines
    and its settings."""
    settings = swavctl.load_settings("smoke", data=str(images), out=str(out), gpus=0, init=str(source))
    stop = StopFlag()
    stop.received.add(signal.SIGTERM)  # heard before the first step: a checkpoint at step 0
    lines = _Lines()
    with contextlib.chdir(out.parent), pytest.raises(Interrupted):
        pretrain(settings, reporter=lines, stop=stop)
    state = load_pickle_weights(out / "checkpoints" / "step-000000000.pt")
    assert state["step"] == 0
    return state["model"], [line for line in lines.infos if line.startswith("init:")], settings


def _assert_equal(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_step_zero_is_a_swavctl_export_with_its_head(sources: dict[str, Any], tmp_path: Path) -> None:
    state, lines, settings = _step_zero(
        sources["root"] / "model.safetensors", sources["images"], tmp_path / "r"
    )
    assert set(state) == set(sources["export"])
    _assert_equal(state, sources["export"])  # every tensor: backbone, head and prototypes
    assert settings.model.init == str(sources["root"] / "model.safetensors")
    assert lines[0] == (
        f"init: swavctl export {sources['root'] / 'model.safetensors'}: loaded the backbone (convnet-tiny, "
        "30 tensors), the projection head and the prototypes"
    )


def test_a_backbone_export_gives_the_backbone_and_a_new_head(sources: dict[str, Any], tmp_path: Path) -> None:
    state, lines, _ = _step_zero(sources["root"] / "backbone.safetensors", sources["images"], tmp_path / "r")
    backbone = {k: v for k, v in sources["export"].items() if k.startswith("backbone.")}
    _assert_equal(state, backbone)
    # The head is the new one of the run's seed (0), not the source's (123).
    assert not torch.equal(state["head.0.weight"], sources["export"]["head.0.weight"])
    assert lines[0].endswith(
        "loaded the backbone (convnet-tiny, 30 tensors); a new projection head and new prototypes "
        "(the source has none)"
    )


@pytest.mark.parametrize("name", ["tv18.pth", "tv18.safetensors"])
def test_step_zero_is_a_torchvision_state_dict_without_its_classifier(
    sources: dict[str, Any], tmp_path: Path, name: str
) -> None:
    source = sources["root"] / name
    state, lines, settings = _step_zero(source, sources["images"], tmp_path / "r")
    # The smoke preset's convnet-tiny gives way to the weights' architecture.
    assert settings.model.arch == "resnet18"
    expected = {f"backbone.{k}": v for k, v in sources["tv18"].items() if not k.startswith("fc.")}
    assert {k for k in state if k.startswith("backbone.")} == set(expected)
    _assert_equal(state, expected)
    assert lines == [
        f"init: dropped the classifier of {source} (fc.bias, fc.weight): SwAV has none",
        f"init: state dict {source}: loaded the backbone (resnet18, 120 tensors); a new projection head "
        "and new prototypes (the source has none)",
    ]


def test_step_zero_is_an_official_checkpoint(sources: dict[str, Any], tmp_path: Path) -> None:
    source = sources["root"] / "swav_official.pth.tar"
    state, lines, _ = _step_zero(source, sources["images"], tmp_path / "r")
    official = sources["official"]
    expected = {
        ("backbone." + k if not k.startswith(("projection_head.", "prototypes.")) else k): v
        for k, v in official.items()
    }
    expected = {k.replace("projection_head.", "head."): v for k, v in expected.items()}
    assert set(state) == set(expected)
    _assert_equal(state, expected)
    assert lines == [
        f"init: official SwAV checkpoint {source}: loaded the backbone (resnet18, 120 tensors), the "
        "projection head and the prototypes"
    ]


def test_a_source_with_several_prototype_sets_gives_its_head_and_new_prototypes(
    sources: dict[str, Any], tmp_path: Path
) -> None:
    """An official MultiPrototypes checkpoint (DeepCluster-v2's layout) for a one-set SwAV run."""
    official = _official_layout(_resnet18(seed=6), hidden=32, out=16, k=8)
    state = official["state_dict"]
    weight = state.pop("module.prototypes.weight")
    state["module.prototypes.prototypes0.weight"] = weight
    state["module.prototypes.prototypes1.weight"] = weight.flip(0)
    torch.save(official, tmp_path / "dcv2.pth.tar")
    model, lines, _ = _step_zero(tmp_path / "dcv2.pth.tar", sources["images"], tmp_path / "r")
    assert torch.equal(model["head.3.weight"], state["module.projection_head.3.weight"])
    assert not torch.equal(model["prototypes.weight"], weight)
    assert lines == [
        f"init: official SwAV checkpoint {tmp_path / 'dcv2.pth.tar'}: loaded the backbone (resnet18, 120 "
        "tensors) and the projection head; new prototypes (the source's 8 x 16 + 8 x 16 do not fit this "
        "run's 8 x 16)"
    ]


def test_an_official_file_is_accepted_end_to_end(sources: dict[str, Any], tmp_path: Path) -> None:
    """The command as a user types it; the source's path and SHA-256 go into resolved.toml and
    summary.json; a head that does not fit the run's is new, and the line says why."""
    source = sources["root"] / "swav_official.pth.tar"
    result = run_cli(
        "pretrain", "--preset", "smoke", "--data", str(sources["images"]), "--init", str(source),
        "--out", "run", "--max-steps", "1", "--set", "model.prototypes=5", cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        f"init: official SwAV checkpoint {source}: loaded the backbone (resnet18, 120 tensors) and the "
        "projection head; new prototypes (the source's 8 x 16 do not fit this run's 5 x 16)"
    ) in result.stderr.splitlines()
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    resolved = tomllib.loads((tmp_path / "run" / "resolved.toml").read_text())
    assert resolved["model"]["arch"] == "resnet18"
    assert resolved["model"]["init"] == str(source) and resolved["model"]["init_sha256"] == sha
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["init"] == {"path": str(source), "sha256": sha}


def test_a_wrong_architecture_is_refused_naming_keys(sources: dict[str, Any], tmp_path: Path) -> None:
    result = run_cli(
        "pretrain", "--preset", "smoke", "--data", str(sources["images"]), "--out", "run",
        "--init", str(sources["root"] / "tv18.safetensors"), "--arch", "resnet34",
        cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"error: {sources['root'] / 'tv18.safetensors'}: its backbone does not match --arch resnet34: "
        "missing 96 key(s): layer1.2.bn1.bias, layer1.2.bn1.num_batches_tracked, "
    )
    assert ", ... and 86 more" in line and "unexpected" not in line
    assert line.endswith("it is a resnet18 backbone: drop --arch to use it as it is")
    assert not (tmp_path / "run").exists()
    # A shape mismatch, and a swavctl source of another architecture, are listed alike.
    with pytest.raises(UserError, match=r"1 shape mismatch\(es\): conv1\.weight \[64, 3, 7, 7\] \(expected "):
        read_init(sources["root"] / "tv18.pth", arch="resnet18-small", arch_where="--arch")
    with pytest.raises(
        UserError,
        match=r"missing 120 key\(s\): bn1\.bias, .*, \.\.\. and 110 more; unexpected 30 key\(s\): "
        r"features\.0\.weight, .*; it is a convnet-tiny backbone",
    ):
        read_init(sources["root"] / "model.safetensors", arch="resnet18", arch_where="--arch")


def test_the_architecture_of_each_source(sources: dict[str, Any], tmp_path: Path) -> None:
    root = sources["root"]
    assert arch_of_init(root / "model.safetensors") == "convnet-tiny"
    assert arch_of_init(root / "tv18.pth") == arch_of_init(root / "tv18.safetensors") == "resnet18"
    assert arch_of_init(root / "swav_official.pth.tar") == "resnet18"
    # A state dict of no known ResNet is refused, compared with the nearest.
    odd = {k: v for k, v in sources["tv18"].items() if not k.startswith("layer4.1.")}
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(UserError, match=r"its backbone is none of resnet18, .*; compared with the nearest, "
                       r"resnet18: missing 12 key\(s\): layer4\.1\.bn1\.bias"):  # fmt: skip
        arch_of_init(tmp_path / "odd.pth")


def test_malformed_and_missing_sources_are_refused(sources: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="bad.safetensors: not a valid safetensors file: header is not valid"):
        read_init(tmp_path / "bad.safetensors")
    (tmp_path / "code.pth").write_bytes(pickle.dumps(print, protocol=2))  # builds a callable, not weights
    with pytest.raises(UserError, match="code.pth: refused for safety"):
        read_init(tmp_path / "code.pth")
    with pytest.raises(UserError, match=r"^--init nowhere\.pth: no such file or folder; pass a swavctl run"):
        read_init("nowhere.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="list.pth: expected a state dict, got list"):
        read_init(tmp_path / "list.pth")


def test_resuming_an_init_run_does_not_reload_the_init(sources: dict[str, Any], tmp_path: Path) -> None:
    """Stopped and resumed, the run ends with the very weights of an uninterrupted one: the resume
    continued from the checkpoint and did not put the source's weights back."""
    source = tmp_path / "src.safetensors"
    source.write_bytes((sources["root"] / "model.safetensors").read_bytes())
    command = ["pretrain", "--preset", "smoke", "--gpus", "0", "--data", str(sources["images"]),
               "--init", str(source)]  # fmt: skip
    whole = run_cli(*command, "--out", "whole", cwd=tmp_path, env=cli_env())
    assert whole.returncode == 0, whole.stderr
    crashed = run_cli(*command, cwd=tmp_path, env=cli_env(SWAVCTL_TEST_RAISE_AT="0:3"))
    assert crashed.returncode == 1 and "init: swavctl export" in crashed.stderr
    again = run_cli(*command, cwd=tmp_path, env=cli_env())  # the same command: it resumes
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr and "(step 2)" in again.stderr
    assert "init:" not in again.stderr and "other settings" not in again.stderr
    run = latest_run(tmp_path / "runs")
    assert run is not None
    ends = [
        load_pickle_weights(max((folder / "checkpoints").glob("step-*.pt")))
        for folder in (tmp_path / "whole", run)
    ]
    assert ends[0]["step"] == ends[1]["step"] == 8
    for key, value in ends[0]["model"].items():
        assert torch.equal(value, ends[1]["model"][key]), key
    # runs/latest (a pointer file) and paths through it name that run as --init sources.
    assert read_init(tmp_path / "runs" / "latest").path == run / "checkpoints" / "step-000000008.pt"
    assert read_init(tmp_path / "runs" / "latest" / "backbone.safetensors").kind == "swavctl export"
    # The suggested command extends it without the source, which is gone: it is not read again.
    source.unlink()
    longer = run_cli("pretrain", "--preset", str(run / "resolved.toml"), "--out", str(run), "--epochs", "3",
                     cwd=tmp_path, env=cli_env())  # fmt: skip
    assert longer.returncode == 0, longer.stderr
    assert "init:" not in longer.stderr and json.loads((run / "summary.json").read_text())["steps"] == 12


def test_a_run_from_a_good_model_learns_faster_than_from_scratch(tmp_path: Path) -> None:
    """A model pretrained on the demo's train/ digits starts a run on a second folder, the val/
    digits; the same run from scratch is the baseline. After the same 10 steps (two epochs of the
    second folder, the same recipe and seed), the prototypes of the run from the good model split
    the digits by class far better: NMI of its prototype assignments against the labels, as
    ``swavctl inspect-clusters`` measures it for both runs.

    Measured with this recipe (seeds 31, 1, 2, 3; the good model had NMI 0.34, 0.39, 0.36, 0.32):
    from the good model 0.42, 0.44, 0.35, 0.37; from scratch 0.09, 0.09, 0.00, 0.00 (and after
    20 steps still only 0.27, 0.28, 0.18, 0.22). The bound, a lead of 0.2, is under every seed's
    (0.33 to 0.37). A run whose --init were not loaded would be the scratch run, bit for bit.
    About 25 s on a loaded 2-core machine (three short runs of the demo's tiny convnet).
    """
    from swavctl.data.demo import demo_dataset
    from swavctl.inspect.run import InspectOptions, inspect_clusters

    digits = demo_dataset()
    second = digits / "val"

    def run(name: str, data: Path, **keywords: Any) -> float:
        settings = swavctl.load_settings(
            "demo", data=str(data), out=str(tmp_path / name), epochs=2, batch_size=64, gpus=0, **keywords,
            overrides={"monitor.knn_data": None, "optim.base_lr": 0.6, "swav.freeze_prototypes_steps": 0},
        )  # fmt: skip
        with contextlib.chdir(tmp_path):
            swavctl.pretrain(settings)
        clusters = inspect_clusters(
            InspectOptions(model=tmp_path / name, data=str(second), out=tmp_path / name / "clusters",
                           per_cluster=1, thumb=16, gpus=0, workers=0)
        )  # fmt: skip
        return float(clusters["nmi"])

    good = run("good", digits / "train")
    scratch = run("scratch", second)
    warm = run("warm", second, init=str(tmp_path / "good"))
    assert scratch < 0.2 < good  # the baseline has not learnt the classes yet; the source has
    assert warm >= scratch + 0.2, (warm, scratch, good)


def _fake_official_resnet50(path: Path) -> None:
    """A stand-in for the official ``swav_800ep_pretrain.pth.tar``, laid out as the release is (a
    bare state dict, ``module.`` keys; the paper's head: 2048 -> 2048 -> 128, 3000 prototypes)."""
    torch.manual_seed(0)
    backbone = torchvision.models.resnet50().state_dict()
    state = _official_layout(backbone, hidden=2048, out=128, k=3000)["state_dict"]
    torch.save(state, path)


def test_the_quickstart_example_runs_as_printed(tmp_path: Path) -> None:
    """docs/quickstart.md's "Continue pretraining from ImageNet SwAV weights", on a stand-in for
    the official file (no download here) and tiny folders under a stand-in home: the pretraining as
    printed plus a cap of one step of 2 images (its ResNet-50 at 224 px would take hours on a CPU,
    and 16 GB at its batch of 64), whose first line is the one shown; then the evaluation of that
    run as printed. (The import and its evaluation are ``export --from-official``'s, tested with it.)"""
    text = (Path(__file__).resolve().parents[1] / "docs" / "quickstart.md").read_text()
    section = text.split("## Continue pretraining from ImageNet SwAV weights", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in section.split("```bash", 1)[1].split("```", 1)[0].splitlines()]
    commands = [line for line in commands if line.startswith("swavctl ")]
    shown = section.split("```text", 1)[1].split("```", 1)[0].strip()
    assert len(commands) == 4 and commands[0].startswith("swavctl pretrain ")
    _fake_official_resnet50(tmp_path / "swav_800ep_pretrain.pth.tar")
    write_image_folder(tmp_path / "photos", classes=1, per_class=4, size=40, fmt="jpg")
    write_image_folder(tmp_path / "photos-labelled", classes=2, per_class=5, size=40, fmt="jpg")
    env = cli_env(HOME=str(tmp_path))
    capped = ["--batch-size", "2", "--max-steps", "1", "--set", "data.workers=0"]
    for number, command in enumerate(commands):
        if number in (1, 2):  # the import and its evaluation: export --from-official's own tests run them
            continue
        args = [arg.replace("~", str(tmp_path)) for arg in command.split()[1:]]
        result = run_cli(*args, *(capped if number == 0 else []), cwd=tmp_path, env=env, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        if number == 0:
            assert shown.replace("/home/me", str(tmp_path)) in result.stderr.splitlines()
    report = json.loads((tmp_path / "runs" / "photos-swav" / "eval-fast" / "eval.json").read_text())
    assert report["mode"] == "fast"
