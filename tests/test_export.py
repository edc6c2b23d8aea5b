"""`swavctl export`: round trips into torchvision, --with-head, --dtype, metadata, --info, recipes.

The run under test is a real 2-step resnet18 pretraining (32/16 px crops) in a subprocess; the
references are the checkpoint's own tensors loaded into torchvision models by hand, never swavctl's
loader, and the payload hash is recomputed from the raw file bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import swavctl
from swavctl.cli.app import app
from swavctl.config import validate
from swavctl.errors import UserError
from swavctl.model.backbones import build_backbone
from swavctl.model.swav import SwAV
from swavctl.weights.export import write_export, write_export_tensors
from swavctl.weights.model_io import export_run, load_model
from tests.conftest import REPO, run_cli, write_image_folder

HEAD_KEYS = {
    "head.0.weight",
    "head.0.bias",
    "head.1.weight",
    "head.1.bias",
    "head.1.running_mean",
    "head.1.running_var",
    "head.1.num_batches_tracked",
    "head.3.weight",
    "head.3.bias",
    "prototypes.weight",
}


@pytest.fixture(scope="module")
def run18(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real 2-step resnet18 pretraining run and its final checkpoint's state."""
    root = tmp_path_factory.mktemp("run18")
    images = write_image_folder(root / "images")
    result = run_cli(
        "pretrain",
        "--preset",
        "smoke",
        "--gpus",
        "0",
        "--data",
        str(images),
        "--arch",
        "resnet18",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--out",
        "r18",
        "--set",
        "data.crop_sizes=[32, 16]",
        cwd=root,
        env={"SWAVCTL_CACHE": str(root / "cache")},
    )
    assert result.returncode == 0, result.stderr
    ckpts = sorted((root / "r18" / "checkpoints").glob("step-*.pt"))
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    return {"root": root, "run": root / "r18", "ckpt": ckpts[-1], "state": state}


def _in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real CLI app invoked in this process (no interpreter start-up; same exit codes/output)."""
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(previous)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += f"\n{type(result.exception).__name__}: {result.exception}"
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


@pytest.fixture(scope="module")
def exports(run18: dict[str, Any]) -> dict[str, Any]:
    """The run exported through the real CLI: fp32 backbone, backbone+head, bf16 backbone."""
    root = run18["root"]
    jobs = {
        "fp32": ("r18", "--out", "rt.safetensors", "--json"),
        "head": (str(run18["ckpt"]), "--with-head", "--out", "head.safetensors", "--json"),
        "bf16": ("r18", "--dtype", "bf16", "--out", "half-bf16.safetensors", "--json"),
    }
    paths: dict[str, Any] = {}
    for name, args in jobs.items():
        # The round-trip export runs as a real process; the others in-process, to save start-ups.
        run = run_cli if name == "fp32" else _in_process
        result = run("export", *args, cwd=root)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        paths[name] = root / summary["path"]
        paths[name + "-summary"] = summary
    return paths


def _torchvision_resnet18(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(state, strict=True)
    return model.eval()


def _backbone_of(ckpt_model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("backbone.") :]: v for k, v in ckpt_model.items() if k.startswith("backbone.")}


def _images(seed: int, size: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _independent_payload_sha256(path: Path) -> str:
    """The documented payload hash, recomputed from the file's raw bytes (not through torch)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]

    def blob(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    h = hashlib.sha256()
    for key in sorted(header):
        entry = header[key]
        begin, end = entry["data_offsets"]
        h.update(blob(key.encode()))
        h.update(blob(entry["dtype"].encode()))
        h.update(
            struct.pack("<Q", len(entry["shape"])) + b"".join(struct.pack("<Q", d) for d in entry["shape"])
        )
        h.update(blob(data[begin:end]))
    return h.hexdigest()


# ---- round trip ------------------------------------------------------------------------------


def test_round_trip_features_identical_in_torchvision(run18: dict[str, Any], exports: dict[str, Any]) -> None:
    root = run18["root"]
    summary = exports["fp32-summary"]
    assert summary["path"] == "rt.safetensors" and summary["contents"] == "backbone"
    assert summary["source"] == str(Path("r18") / "checkpoints" / run18["ckpt"].name) and summary["step"] == 2

    expected = _backbone_of(run18["state"]["model"])
    exported = load_file(root / "rt.safetensors")
    assert set(exported) == set(expected)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)

    from_ckpt = _torchvision_resnet18(expected)
    from_export = _torchvision_resnet18(exported)  # strict: nothing missing or unexpected
    via_swavctl = load_model(root / "rt.safetensors").model.backbone
    with torch.no_grad():
        for seed, size in ((0, 32), (1, 64)):
            x = _images(seed, size)
            reference = from_ckpt(x)
            assert reference.shape == (4, 512)
            assert (from_export(x) - reference).abs().max().item() == 0.0
            assert (via_swavctl(x) - reference).abs().max().item() == 0.0


