"""Tests for swavctl.weights.official: importing official facebookresearch/swav checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from swavctl.errors import UserError
from swavctl.weights.official import (
    SUPPORTED_ARCHS,
    backbone_feature_dim,
    convert_official_state_dict,
    expected_backbone_shapes,
)
from swavctl.weights.pickles import load_pickle_weights

_MLP_HEAD_KEYS = {
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


def _official_like_state(
    backbone: nn.Module, feat_dim: int, *, hidden: int, out: int, k: int
) -> dict[str, Any]:
    """A DDP-style state dict shaped like facebookresearch/swav's ``main_swav.py`` checkpoints."""
    head = nn.Sequential(
        nn.Linear(feat_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
    )
    bn = head[1]
    assert isinstance(bn, nn.BatchNorm1d)
    assert bn.running_mean is not None and bn.num_batches_tracked is not None
    bn.running_mean.normal_()
    bn.num_batches_tracked.fill_(7)
    state: dict[str, Any] = {}
    for key, value in backbone.state_dict().items():
        if not key.startswith("fc."):
            state["module." + key] = value
    for key, value in head.state_dict().items():
        state["module.projection_head." + key] = value
    state["module.prototypes.weight"] = nn.Linear(out, k, bias=False).weight.detach()
    return state


@pytest.fixture(scope="module")
def resnet50_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    for m in model.modules():  # make the BN buffers non-trivial so equality checks mean something
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    state = _official_like_state(model, 2048, hidden=2048, out=128, k=3000)
    path = tmp_path_factory.mktemp("official") / "swav_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "state_dict": state, "optimizer": {"lr": 0.1}}, path)
    return model, path


@pytest.fixture(scope="module")
def resnet50_loaded(resnet50_checkpoint: tuple[nn.Module, Path]) -> dict[str, Any]:
    return load_pickle_weights(resnet50_checkpoint[1])


def test_resnet50_round_trip(
    resnet50_checkpoint: tuple[nn.Module, Path], resnet50_loaded: dict[str, Any]
) -> None:
    reference, _ = resnet50_checkpoint
    backbone, head = convert_official_state_dict(resnet50_loaded, arch="resnet50")

    fresh = torchvision.models.resnet50()
    fresh.fc = nn.Identity()
    fresh.load_state_dict(backbone, strict=True)
    ref_state = reference.state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, ref_state[key]), key

    assert set(head) == _MLP_HEAD_KEYS
    original = resnet50_loaded["state_dict"]
    assert torch.equal(head["head.0.weight"], original["module.projection_head.0.weight"])
    assert torch.equal(head["head.1.running_mean"], original["module.projection_head.1.running_mean"])
    assert head["head.1.num_batches_tracked"].item() == 7
    assert head["prototypes.weight"].shape == (3000, 128)

    rebuilt = nn.Sequential(nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 128))
    rebuilt.load_state_dict(
        {k[len("head.") :]: v for k, v in head.items() if k.startswith("head.")}, strict=True
    )


def test_bare_state_dict_and_model_wrapper(resnet50_loaded: dict[str, Any]) -> None:
    state = resnet50_loaded["state_dict"]
    stripped = {k[len("module.") :]: v for k, v in state.items()}
    for obj in (state, stripped, {"model": state}):
        backbone, head = convert_official_state_dict(obj, arch="resnet50")
        assert "conv1.weight" in backbone and "prototypes.weight" in head


def test_missing_key_is_listed(resnet50_loaded: dict[str, Any]) -> None:
    state = dict(resnet50_loaded["state_dict"])
    del state["module.layer3.2.bn2.running_var"]
    del state["module.projection_head.3.bias"]
    with pytest.raises(
        UserError, match=r"missing 2 key\(s\): layer3\.2\.bn2\.running_var, projection_head\.3\.bias"
    ):
        convert_official_state_dict({"state_dict": state}, arch="resnet50")


def test_extra_key_is_listed(resnet50_loaded: dict[str, Any]) -> None:
    state = dict(resnet50_loaded["state_dict"])
    state["module.queue_head.weight"] = torch.zeros(2)
    with pytest.raises(UserError, match=r"unexpected 1 key\(s\): queue_head\.weight"):
        convert_official_state_dict({"state_dict": state}, arch="resnet50")


