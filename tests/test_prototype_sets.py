"""Several prototype sets (``model.prototypes = [5, 7, 9]``): the model, its checkpoints and exports,
``inspect-clusters --prototype-set``, eval-linear, the official ``MultiPrototypes`` import, and
the proof that a one-set model keeps every key, shape and value it had before sets existed.

The models are the smoke preset's tiny convnet; their checkpoints are written by the real
checkpoint writer (``train.checkpoint.save_checkpoint``), as a run writes them; training with
several sets (DeepCluster-v2, SeLa-v2) is tested in test_methods.py, SwAV's refusal here.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from swavctl import config
from swavctl.errors import UserError
from swavctl.model.backbones import build_backbone
from swavctl.model.swav import SwAV, as_score_sets, projection_head, prototype_set_keys
from swavctl.train.health import CollapseDetector, collapsed_loss
from swavctl.train.precision import Float32Linear, keep_scores_fp32
from swavctl.weights.checkpoint import save_checkpoint
from swavctl.weights.export import export_tensors
from swavctl.weights.model_io import load_model
from swavctl.weights.official import convert_official_state_dict
from tests.conftest import run_cli, write_image_folder
from tests.test_export_import import _in_process, _official_state, _tv
from tests.test_inspect_cli import _view

SIZES = [5, 7, 9]
SCHEMA0 = Path(__file__).parent / "fixtures" / "schema0"


def _settings(prototypes: Any, data: Path | None = None) -> config.Settings:
    flags = {"data.path": str(data)} if data is not None else {}
    overrides = [f"model.prototypes={prototypes}"]
    if isinstance(prototypes, str) and prototypes.startswith("[") and "," in prototypes:
        overrides.append("method=sela-v2")  # SwAV trains one set (refused for SwAV, tested below)
    return config.resolve(preset="smoke", flags=flags, overrides=overrides)


def _model(settings: config.Settings, seed: int = 0) -> SwAV:
    torch.manual_seed(seed)
    m = settings.model
    return SwAV(m.arch, m.hidden_dim, m.embedding_dim, m.prototypes)


def _write_run(run: Path, model: SwAV, settings: config.Settings, *, step: int = 6) -> Path:
    """A run folder holding one committed checkpoint of ``model``, laid out as pretrain writes it."""
    state = {"model": model.state_dict(), "settings": config.to_toml(settings), "step": step, "epoch": 1}
    return save_checkpoint(run, step, 1, state, keep=2)


# ---- settings ---------------------------------------------------------------------------------


def test_settings_take_a_list_of_set_sizes() -> None:
    assert _settings("[5, 7, 9]").model.prototypes == SIZES
    assert _settings("[5]").model.prototypes == 5  # a list of one is that one set
    assert _settings("[3, 4.0]").model.prototypes == [3, 4]
    settings = _settings("[5, 7, 9]")
    again = config.from_toml_text(config.to_toml(settings), source="round trip")
    assert again.model.prototypes == SIZES and again == settings


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "a list of prototype sets needs at least one size"),
        ("[5, 1]", "set 1: Input should be greater than or equal to 2"),
        ("[5, 'x']", "set 1: Input should be a valid integer"),
        ("1", "Input should be greater than or equal to 2"),
        ("2.5", "Input should be a valid integer"),
    ],
)
def test_bad_set_sizes_are_refused_naming_the_setting(value: str, message: str) -> None:
    with pytest.raises(UserError, match=r"invalid value for 'model\.prototypes': " + message):
        _settings(value)


# ---- the model --------------------------------------------------------------------------------


class _SwAVBeforeSets(nn.Module):
    """The one-set model exactly as ``swavctl/model/swav.py`` built it before prototype sets."""

    def __init__(self, arch: str, hidden_dim: int, embedding_dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(arch)
        self.head = projection_head(self.feature_dim, hidden_dim, embedding_dim)
        self.prototypes = nn.Linear(embedding_dim, num_prototypes, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1, p=2))


def test_one_set_model_is_the_model_of_before_key_for_key_and_value_for_value() -> None:
    settings = _settings(8)
    new = _model(settings, seed=3)
    torch.manual_seed(3)
    old = _SwAVBeforeSets("convnet-tiny", 32, 16, 8)
    new_state, old_state = new.state_dict(), old.state_dict()
    assert list(new_state) == list(old_state)  # same keys, same order
    assert all(torch.equal(new_state[k], old_state[k]) for k in old_state)  # same init from the seed
    head_and_prototypes = [k for k in new_state if not k.startswith("backbone.")]
    assert head_and_prototypes == [
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
    ]
    assert type(new.prototypes) is nn.Linear and new.prototype_sizes == [8]
    crops = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))]
    new.eval()
    z, scores = new(crops)
    assert isinstance(scores, torch.Tensor)  # one set: one tensor, as every caller expects
    with torch.no_grad():
        old.eval()
        z_old = F.normalize(old.head(old.backbone(crops[0])), dim=1)
        assert torch.equal(z, z_old) and torch.equal(scores, old.prototypes(z_old))
    assert [k for k in export_tensors(new, with_head=True) if "prototypes" in k] == ["prototypes.weight"]


def test_several_sets_keys_shapes_and_scores() -> None:
    model = _model(_settings("[5, 7, 9]")).eval()
    state = model.state_dict()
    keys = [k for k in state if k.startswith("prototypes")]
    assert (
        keys == prototype_set_keys(3) == ["prototypes.0.weight", "prototypes.1.weight", "prototypes.2.weight"]
    )
    assert [tuple(state[k].shape) for k in keys] == [(5, 16), (7, 16), (9, 16)]
    assert model.prototype_sizes == SIZES and len(model.prototype_sets) == 3
    for layer in model.prototype_sets:  # rows start unit-norm, in every set
        assert layer.bias is None
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(layer.out_features))

    g = torch.Generator().manual_seed(2)
    crops = [torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)]
    crops += [torch.randn(3, 3, 8, 8, generator=g)]
    with torch.no_grad():
        z, scores = model(crops)
    assert z.shape == (9, 16) and isinstance(scores, list) and len(scores) == 3
    assert as_score_sets(scores) == scores
    for h, (k, s) in enumerate(zip(SIZES, scores, strict=True)):
        assert s.shape == (9, k)  # rows crop-major: crop v of sample b is row v*3 + b
        reference = z.double() @ state[f"prototypes.{h}.weight"].double().t()
        torch.testing.assert_close(s.double(), reference, atol=1e-6, rtol=0)

    with torch.no_grad():  # normalize_prototypes renormalises every set
        for layer in model.prototype_sets:
            layer.weight.mul_(3.0)
        model.normalize_prototypes()
    for layer in model.prototype_sets:
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(layer.out_features))

    # Code written for one set fails loudly, pointing at prototype_sets (never set 0 silently).
    with pytest.raises(AttributeError, match=r"3 prototype sets has no single prototypes\.weight"):
        _ = model.prototypes.weight
    assert not hasattr(model.prototypes, "weight")


def test_every_set_scores_in_fp32_under_autocast_and_collapse_is_the_mean_ln_k() -> None:
    model = keep_scores_fp32(_model(_settings("[5, 7, 9]")).eval())
    assert all(type(layer) is Float32Linear for layer in model.prototype_sets)
    assert list(model.state_dict()) == list(_model(_settings("[5, 7, 9]")).state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z, scores = model([torch.randn(2, 3, 16, 16)])
    assert z.dtype == torch.bfloat16 and [s.dtype for s in scores] == [torch.float32] * 3
    assert collapsed_loss(8) == math.log(8)
    assert collapsed_loss(SIZES) == pytest.approx((math.log(5) + math.log(7) + math.log(9)) / 3, abs=1e-15)
    assert CollapseDetector(SIZES, tolerance=0.1, patience=1, warmup_steps=0).log_k == collapsed_loss(SIZES)


# ---- checkpoints, exports, inspect, eval --------------------------------------------------------


@pytest.fixture(scope="module")
def sets_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sets")
    images = write_image_folder(root / "images", classes=2, per_class=10, size=16)
    settings = _settings("[5, 7, 9]", images)
    model = _model(settings, seed=4).eval()
    # Plant set 1: prototype 3 at class 0's mean embedding, prototype 5 at class 1's (as in
    # test_inspect_cli, centring the random head's output first separates the two colours).
    paths = sorted(images.rglob("*.png"))
    views = torch.stack([_view(path, settings) for path in paths])
    label = torch.tensor([int(path.parent.name.removeprefix("class")) for path in paths])
    with torch.no_grad():
        model.head[-1].bias -= model.head(model.features([views])).mean(dim=0)  # type: ignore[index, operator]
        z = model.embed(model.features([views]))
        for prototype, c in ((3, 0), (5, 1)):
            model.prototype_sets[1].weight[prototype] = F.normalize(z[label == c].mean(dim=0), dim=0)
    run = root / "run"
    _write_run(run, model, settings)
    return {"root": root, "images": images, "run": run, "model": model, "settings": settings}


def test_checkpoint_of_several_sets_loads_strictly(sets_run: dict[str, Any]) -> None:
    loaded = load_model(sets_run["run"])
    assert loaded.kind == "checkpoint" and loaded.has_head and loaded.step == 6
    assert loaded.settings.model.prototypes == SIZES
    want = sets_run["model"].state_dict()
    got = loaded.model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_export_round_trip_names_every_set(sets_run: dict[str, Any]) -> None:
    root, run = sets_run["root"], sets_run["run"]
    result = run_cli("export", str(run), "--with-head", "--out", "sets.safetensors", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    tensors = load_file(root / "sets.safetensors")
    assert summary["tensors"] == len(tensors)
    model = sets_run["model"]
    for h, k in enumerate(SIZES):
        assert torch.equal(tensors[f"prototypes.{h}.weight"], model.prototype_sets[h].weight.detach())
        assert tensors[f"prototypes.{h}.weight"].shape == (k, 16)
    assert "prototypes.weight" not in tensors
    with safe_open(root / "sets.safetensors", "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["num_prototypes"]) == SIZES
    assert json.loads(meta["prototype_sets"]) == [
        {"set": 0, "key": "prototypes.0.weight", "size": 5},
        {"set": 1, "key": "prototypes.1.weight", "size": 7},
        {"set": 2, "key": "prototypes.2.weight", "size": 9},
    ]

    loaded = load_model(root / "sets.safetensors")
    assert loaded.kind == "export" and loaded.has_head and loaded.settings.model.prototypes == SIZES
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())

    info = _in_process("export", "--info", "sets.safetensors", cwd=root)
    assert info.returncode == 0, info.stderr
    line = "3 sets: 0 = prototypes.0.weight (5), 1 = prototypes.1.weight (7), 2 = prototypes.2.weight (9)"
    assert line in info.stderr and "num_prototypes  [5, 7, 9]" in " ".join(info.stderr.split("  "))

    # A backbone-only export keeps what is known of the sets, and re-exports keep it too.
    plain = _in_process("export", "sets.safetensors", "--out", "backbone.safetensors", cwd=root)
    assert plain.returncode == 0, plain.stderr
    with safe_open(root / "backbone.safetensors", "pt") as handle:
        plain_meta, plain_keys = handle.metadata(), list(handle.keys())
    assert not any(k.startswith(("head.", "prototypes")) for k in plain_keys)
    assert plain_meta["prototype_sets"] == meta["prototype_sets"] and plain_meta["contents"] == "backbone"
    backbone_only = load_model(root / "backbone.safetensors")
    assert not backbone_only.has_head and backbone_only.model.prototype_sizes == SIZES


def test_inspect_clusters_reads_the_chosen_set(sets_run: dict[str, Any]) -> None:
    root, run, images, model = sets_run["root"], sets_run["run"], sets_run["images"], sets_run["model"]
    result = run_cli(
        "inspect-clusters", str(run), "--data", str(images), "--prototype-set", "1", "--json", cwd=root
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["num_prototypes"], summary["prototype_set"], summary["prototype_sets"]) == (7, 1, 3)
    out = run / "clusters-set1"  # beside the set-0 report's default, run/clusters
    assert summary["out"] == str(out.resolve()) and not (run / "clusters").exists()
    clusters = json.loads((out / "clusters.json").read_text())
    assert clusters["num_prototypes"] == 7 and clusters["prototype_set"] == 1
    assert len(clusters["prototypes"]) == 7
    assert "(prototype set 1 of 3)" in (out / "index.html").read_text()

    # The argmax column is set 1's, recomputed here in float64 from the images.
    with open(out / "assignments.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    settings = sets_run["settings"]
    views = torch.stack([_view(Path(row["path"]), settings) for row in rows])
    model.eval()
    with torch.no_grad():
        z = model.embed(model.features([views])).double()
        scores = z @ F.normalize(model.prototype_sets[1].weight.double(), dim=1).t()
    top2 = scores.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-5, "reference margin too small for float32"
    assert [int(row["argmax"]) for row in rows] == scores.argmax(dim=1).tolist()
    assert [int(row["argmax"]) for row in rows] == [{"class0": 3, "class1": 5}[row["label"]] for row in rows]
    assert summary["nmi"] == pytest.approx(1.0)  # the planted set separates the two classes


def test_prototype_set_out_of_range_is_refused(sets_run: dict[str, Any], tmp_path: Path) -> None:
    run, images = sets_run["run"], str(sets_run["images"])
    refused = run_cli("inspect-clusters", str(run), "--data", images, "--prototype-set", "3", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: --prototype-set 3 is out of range for {load_model(run).source}: it has 3 prototype sets: "
        "pass --prototype-set 0 to 2"
    ]
    assert not (run / "clusters-set3").exists()
    negative = _in_process(
        "inspect-clusters", str(run), "--data", images, "--prototype-set", "-1", cwd=tmp_path
    )
    assert negative.returncode == 2 and "error: --prototype-set must be 0 or more" in negative.stderr

    one_set = tmp_path / "one"
    _write_run(one_set, _model(_settings(8, sets_run["images"])), _settings(8, sets_run["images"]))
    single = _in_process(
        "inspect-clusters", str(one_set), "--data", images, "--prototype-set", "1", cwd=tmp_path
    )
    assert single.returncode == 2
    assert "it has one prototype set, so --prototype-set takes only 0" in single.stderr
    assert "Traceback" not in single.stderr + refused.stderr


def test_eval_linear_is_unchanged_by_the_sets(sets_run: dict[str, Any], tmp_path: Path) -> None:
    """eval-linear reads the backbone alone: the same backbone under one set gives the same result."""
    from swavctl.api import evaluate
    from swavctl.eval.run import PREDICTIONS_CSV

    model = sets_run["model"]
    settings = _settings(8, sets_run["images"])
    twin = _model(settings)
    twin.backbone.load_state_dict(model.backbone.state_dict())
    _write_run(tmp_path / "twin", twin, settings)
    options = {"data": str(sets_run["images"]), "mode": "knn", "k": 3, "gpus": 0, "workers": 0}
    several = evaluate(sets_run["run"], out=tmp_path / "eval-sets", **options)
    one = evaluate(tmp_path / "twin", out=tmp_path / "eval-one", **options)
    assert several["n_val"] == one["n_val"] > 0
    assert (several["top1"], several["top5"]) == (one["top1"], one["top5"])
    predictions = [(tmp_path / name / PREDICTIONS_CSV).read_text() for name in ("eval-sets", "eval-one")]
    assert predictions[0] == predictions[1]  # every image's scores, to the printed digit


def test_swav_pretrain_and_bench_step_refuse_several_sets(sets_run: dict[str, Any], tmp_path: Path) -> None:
    images = str(sets_run["images"])
    result = run_cli(
        "pretrain", "--preset", "smoke", "--data", images, "--out", "never",
        "--set", "model.prototypes=[5, 7, 9]", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --set model.prototypes: model.prototypes does not apply to method 'swav': SwAV trains one "
        "prototype set: give one number K (e.g. --set model.prototypes=3000); several sets ([3000, 3000, "
        "3000]) are for --method deepcluster-v2 and sela-v2"
    )
    assert not (tmp_path / "never").exists()
    from swavctl.api import pretrain

    with pytest.raises(UserError, match="SwAV trains one prototype set"):
        pretrain(
            preset="smoke", data=images, out=str(tmp_path / "api"), overrides=["model.prototypes=[4, 4]"]
        )
    bench = _in_process(
        "bench", "step", "--preset", "smoke", "--set", "model.prototypes=[4, 4]", cwd=tmp_path
    )
    assert bench.returncode == 2 and "SwAV trains one prototype set" in bench.stderr


# ---- one set, as before -----------------------------------------------------------------------


def test_the_schema0_fixture_keeps_its_keys(tmp_path: Path) -> None:
    """Files written before prototype sets existed load, and re-export to the same keys and tensors."""
    old_export = SCHEMA0 / "export-head-fp16.safetensors"
    old = load_file(old_export)
    loaded = load_model(old_export)
    assert type(loaded.model.prototypes) is nn.Linear
    again = export_tensors(loaded.model, with_head=True)
    assert sorted(again) == sorted(old)
    assert all(again[k].shape == old[k].shape and torch.equal(again[k].to(old[k].dtype), old[k]) for k in old)
    assert [k for k in old if k.startswith("prototypes")] == ["prototypes.weight"]

    run = load_model(SCHEMA0 / "run")
    checkpoint = torch.load(run.source, map_location="cpu", weights_only=True)
    assert list(run.model.state_dict()) == list(checkpoint["model"])
    result = _in_process(
        "export", str(old_export), "--with-head", "--out", str(tmp_path / "re.safetensors"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    with safe_open(tmp_path / "re.safetensors", "pt") as handle:
        meta = handle.metadata()
    assert meta["num_prototypes"] == "8" and "prototype_sets" not in meta


# ---- official MultiPrototypes checkpoints (DeepCluster-v2, SeLa-v2) ---------------------------


def _official_multi(sizes: list[int], *, seed: int = 6) -> dict[str, torch.Tensor]:
    """An official resnet18 state dict whose prototypes are ``MultiPrototypes`` (``prototypesH``)."""
    state = _official_state(_tv("resnet18"), hidden=16, out=8, k=2, seed=seed)
    del state["module.prototypes.weight"]
    g = torch.Generator().manual_seed(seed)
    for h, k in enumerate(sizes):
        state[f"module.prototypes.prototypes{h}.weight"] = F.normalize(torch.randn(k, 8, generator=g), dim=1)
    return state


def test_official_multi_prototypes_convert() -> None:
    state = _official_multi([10, 20, 30])
    backbone, head = convert_official_state_dict({"state_dict": state}, arch="resnet18")
    assert [k for k in head if k.startswith("prototypes")] == prototype_set_keys(3)
    for h in range(3):
        assert torch.equal(head[f"prototypes.{h}.weight"], state[f"module.prototypes.prototypes{h}.weight"])
    # Sets are numbered, not sorted as text: prototypes10 is set 10.
    many = _official_multi([2] * 11)
    _, head = convert_official_state_dict(many, arch="resnet18")
    assert torch.equal(head["prototypes.10.weight"], many["module.prototypes.prototypes10.weight"])
    # One MultiPrototypes set is one set: the one-set key.
    _, head = convert_official_state_dict(_official_multi([10]), arch="resnet18")
    assert [k for k in head if k.startswith("prototypes")] == ["prototypes.weight"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("gap", r"missing 1 key\(s\): prototypes\.prototypes1\.weight; "
                r"unexpected 1 key\(s\): prototypes\.prototypes2\.weight"),
        ("both", r"unexpected 1 key\(s\): prototypes\.weight"),
        ("bias", r"unexpected 1 key\(s\): prototypes\.prototypes0\.bias"),
        ("shape", r"shapes do not match resnet18: "
                  r"prototypes\.prototypes1\.weight \[20, 4\] \(expected \[20, 8\]\)"),
    ],
)  # fmt: skip
def test_official_multi_prototypes_mismatches_are_named(change: str, message: str) -> None:
    state = _official_multi([10, 20])
    if change == "gap":
        state["module.prototypes.prototypes2.weight"] = state.pop("module.prototypes.prototypes1.weight")
    elif change == "both":
        state["module.prototypes.weight"] = torch.randn(10, 8)
    elif change == "bias":
        state["module.prototypes.prototypes0.bias"] = torch.zeros(10)
    else:
        state["module.prototypes.prototypes1.weight"] = torch.randn(20, 4)
    with pytest.raises(UserError, match=message):
        convert_official_state_dict(state, arch="resnet18")


def test_official_deepclusterv2_layout_imports_and_loads(tmp_path: Path) -> None:
    state = _official_multi([10, 20, 30])
    checkpoint = tmp_path / "deepclusterv2_800ep_pretrain.pth.tar"
    torch.save(
        {"epoch": 800, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, checkpoint
    )
    result = run_cli(
        "export", "--from-official", checkpoint.name, "--arch", "resnet18", "--with-head",
        "--out", "dc2.safetensors", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] == len(state)
    tensors = load_file(tmp_path / "dc2.safetensors")
    for h in range(3):
        assert torch.equal(
            tensors[f"prototypes.{h}.weight"], state[f"module.prototypes.prototypes{h}.weight"]
        )
    with safe_open(tmp_path / "dc2.safetensors", "pt") as handle:
        meta = handle.metadata()
    assert meta["source"] == "official" and json.loads(meta["num_prototypes"]) == [10, 20, 30]
    assert [s["key"] for s in json.loads(meta["prototype_sets"])] == prototype_set_keys(3)

    loaded = load_model(tmp_path / "dc2.safetensors")
    assert loaded.settings.model.prototypes == [10, 20, 30] and loaded.epoch == 800
    plain = {k[len("module.") :]: v for k, v in state.items()}
    reference = _tv("resnet18")
    reference.load_state_dict(
        {k: v for k, v in plain.items() if not k.startswith(("projection_head.", "prototypes."))}
    )
    reference.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        z, scores = loaded.model([x])
        # The official forward in float64: projection head (eval BN), L2 norm, one product per set.
        f = reference(x).double()
        h = f @ plain["projection_head.0.weight"].double().T + plain["projection_head.0.bias"].double()
        h = (h - plain["projection_head.1.running_mean"].double()) / torch.sqrt(
            plain["projection_head.1.running_var"].double() + 1e-5
        ) * plain["projection_head.1.weight"].double() + plain["projection_head.1.bias"].double()
        h = (
            h.clamp_min(0) @ plain["projection_head.3.weight"].double().T
            + plain["projection_head.3.bias"].double()
        )
        z64 = h / h.norm(dim=1, keepdim=True)
    torch.testing.assert_close(z.double(), z64, atol=1e-5, rtol=0)
    assert isinstance(scores, list) and len(scores) == 3
    for h_, s in enumerate(scores):
        want = z64 @ plain[f"prototypes.prototypes{h_}.weight"].double().T
        torch.testing.assert_close(s.double(), want, atol=1e-5, rtol=0)