def test_with_head_keys_and_values(run18: dict[str, Any], exports: dict[str, Any]) -> None:
    root = run18["root"]
    assert exports["head-summary"]["contents"] == "backbone+head"
    tensors = load_file(root / "head.safetensors")
    backbone = _backbone_of(run18["state"]["model"])
    assert set(tensors) == set(backbone) | HEAD_KEYS
    for key in HEAD_KEYS:
        assert torch.equal(tensors[key], run18["state"]["model"][key]), key
    assert tensors["prototypes.weight"].shape == (8, 16)  # smoke: K = 8, D = 16
    assert tensors["head.0.weight"].shape == (32, 512)  # hidden 32 x d 512
    with safe_open(root / "head.safetensors", "pt") as f:
        assert f.metadata()["contents"] == "backbone+head"
    loaded = load_model(root / "head.safetensors")
    assert loaded.has_head and loaded.kind == "export"
    assert torch.equal(loaded.model.prototypes.weight, run18["state"]["model"]["prototypes.weight"])
    # The head-bearing file still loads into torchvision once the head keys are set aside.
    _torchvision_resnet18({k: v for k, v in tensors.items() if k not in HEAD_KEYS})


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "safetensors_name"),
    [("bf16", torch.bfloat16, "BF16"), ("fp16", torch.float16, "F16")],
)
def test_half_precision_round_trip(
    run18: dict[str, Any],
    exports: dict[str, Any],
    dtype: str,
    torch_dtype: torch.dtype,
    safetensors_name: str,
) -> None:
    root = run18["root"]
    out = f"half-{dtype}.safetensors"
    if dtype == "fp16":  # the CLI path is exercised by bf16; this is the function behind it
        export_run(run18["run"], out=root / out, with_head=False, dtype=dtype)
    assert (root / out).is_file()
    tensors = load_file(root / out)
    expected = _backbone_of(run18["state"]["model"])
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            assert tensors[key].dtype == torch.int64 and torch.equal(tensors[key], value)
        else:
            assert tensors[key].dtype == torch_dtype, key
            assert torch.equal(tensors[key], value.to(torch_dtype)), key
    header = json.loads(
        (root / out).read_bytes()[8 : 8 + struct.unpack("<Q", (root / out).read_bytes()[:8])[0]]
    )
    assert header["conv1.weight"]["dtype"] == safetensors_name
    assert header["__metadata__"]["dtype"] == dtype
    # Strict load into an fp32 torchvision model gives the rounded weights, and the same features
    # as a model holding the checkpoint's weights rounded to that dtype by hand.
    rounded = {k: (v.to(torch_dtype).float() if v.is_floating_point() else v) for k, v in expected.items()}
    x = _images(2, 32)
    with torch.no_grad():
        assert torch.equal(_torchvision_resnet18(tensors)(x), _torchvision_resnet18(rounded)(x))
        assert torch.equal(load_model(root / out).model.backbone(x), _torchvision_resnet18(rounded)(x))


# ---- metadata and --info ---------------------------------------------------------------------