def test_fc_is_unexpected(resnet50_loaded: dict[str, Any]) -> None:
    state = dict(resnet50_loaded["state_dict"])
    state["module.fc.weight"] = torch.zeros(1000, 2048)
    state["module.fc.bias"] = torch.zeros(1000)
    with pytest.raises(UserError, match=r"unexpected 2 key\(s\): fc\.bias, fc\.weight"):
        convert_official_state_dict(state, arch="resnet50")


def test_long_key_lists_are_truncated(resnet50_loaded: dict[str, Any]) -> None:
    state = {k: v for k, v in resnet50_loaded["state_dict"].items() if ".layer4." not in k}
    with pytest.raises(UserError, match=r"missing \d+ key\(s\): .*\.\.\. and \d+ more") as info:
        convert_official_state_dict(state, arch="resnet50")
    assert len(str(info.value)) < 1000


def test_wrong_arch_shapes(resnet50_loaded: dict[str, Any]) -> None:
    with pytest.raises(UserError, match=r"shapes do not match resnet50w2: .*conv1\.weight \[64, 3, 7, 7\]"):
        convert_official_state_dict(resnet50_loaded, arch="resnet50w2")
    with pytest.raises(UserError, match="not an official SwAV resnet18 checkpoint"):
        convert_official_state_dict(resnet50_loaded, arch="resnet18")


def test_head_shape_mismatch(resnet50_loaded: dict[str, Any]) -> None:
    state = dict(resnet50_loaded["state_dict"])
    state["module.prototypes.weight"] = torch.zeros(3000, 64)
    with pytest.raises(UserError, match=r"prototypes\.weight \[3000, 64\] \(expected \[3000, 128\]\)"):
        convert_official_state_dict(state, arch="resnet50")


def test_non_finite_refused(resnet50_loaded: dict[str, Any]) -> None:
    state = dict(resnet50_loaded["state_dict"])
    bad = state["module.layer1.0.conv1.weight"].clone()
    bad[0, 0, 0, 0] = float("nan")
    state["module.layer1.0.conv1.weight"] = bad
    with pytest.raises(UserError, match=r"'layer1\.0\.conv1\.weight' contains NaN or Inf"):
        convert_official_state_dict(state, arch="resnet50")


def test_unknown_arch() -> None:
    with pytest.raises(UserError, match="unsupported architecture 'vit_b16'"):
        convert_official_state_dict({}, arch="vit_b16")


# ---- small, cheap variants --------------------------------------------------------------------


def _meta_state(arch: str) -> dict[str, torch.Tensor]:
    return {
        k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("tracked") else torch.float32)
        for k, s in expected_backbone_shapes(arch).items()
    }


def _small_head(d: int, *, linear: bool = False) -> dict[str, torch.Tensor]:
    if linear:
        head = {"projection_head.weight": torch.randn(16, d), "projection_head.bias": torch.zeros(16)}
    else:
        hidden, out = 32, 16
        head = {
            "projection_head.0.weight": torch.randn(hidden, d),
            "projection_head.0.bias": torch.zeros(hidden),
            "projection_head.1.weight": torch.ones(hidden),
            "projection_head.1.bias": torch.zeros(hidden),
            "projection_head.1.running_mean": torch.zeros(hidden),
            "projection_head.1.running_var": torch.ones(hidden),
            "projection_head.1.num_batches_tracked": torch.tensor(0),
            "projection_head.3.weight": torch.randn(out, hidden),
            "projection_head.3.bias": torch.zeros(out),
        }
    head["prototypes.weight"] = torch.randn(10, 16)
    return head


def _real_backbone_state(arch: str) -> dict[str, torch.Tensor]:
    state = {}
    for key, shape in expected_backbone_shapes(arch).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        else:
            state[key] = torch.randn(shape) if math.prod(shape) < 2**16 else torch.zeros(shape)
    return state


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_expected_shapes_match_torchvision(arch: str) -> None:
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}
    assert expected_backbone_shapes(arch) == want


