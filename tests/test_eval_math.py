"""The evaluation's pure pieces against float64 references and invariants.

k-NN against a brute-force numpy loop, the vectorised probe grid against torch.optim.SGD training
each member alone, metrics against direct counting, and the splits' properties (stratified,
class-balanced, seeded, disjoint).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swavctl.config import resolve
from swavctl.errors import UserError
from swavctl.eval import fast
from swavctl.eval.knn import knn_scores
from swavctl.eval.metrics import accuracy, confusion_matrix, topk_correct
from swavctl.eval.splits import discover, holdout_split, label_subset, per_class_quota, stratified_split
from swavctl.eval.views import center_view, geometry_for, random_crop_box, train_view

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add waiting


# ---------------------------------------------------------------------------------------------
# k-NN


def _knn_reference(
    train: np.ndarray, labels: np.ndarray, query: np.ndarray, k: int, t: float, c: int
) -> np.ndarray:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = np.zeros((len(query), c))
    for qi, q in enumerate(query):
        q = q / np.linalg.norm(q)
        sims = train @ q
        for i in np.argsort(-sims)[:k]:
            out[qi, labels[i]] += math.exp(sims[i] / t)
    return out


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_brute_force_float64(k: int) -> None:
    rng = np.random.default_rng(k)
    train = rng.normal(size=(60, 8))
    labels = rng.integers(0, 4, size=60)
    query = rng.normal(size=(13, 8)) * 3.0  # scale must not matter (cosine similarity)
    expected = _knn_reference(train, labels, query, k, 0.07, 4)
    got = knn_scores(
        torch.from_numpy(train).float() * 5.0,
        torch.from_numpy(labels),
        torch.from_numpy(query).float(),
        num_classes=4,
        k=k,
        temperature=0.07,
        chunk=5,  # several chunks
    )
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-4)


def test_knn_k_is_capped_at_the_train_size() -> None:
    train = torch.eye(3)
    got = knn_scores(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0, 0.0]]), num_classes=2, k=20)
    # every train point votes: exp(1/T) for class 0, 2 * exp(0) for class 1
    torch.testing.assert_close(got, torch.tensor([[math.exp(1 / 0.07), 2.0]]))


# ---------------------------------------------------------------------------------------------
# The vectorised probe grid


def test_grid_equals_training_each_member_alone_with_torch_sgd() -> None:
    """G members trained together == each trained alone by torch.optim.SGD (float64, same batches)."""
    rng = np.random.default_rng(0)
    n, d, c = 70, 5, 3
    x = torch.from_numpy(rng.normal(size=(n, d)))
    y = torch.from_numpy(rng.integers(0, c, size=n))
    lrs, wds = fast.grid_axes((0.05, 0.5), (0.0, 1e-2))
    epochs, batch, seed = 3, 32, 11
    grid = fast.train_linear_grid(
        x, y, num_classes=c, lrs=lrs, wds=wds, epochs=epochs, batch_size=batch, seed=seed
    )

    # Same initial weights and batch order: the generator is consumed by one randn, then one
    # randperm per epoch.
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(d, len(lrs), c, generator=gen, dtype=torch.float64) * 0.01
    orders = [torch.randperm(n, generator=gen) for _ in range(epochs)]
    total = epochs * math.ceil(n / batch)
    for g in range(len(lrs)):
        layer = torch.nn.Linear(d, c).double()
        with torch.no_grad():
            layer.weight.copy_(init[:, g].T)
            layer.bias.zero_()
        opt = torch.optim.SGD(layer.parameters(), lr=float(lrs[g]), momentum=0.9, weight_decay=float(wds[g]))
        step = 0
        for order in orders:
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                for group in opt.param_groups:
                    group["lr"] = float(lrs[g]) * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = torch.nn.functional.cross_entropy(layer(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
        weight, bias = grid.member(g)
        torch.testing.assert_close(weight, layer.weight.detach().T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bias, layer.bias.detach(), rtol=1e-10, atol=1e-12)


def test_grid_logits_and_choice() -> None:
    d, c = 2, 2
    weight = torch.zeros(d, 2, c)
    weight[:, 0] = torch.tensor([[1.0, -1.0], [0.0, 0.0]])  # member 0: class by sign of x0
    weight[:, 1] = torch.tensor([[-1.0, 1.0], [0.0, 0.0]])  # member 1: the opposite
    grid = fast.LinearGrid(weight, torch.zeros(2, c), torch.tensor([0.1, 1.0]), torch.tensor([0.0, 0.0]))
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    logits = grid.logits(x)
    assert logits.shape == (3, 2, 2)
    torch.testing.assert_close(logits[:, 0], x @ weight[:, 0])
    choice = fast.choose_member(grid, x, y)
    assert choice.chosen == 0 and choice.holdout_top1 == [1.0, 0.0] and choice.lr == pytest.approx(0.1)


def test_a_diverged_member_is_never_chosen() -> None:
    weight = torch.zeros(2, 2, 2)
    weight[:, 0] = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    weight[0, 1, 0] = math.inf  # member 1 blew up
    grid = fast.LinearGrid(weight, torch.zeros(2, 2), torch.tensor([0.1, 10.0]), torch.tensor([0.0, 0.0]))
    x = torch.tensor([[-1.0, 0.0], [-2.0, 0.0]])  # member 0 gets both wrong
    choice = fast.choose_member(grid, x, torch.tensor([0, 0]))
    assert choice.chosen == 0 and choice.holdout_top1 == [0.0, -1.0] and choice.holdout_loss[1] == math.inf


def test_standardizer_zero_mean_unit_std() -> None:
    x = torch.randn(100, 4, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + 7
    s = fast.Standardizer.fit(x)
    z = s(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(4, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_against_counting() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(50, 7))
    labels = rng.integers(0, 6, size=50)  # class 6 has no images
    acc = accuracy(torch.from_numpy(scores), torch.from_numpy(labels), 7)
    ranks = np.argsort(-scores, axis=1)
    assert acc.top1 == pytest.approx(np.mean(ranks[:, 0] == labels))
    assert acc.top5 == pytest.approx(np.mean([labels[i] in ranks[i, :5] for i in range(50)]))
    conf = np.zeros((7, 7), dtype=np.int64)
    for t, p in zip(labels, ranks[:, 0], strict=True):
        conf[t, p] += 1
    np.testing.assert_array_equal(acc.confusion.numpy(), conf)
    for c in range(6):
        assert acc.per_class[c] == pytest.approx(conf[c, c] / conf[c].sum())
    assert acc.per_class[6] is None
    assert acc.n == 50


def test_top5_is_capped_at_the_class_count() -> None:
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert topk_correct(scores, torch.tensor([0, 1]), 5).all()
    assert confusion_matrix(torch.tensor([1, 0]), torch.tensor([0, 0]), 2).tolist() == [[1, 1], [0, 0]]


# ---------------------------------------------------------------------------------------------
# Splits and subsets


def _labels(counts: list[int]) -> list[int]:
    return [c for c, n in enumerate(counts) for _ in range(n)]


def test_stratified_split_takes_the_fraction_of_every_class() -> None:
    labels = _labels([10, 25, 7, 1])
    mask = stratified_split(labels, 0.2, seed=5)
    chosen = Counter(np.asarray(labels)[mask].tolist())
    assert chosen == Counter({0: 2, 1: 5, 2: 1})  # round(0.2 n_c); a single image stays out
    assert np.array_equal(mask, stratified_split(labels, 0.2, seed=5))
    assert not np.array_equal(mask, stratified_split(labels, 0.2, seed=6))


def test_label_subset_is_balanced_seeded_and_within_the_given_items() -> None:
    labels = _labels([120, 95, 130, 101])
    subset, notes = label_subset(labels, 0.1, seed=1)
    quota = round(0.1 * len(labels) / 4)
    assert per_class_quota(labels, 0.1) == quota == 11
    assert Counter(labels[i] for i in subset) == {0: quota, 1: quota, 2: quota, 3: quota}
    assert len(set(subset.tolist())) == len(subset) and not notes
    again, _ = label_subset(labels, 0.1, seed=1)
    other, _ = label_subset(labels, 0.1, seed=2)
    assert np.array_equal(subset, again)
    assert not np.array_equal(subset, other)
    one_pct, _ = label_subset(labels, 0.01, seed=1)
    assert Counter(labels[i] for i in one_pct) == {0: 1, 1: 1, 2: 1, 3: 1}  # round(4.46 / 4)


def test_label_subset_reports_short_classes() -> None:
    labels = _labels([50, 50, 2])
    subset, notes = label_subset(labels, 0.5, seed=0)  # quota 17
    assert Counter(labels[i] for i in subset) == {0: 17, 1: 17, 2: 2}
    assert notes and "fewer than 17" in notes[0]
    with pytest.raises(UserError):
        label_subset(labels, 0.0, seed=0)


def test_holdout_split_is_a_stratified_partition() -> None:
    labels = _labels([30, 40, 1])
    fit, held = holdout_split(labels, 0.25, seed=0)
    assert sorted([*fit, *held]) == list(range(len(labels)))
    assert Counter(labels[i] for i in held) == {0: 8, 1: 10}


def _folder(root: Path, counts: dict[str, int]) -> None:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(root / name / f"{i}.png")


def test_discover_single_folder_and_subset_disjoint_from_val(tmp_path: Path) -> None:
    _folder(tmp_path, {"b": 20, "a": 30, "c": 11})
    split = discover(tmp_path, val_split=0.2, seed=0)
    assert split.classes == ["a", "b", "c"]
    assert Counter(s.label for s in split.val) == {0: 6, 1: 4, 2: 2}
    train_paths = {s.path for s in split.train}
    val_paths = {s.path for s in split.val}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 61
    for s in split.train + split.val:  # labels follow the folder names
        assert split.classes[s.label] == s.path.parent.name
    subset, _ = label_subset([s.label for s in split.train], 0.1, seed=0)
    assert not {split.train[int(i)].path for i in subset} & val_paths


def test_discover_train_val_layout_and_errors(tmp_path: Path) -> None:
    _folder(tmp_path / "ok" / "train", {"x": 3, "y": 3})
    _folder(tmp_path / "ok" / "val", {"x": 1, "y": 2})
    split = discover(tmp_path / "ok")
    assert split.layout == "train/val" and len(split.train) == 6 and len(split.val) == 3

    _folder(tmp_path / "bad" / "train", {"x": 3, "y": 3})
    _folder(tmp_path / "bad" / "val", {"x": 1, "z": 2})
    with pytest.raises(UserError, match="missing from .*'z'"):
        discover(tmp_path / "bad")

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "loose.png")
    with pytest.raises(UserError, match="no classes"):
        discover(flat)
    _folder(tmp_path / "one", {"only": 5})
    with pytest.raises(UserError, match="at least 2 classes"):
        discover(tmp_path / "one")


# ---------------------------------------------------------------------------------------------
# Views


def test_geometry_keeps_the_papers_ratio() -> None:
    paper = geometry_for(resolve())  # the paper's recipe: 224 px crops, scales (0.14, 1), flips
    assert (paper.crop, paper.resize, paper.min_scale, paper.max_scale, paper.flip_prob) == (
        224,
        256,
        0.08,
        1,
        0.5,
    )
    demo = resolve(preset="demo")
    g = geometry_for(demo)
    assert g.crop == demo.data.crop_sizes[0] and g.resize == round(g.crop * 256 / 224)
    assert g.min_scale == pytest.approx(demo.data.min_scales[0] * 0.08 / 0.14, abs=1e-4)
    assert g.flip_prob == demo.data.augment.flip_prob
    assert geometry_for(demo, crop=32).resize == 37  # round(36.57)
    assert geometry_for(demo, min_scale=0.5).min_scale == 0.5


def test_views_shapes_and_crop_boxes() -> None:
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    g = geometry_for(resolve(), crop=16)
    assert center_view(image, g).shape == (3, 16, 16)
    rng = random.Random(0)
    for _ in range(300):
        top, left, h, w = random_crop_box(30, 40, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        assert top >= 0 and left >= 0 and h > 0 and w > 0
        assert top + h <= 30 and left + w <= 40
    a = train_view(image, g, random.Random(7))
    b = train_view(image, g, random.Random(7))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_train_view_flip_follows_the_geometry(flip_prob: float) -> None:
    from torchvision.transforms.v2 import functional as TF

    from swavctl.eval.views import Geometry

    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    g = Geometry(crop=10, resize=11, min_scale=1.0, max_scale=1.0, flip_prob=flip_prob)
    whole = TF.resize(image, [10, 10], antialias=True)  # scale 1 of a square image: the whole image
    expected = TF.horizontal_flip(whole) if flip_prob else whole
    for seed in range(5):
        assert torch.equal(train_view(image, g, random.Random(seed)), expected)


# ---------------------------------------------------------------------------------------------
# The papers' defaults, and the linear protocol's best epoch


def test_knn_defaults_are_dinos_k_20_and_temperature_0_07() -> None:
    """DINO's k-NN protocol: k = 20 neighbours, votes weighted by exp(s / 0.07), also as the defaults
    of ``knn_scores`` and of the eval options."""
    import inspect

    from swavctl.eval import knn
    from swavctl.eval.run import EvalOptions

    assert knn.KNN_K == 20 and knn.KNN_TEMPERATURE == 0.07
    defaults = inspect.signature(knn_scores).parameters
    assert defaults["k"].default == 20 and defaults["temperature"].default == 0.07
    assert EvalOptions().k == 20 and EvalOptions().temperature == 0.07
    # Behaviour: with 25 train points only the 20 nearest vote, each with exp(s / 0.07).
    rng = np.random.default_rng(3)
    train = rng.normal(size=(25, 6))
    labels = rng.integers(0, 3, size=25)
    query = rng.normal(size=(4, 6))
    got = knn_scores(
        torch.from_numpy(train).float(),
        torch.from_numpy(labels),
        torch.from_numpy(query).float(),
        num_classes=3,
    )
    expected = _knn_reference(train, labels, query, 20, 0.07, 3)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-4)


def test_linear_recipe_defaults_are_the_papers() -> None:
    """SwAV's linear evaluation: 100 epochs, lr 0.3, weight decay 1e-6, momentum 0.9, batch 256,
    classifier weights ~ N(0, 0.01)."""
    from dataclasses import asdict

    from swavctl.eval.linear import LinearRecipe

    assert asdict(LinearRecipe()) == {
        "epochs": 100,
        "lr": 0.3,
        "weight_decay": 1e-6,
        "momentum": 0.9,
        "batch_size": 256,
        "init_std": 0.01,
    }


def test_new_classifier_has_zero_bias_and_weights_of_std_0_01() -> None:
    """``Linear(d, C)`` with N(0, init_std) weights (seeded) and a zero bias."""
    from swavctl.eval.linear import new_classifier

    layer = new_classifier(512, 100, 0.01, seed=4)
    assert layer.weight.shape == (100, 512) and layer.bias.shape == (100,)
    assert bool((layer.bias == 0).all())
    weight = layer.weight.detach()
    std, mean = float(weight.std()), float(weight.mean())
    assert std == pytest.approx(0.01, rel=0.02)  # 51 200 draws: the estimate is within ~0.3%
    assert abs(mean) < 0.01 * 4 / math.sqrt(51_200)
    assert torch.equal(new_classifier(512, 100, 0.01, seed=4).weight, layer.weight)
    assert not torch.equal(new_classifier(512, 100, 0.01, seed=5).weight, layer.weight)


def test_linear_mode_reports_the_argmax_epoch_on_val_not_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """``best_epoch_selected_on_val`` is the epoch with the highest val top-1 (with that epoch's
    top-5), while the returned scores stay the final epoch's; the recipe is the paper's unless
    overridden."""
    from types import SimpleNamespace

    from swavctl.eval import linear as linear_mod
    from swavctl.eval.linear import LinearRecipe, LinearResult
    from swavctl.eval.options import EvalOptions

    history = [
        {"epoch": 1, "lr": 0.3, "train_loss": 2.0, "val_top1": 0.50, "val_top5": 0.90},
        {"epoch": 2, "lr": 0.2, "train_loss": 1.5, "val_top1": 0.80, "val_top5": 0.97},
        {"epoch": 3, "lr": 0.1, "train_loss": 1.2, "val_top1": 0.60, "val_top5": 0.95},
        {"epoch": 4, "lr": 0.0, "train_loss": 1.1, "val_top1": 0.70, "val_top5": 0.99},
    ]
    final_scores = torch.randn(3, 2)
    seen: dict[str, object] = {}

    def fake_protocol(*args: object, recipe: LinearRecipe, **kwargs: object) -> LinearResult:
        seen["recipe"] = recipe
        return LinearResult(val_scores=final_scores, history=history)

    monkeypatch.setattr(linear_mod, "linear_protocol", fake_protocol)
    val = (torch.zeros(3, 4), torch.tensor([0, 1, 0]), torch.arange(3))
    ctx = SimpleNamespace(
        options=EvalOptions(mode="linear", batch_size=64),
        images=lambda which, augment: list(range(5 if which == "train" else 3)),
        features=lambda dataset, name: val,
        loaded=SimpleNamespace(model=SimpleNamespace(backbone=None, feature_dim=4)),
        split=SimpleNamespace(num_classes=2),
        normalize=None,
        device=torch.device("cpu"),
        workers=0,
        reporter=None,
        timings={},
    )
    scores, _, _, n_train, extra = linear_mod.run_mode(ctx, Path("unused"))  # type: ignore[arg-type]
    assert scores is final_scores and n_train == 5
    best = extra["linear"]["best_epoch_selected_on_val"]
    assert (best["epoch"], best["top1"], best["top5"]) == (2, 0.80, 0.97)
    assert extra["summary"]["best_epoch_selected_on_val"] == {"epoch": 2, "top1": 0.80}
    assert seen["recipe"] == LinearRecipe(epochs=100, lr=0.3, weight_decay=1e-6, momentum=0.9, batch_size=64)


def test_the_best_val_epoch_on_a_tie_is_the_first_as_in_the_official_script() -> None:
    from swavctl.eval.linear import best_epoch_on_val

    history = [
        {"epoch": 1, "val_top1": 0.5, "val_top5": 0.9},
        {"epoch": 2, "val_top1": 0.8, "val_top5": 0.95},
        {"epoch": 3, "val_top1": 0.7, "val_top5": 0.99},
        {"epoch": 4, "val_top1": 0.8, "val_top5": 0.97},
    ]
    assert best_epoch_on_val(history) == history[1]  # official: `if top1 > best` keeps epoch 2