def test_metadata_keys_values_and_payload_hash(run18: dict[str, Any], exports: dict[str, Any]) -> None:
    root = run18["root"]
    path = exports["fp32"]
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    resolved = tomllib.loads((run18["run"] / "resolved.toml").read_text())
    assert meta["format"] == "swavctl-export" and meta["format_version"] == "1"
    assert meta["arch"] == "resnet18" and meta["torchvision_arch"] == "resnet18"
    assert meta["feature_dim"] == "512" and meta["num_prototypes"] == "8"
    assert meta["hidden_dim"] == "32" and meta["embedding_dim"] == "16"
    assert json.loads(meta["mean"]) == resolved["data"]["augment"]["mean"]
    assert json.loads(meta["std"]) == resolved["data"]["augment"]["std"] == [0.228, 0.224, 0.225]
    assert meta["crop_size"] == "32" and json.loads(meta["crop_sizes"]) == [32, 16]
    assert meta["swavctl_version"] == swavctl.__version__
    assert meta["step"] == str(run18["state"]["step"]) == "2"
    assert meta["epoch"] == str(run18["state"]["epoch"])
    assert meta["dtype"] == "fp32" and meta["contents"] == "backbone" and meta["source"] == "swavctl"
    assert meta["source_file"] == run18["ckpt"].name
    assert meta["source_sha256"] == hashlib.sha256(run18["ckpt"].read_bytes()).hexdigest()
    settings = json.loads(meta["settings"])
    for section in ("model", "swav", "optim"):  # TOML has no null: None values are absent from resolved.toml
        assert {k: v for k, v in settings[section].items() if v is not None} == resolved[section]
    assert re.fullmatch(r"[0-9a-f]{64}", meta["payload_sha256"])
    assert meta["payload_sha256"] == _independent_payload_sha256(path)

    # --info prints the same metadata from the header; --verify recomputes the hash.
    info = run_cli("export", "--info", path.name, "--verify", "--json", cwd=root)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["metadata"] == meta and summary["verified"] is True
    assert summary["tensors"] == 120 and summary["bytes"] == path.stat().st_size
    assert summary["parameters"] == sum(p.numel() for p in _backbone_of(run18["state"]["model"]).values())
    human = CliRunner().invoke(app, ["export", "--info", str(path)])
    assert human.exit_code == 0 and human.stdout == ""
    assert "payload_sha256" in human.stderr and meta["payload_sha256"] in human.stderr


def test_tampered_payload_is_caught(exports: dict[str, Any], tmp_path: Path) -> None:
    source = exports["fp32"]
    raw = bytearray(source.read_bytes())
    raw[-3] ^= 0x01  # one bit of the last tensor's data; the header stays valid
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(raw))
    assert _independent_payload_sha256(bad) != _independent_payload_sha256(source)
    result = CliRunner().invoke(app, ["export", "--info", str(bad), "--verify"])
    assert result.exit_code == 2 and "does not match" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="payload_sha256"):
        load_model(bad)


# ---- exports from in-process models: docs recipes, refusals ----------------------------------


def _settings(arch: str) -> Any:
    return validate({"model": {"arch": arch, "hidden_dim": 8, "embedding_dim": 4, "prototypes": 5}})