def test_wide_shapes() -> None:
    for w, arch in ((2, "resnet50w2"), (4, "resnet50w4"), (5, "resnet50w5")):
        shapes = expected_backbone_shapes(arch)
        assert shapes.keys() == expected_backbone_shapes("resnet50").keys()
        assert shapes["conv1.weight"] == (64 * w, 3, 7, 7)
        assert shapes["layer4.2.bn3.weight"] == (2048 * w,)
        assert backbone_feature_dim(arch) == 2048 * w
    # Parameter counts reported by the SwAV paper: 94M, 375M, 586M.
    params = sum(
        math.prod(s)
        for k, s in expected_backbone_shapes("resnet50w2").items()
        if "running" not in k and "tracked" not in k
    )
    assert round(params / 1e6) == 94


@pytest.mark.parametrize("arch", ["resnet50w2", "resnet50w4", "resnet50w5"])
def test_wide_variant_accepted_on_meta(arch: str) -> None:
    d = backbone_feature_dim(arch)
    state = {"module." + k: v for k, v in _meta_state(arch).items()}
    state.update({"module." + k: v.to("meta") for k, v in _small_head(d).items()})
    backbone, head = convert_official_state_dict({"state_dict": state}, arch=arch)
    assert backbone["conv1.weight"].shape[0] == d // 32
    assert set(head) == {k for k in _MLP_HEAD_KEYS}


def test_wide_checkpoint_with_wrong_arch_gets_hint() -> None:
    state = _meta_state("resnet50w2")
    state.update({k: v.to("meta") for k, v in _small_head(4096).items()})
    with pytest.raises(UserError, match="is this a resnet50w2 checkpoint"):
        convert_official_state_dict(state, arch="resnet50")


def test_resnet18_with_linear_head_loads_strict() -> None:
    state = _real_backbone_state("resnet18")
    state.update(_small_head(512, linear=True))
    backbone, head = convert_official_state_dict({"state_dict": state}, arch="resnet18")
    assert set(head) == {"head.weight", "head.bias", "prototypes.weight"}
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(backbone, strict=True)


def test_backbone_only_checkpoint() -> None:
    backbone, head = convert_official_state_dict(_real_backbone_state("resnet18"), arch="resnet18")
    assert head == {} and len(backbone) == len(expected_backbone_shapes("resnet18"))


def test_prototypes_without_head_is_missing_keys() -> None:
    state = _real_backbone_state("resnet18")
    state["prototypes.weight"] = torch.randn(10, 16)
    with pytest.raises(UserError, match=r"missing 9 key\(s\): projection_head\.0\.bias"):
        convert_official_state_dict(state, arch="resnet18")


def test_multi_prototypes_convert_to_prototype_sets() -> None:
    """DeepCluster-v2 / SeLa-v2 ``MultiPrototypes`` (refused before prototype sets existed)."""
    state = _real_backbone_state("resnet18")
    state.update(_small_head(512))
    del state["prototypes.weight"]
    state["prototypes.prototypes0.weight"] = torch.randn(10, 16)
    state["prototypes.prototypes1.weight"] = torch.randn(20, 16)
    _, head = convert_official_state_dict(state, arch="resnet18")
    assert set(head) == (_MLP_HEAD_KEYS - {"prototypes.weight"}) | {
        "prototypes.0.weight",
        "prototypes.1.weight",
    }
    assert torch.equal(head["prototypes.1.weight"], state["prototypes.prototypes1.weight"])


def test_non_tensor_value_and_bad_dtype() -> None:
    state: dict[str, Any] = dict(_real_backbone_state("resnet18"))
    state["conv1.weight"] = [1, 2, 3]
    with pytest.raises(UserError, match="'conv1.weight' is a list, not a tensor"):
        convert_official_state_dict(state, arch="resnet18")
    state["conv1.weight"] = torch.zeros(64, 3, 7, 7, dtype=torch.int64)
    with pytest.raises(UserError, match=r"unexpected dtype for conv1\.weight"):
        convert_official_state_dict(state, arch="resnet18")


def test_supported_archs_all_have_shapes() -> None:
    for arch in SUPPORTED_ARCHS:
        assert "conv1.weight" in expected_backbone_shapes(arch)