def _recipes() -> dict[str, str]:
    text = (REPO / "docs" / "export.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return {m.group(1): b for b in blocks if (m := re.match(r"# recipe: (\S+)\n", b))}


def _randomize_bn(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial batch-norm statistics, so a recipe that mixes up buffers cannot pass."""
    g = torch.Generator().manual_seed(seed)
    for name, buffer in module.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)


@pytest.mark.parametrize(("arch", "size"), [("resnet18-small", 16), ("convnet-tiny", 16), ("resnet18", 32)])
def test_docs_recipe_loads_strictly_with_equal_features(
    arch: str, size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipes()["resnet50" if arch == "resnet18" else arch]
    if arch == "resnet18":  # the torchvision recipe, with the smaller factory
        recipe = recipe.replace("resnet50()", "resnet18()")
    torch.manual_seed(0)
    model = SwAV(arch, 8, 4, 5).eval()
    _randomize_bn(model.backbone, 1)
    write_export(
        model,
        tmp_path / "backbone.safetensors",
        settings=_settings(arch),
        step=None,
        epoch=None,
        with_head=False,
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(recipe, f"docs/export.md:{arch}", "exec"), namespace)  # strict load_state_dict inside
    x = _images(3, size)
    with torch.no_grad():
        assert (namespace["model"](x) - model.backbone(x)).abs().max().item() == 0.0


def test_docs_wide_recipe_matches_backbone_layout() -> None:
    """The wide recipe builds exactly swavctl's resnet50w2 layout (checked on the meta device)."""
    recipe = _recipes()["resnet50w2"]
    definition = recipe.split("\nmodel = ")[0]
    namespace: dict[str, Any] = {}
    exec(compile(definition, "docs/export.md:resnet50w2", "exec"), namespace)
    for w in (2, 4):
        with torch.device("meta"):
            ours, dim = build_backbone(f"resnet50w{w}")
            theirs = namespace["swav_resnet50w"](w)
        assert dim == 2048 * w
        assert {k: v.shape for k, v in theirs.state_dict().items()} == {
            k: v.shape for k, v in ours.state_dict().items()
        }
        assert [type(m).__name__ for m in list(theirs.modules())[1:]] == [
            type(m).__name__ for m in list(ours.modules())[1:]
        ]


def test_non_finite_and_overflow_refused_on_export(run18: dict[str, Any], tmp_path: Path) -> None:
    state = dict(run18["state"])
    weights = dict(state["model"])
    weights["backbone.layer1.0.conv1.weight"] = weights["backbone.layer1.0.conv1.weight"].clone()
    weights["backbone.layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["model"] = weights
    torch.save(state, tmp_path / "nan.pt")
    result = _in_process("export", "nan.pt", "--out", "nan.safetensors", cwd=tmp_path)
    assert (
        result.returncode == 2 and "NaN or Inf" in result.stderr and "layer1.0.conv1.weight" in result.stderr
    )
    assert not (tmp_path / "nan.safetensors").exists()
    assert not list(tmp_path.glob(".nan.safetensors*"))

    settings = _settings("convnet-tiny")
    big = {"features.0.weight": torch.full((2, 2), 1e6)}
    with pytest.raises(UserError, match="does not fit in fp16"):
        write_export_tensors(
            big,
            tmp_path / "big.safetensors",
            settings=settings,
            feature_dim=128,
            step=None,
            epoch=None,
            with_head=False,
            dtype="fp16",
        )
    assert not (tmp_path / "big.safetensors").exists()
    # bf16 has fp32's range: the same values export (rounded).
    write_export_tensors(
        big,
        tmp_path / "big.safetensors",
        settings=settings,
        feature_dim=128,
        step=None,
        epoch=None,
        with_head=False,
        dtype="bf16",
    )
    assert load_file(tmp_path / "big.safetensors")["features.0.weight"].dtype == torch.bfloat16


def test_settings_declaring_a_huge_head_are_refused_without_allocating(tmp_path: Path) -> None:
    model = SwAV("convnet-tiny", 8, 4, 5)
    good = tmp_path / "tiny.safetensors"
    write_export(model, good, settings=_settings("convnet-tiny"), step=None, epoch=None, with_head=False)
    tensors = load_file(good)
    with safe_open(good, "pt") as f:
        meta = f.metadata()
    settings = json.loads(meta["settings"])
    settings["model"]["prototypes"] = 2**40  # 2**42 elements if it were ever built
    from safetensors.torch import save_file

    save_file(
        tensors, str(tmp_path / "huge.safetensors"), metadata={**meta, "settings": json.dumps(settings)}
    )
    with pytest.raises(UserError, match="implausible"):
        load_model(tmp_path / "huge.safetensors")
    # And an unknown architecture in the metadata is a one-line error, not a traceback.
    settings["model"]["prototypes"] = 5
    settings["model"]["arch"] = "resnet51"
    save_file(
        tensors, str(tmp_path / "arch.safetensors"), metadata={**meta, "settings": json.dumps(settings)}
    )
    with pytest.raises(UserError, match="unknown backbone 'resnet51'"):
        load_model(tmp_path / "arch.safetensors")


def test_keys_that_do_not_match_are_listed(tmp_path: Path) -> None:
    model = SwAV("convnet-tiny", 8, 4, 5)
    good = tmp_path / "tiny.safetensors"
    write_export(model, good, settings=_settings("convnet-tiny"), step=None, epoch=None, with_head=False)
    tensors = load_file(good)
    with safe_open(good, "pt") as f:
        meta = f.metadata()
    tensors["fc.weight"] = torch.zeros(2, 2)
    del tensors["features.0.weight"]
    from safetensors.torch import save_file

    meta.pop("payload_sha256")
    save_file(tensors, str(tmp_path / "keys.safetensors"), metadata=meta)
    with pytest.raises(
        UserError, match=r"missing keys \[features\.0\.weight\]; unexpected keys \[fc\.weight\]"
    ):
        load_model(tmp_path / "keys.safetensors")


# ---- command-line usage errors (in-process runner: argument handling only) ------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--info", "a.safetensors", "--from-official", "b.pth"], "cannot be combined"),
        (["--from-official", "b.pth", "--out", "c.safetensors"], "needs --arch"),
        (["--from-official", "b.pth", "--arch", "resnet50"], "needs --out"),
        (["some-run", "--arch", "resnet50"], "--arch goes with --from-official"),
        (["some-run", "--verify"], "--verify goes with --info"),
        (["missing-run", "--dtype", "fp8"], "--dtype must be one of fp32, bf16, fp16"),
        (["missing-run", "--out", "x.pt"], "should end in .safetensors"),
        (["missing-run"], "model not found"),
        (["--info", "missing.safetensors"], "no such file"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_refuses_to_overwrite_its_source_and_needs_a_head(run18: dict[str, Any], tmp_path: Path) -> None:
    shutil.copy(run18["run"] / "backbone.safetensors", tmp_path / "backbone.safetensors")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "backbone.safetensors")])
    assert result.exit_code == 2 and "overwrite its own source" in result.output
    result = CliRunner().invoke(
        app, ["export", str(tmp_path), "--with-head", "--out", str(tmp_path / "h.safetensors")]
    )
    assert result.exit_code == 2 and "no projection head" in result.output


def test_pretrain_writes_a_loadable_export(run18: dict[str, Any]) -> None:
    """The export `pretrain` writes at the end carries the same metadata and loads everywhere."""
    path = run18["run"] / "backbone.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "swavctl-export" and meta["payload_sha256"] == _independent_payload_sha256(path)
    _torchvision_resnet18(load_file(path))
    assert load_model(run18["run"]).kind == "checkpoint"  # a run folder resolves to its checkpoint


def test_timm_recipes_when_timm_is_installed(tmp_path: Path) -> None:
    """docs/export.md's timm recipes (skipped where the optional timm extra is not installed)."""
    timm = pytest.importorskip("timm")
    from timm.models.resnet import Bottleneck, ResNet

    for arch, size in (("resnet18", 32), ("resnet18-small", 16)):
        torch.manual_seed(0)
        model = SwAV(arch, 8, 4, 5).eval()
        _randomize_bn(model.backbone, 2)
        path = tmp_path / f"{arch}.safetensors"
        write_export(model, path, settings=_settings(arch), step=None, epoch=None, with_head=False)
        theirs = timm.create_model("resnet18", pretrained=False, num_classes=0)
        if arch.endswith("-small"):
            theirs.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            theirs.maxpool = torch.nn.Identity()
        theirs.load_state_dict(load_file(path))
        theirs.eval()
        x = _images(4, size)
        with torch.no_grad():
            assert (theirs(x) - model.backbone(x)).abs().max().item() == 0.0

    w = 2  # the wide recipe, checked for layout on the meta device
    with torch.device("meta"):
        ours, _ = build_backbone("resnet50w2")
        nn = torch.nn
        wide = ResNet(Bottleneck, (3, 4, 6, 3), channels=(64 * w, 128 * w, 256 * w, 512 * w), num_classes=0)
        wide.conv1 = nn.Conv2d(3, 64 * w, 7, 2, 3, bias=False)
        wide.bn1 = nn.BatchNorm2d(64 * w)
        wide.layer1[0].conv1 = nn.Conv2d(64 * w, 64 * w, 1, bias=False)
        wide.layer1[0].downsample[0] = nn.Conv2d(64 * w, 256 * w, 1, bias=False)
    assert {k: v.shape for k, v in wide.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }


def test_default_outputs_go_beside_the_model_and_never_replace_another_state(
    run18: dict[str, Any], tmp_path: Path
) -> None:
    """A run folder's exports go into it; a checkpoint copied out of ``checkpoints/`` has its outputs
    beside it (not two folders up); and a default target holding another state is not replaced."""
    from swavctl.inspect.sources import default_out

    run = tmp_path / "run"
    shutil.copytree(run18["run"], run)
    kept = run / "keep" / "kept.pt"
    kept.parent.mkdir()
    shutil.copy(run18["ckpt"], kept)
    lone = tmp_path / "elsewhere" / "model.pt"
    lone.parent.mkdir()
    shutil.copy(run18["ckpt"], lone)

    for model, expected in ((kept, kept.parent), (lone, lone.parent), (run, run)):
        result = _in_process("export", str(model), "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert Path(json.loads(result.stdout)["path"]) == expected / "backbone.safetensors"
        assert default_out(load_model(model)) == expected / "clusters"  # inspect-clusters' default
    # Re-exported from the newest checkpoint (the same step, fp32): pretrain's tensors, replaced.
    again, first = load_file(run / "backbone.safetensors"), load_file(run18["run"] / "backbone.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)

    refused = _in_process("export", str(run), "--dtype", "bf16", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "already holds another export (step 2, contents backbone, dtype fp32; " in refused.stderr
    assert "dtype bf16); pass --out" in refused.stderr
    with safe_open(run / "backbone.safetensors", "pt") as f:
        assert f.metadata()["dtype"] == "fp32"  # untouched


def test_the_advice_for_a_plain_safetensors_file_works_as_written(tmp_path: Path) -> None:
    """A torchvision state dict saved as safetensors has no swavctl metadata; the error says what to
    run, and that command (with the architecture filled in) imports it."""
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    refused = _in_process("export", "plain.safetensors", "--out", "again.safetensors", cwd=tmp_path)
    assert refused.returncode == 2
    advice = refused.stderr.split("with '", 1)[1].split("'", 1)[0]
    assert advice.startswith("swavctl export --from-official plain.safetensors --arch ARCH"), advice
    args = advice.replace("ARCH", "resnet18").replace("NEW.safetensors", "new.safetensors").split()[1:]
    imported = _in_process(*args, "--json", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    loaded = load_model(tmp_path / "new.safetensors").model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_info_on_a_checkpoint_says_how_to_export_it_and_that_works(
    run18: dict[str, Any], tmp_path: Path
) -> None:
    """`export --info CKPT.pt` is refused before torch with the command that makes an export of it;
    run as printed, that command writes a file --info then reads."""
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(run18["ckpt"].read_bytes())
    refused = _in_process("export", "--info", "ckpt.pt", cwd=tmp_path)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "is a PyTorch checkpoint" in refused.stderr
    advice = refused.stderr.split("with '", 1)[1].split("'", 1)[0]
    args = advice.replace("NEW.safetensors", "new.safetensors").split()[1:]
    assert _in_process(*args, cwd=tmp_path).returncode == 0
    info = _in_process("export", "--info", "new.safetensors", "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["metadata"]["arch"] == "resnet18"


def test_info_on_a_run_folder_reads_its_export_or_says_how_to_write_one(
    run18: dict[str, Any], tmp_path: Path
) -> None:
    """`export --info RUN` (or runs/latest) reads the run's backbone.safetensors; a run folder
    without one is refused with the export command, which, run as printed, writes it."""
    finished = _in_process("export", "--info", str(run18["run"]), "--json", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["metadata"]["step"] == "2"
    bare = tmp_path / "bare-run"
    shutil.copytree(run18["run"], bare, ignore=shutil.ignore_patterns("*.safetensors"))
    refused = _in_process("export", "--info", str(bare), cwd=tmp_path)
    assert refused.returncode == 2 and "has none" in refused.stderr, refused.stderr
    advice = refused.stderr.split("with '", 1)[1].split("'", 1)[0]
    assert _in_process(*advice.split()[1:], cwd=tmp_path).returncode == 0
    again = _in_process("export", "--info", str(bare), "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_settings_in_an_edited_export_are_bounded_before_they_size_anything(
    run18: dict[str, Any], tmp_path: Path
) -> None:
    """The metadata is not covered by the payload hash: an export edited to ask for 3000 px crops (a
    tens-of-GB evaluation) or 10,000 loader workers is refused with one line, as a preset would be."""
    source = run18["run"] / "backbone.safetensors"
    with safe_open(source, "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(source)
    for key, value in (("crop_sizes", [3000, 8]), ("workers", 10_000)):
        settings = json.loads(meta["settings"])
        settings["data"][key] = value
        crafted = tmp_path / f"crafted-{key}.safetensors"
        save_file(tensors, str(crafted), metadata={**meta, "settings": json.dumps(settings)})
        result = _in_process("eval-linear", str(crafted), "--mode", "knn", "--data", "demo", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "invalid value" in result.stderr and key in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_checkpoint_manifest_given_as_the_model_names_its_weights_file(
    run18: dict[str, Any], tmp_path: Path
) -> None:
    manifest = run18["ckpt"].with_suffix(".json")
    refused = _in_process("export", str(manifest), "--out", str(tmp_path / "x.safetensors"), cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert f"is a checkpoint's manifest, not weights; pass {run18['ckpt']}" in refused.stderr


def test_export_warns_when_it_skips_a_damaged_newest_checkpoint(
    run18: dict[str, Any], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run18["run"], run)
    newest = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    with open(newest, "r+b") as handle:
        handle.truncate(1000)
    done = _in_process("export", str(run), "--out", str(tmp_path / "x.safetensors"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"warning: skipping checkpoint {newest}" in done.stderr
