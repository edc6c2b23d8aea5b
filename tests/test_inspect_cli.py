"""``swavctl inspect-clusters`` end to end, in real subprocesses, on planted clusters.

The planted set: G groups of small solid-colour PNGs (with pixel noise) and a real SwAV model
whose prototypes are set to the group means of its own embeddings, plus two near-identical
prototypes pointing away from all images. Expected: every image assigned to its group's
prototype, NMI = 1, the two planted prototypes empty and flagged as near-duplicates. Expected
values come from a float64 reference computed here, not from the command's output.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from swavctl import config
from swavctl.errors import UserError
from swavctl.inspect.run import InspectOptions, inspect_clusters
from swavctl.inspect.sources import resolve_images
from swavctl.model.swav import SwAV
from swavctl.weights.export import write_export
from tests.conftest import write_image_folder

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 220, 40)]


@dataclass
class Planted:
    data: Path
    model: Path
    groups: int
    num_prototypes: int
    paths: list[Path]  # readable images, sorted
    group_of: dict[str, int]  # resolved path -> group
    scores: torch.Tensor  # float64 reference cosine scores (N x K), rows in ``paths`` order
    prototypes: torch.Tensor  # K x D, float64
    temperature: float


def _settings(num_prototypes: int) -> config.Settings:
    return config.resolve(preset="smoke", overrides=[f"model.prototypes={num_prototypes}"])


def _view(path: Path, settings: config.Settings) -> torch.Tensor:
    """The reference preprocessing for 16 px inputs at crop size 16: just normalise (no resize)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    mean, std = np.array(settings.data.augment.mean), np.array(settings.data.augment.std)
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy()).float()


def build_planted(root: Path, *, groups: int = 3, per_group: int = 10, duplicates: bool = True) -> Planted:
    """Write the planted images and model under ``root``; returns what the checks need."""
    rng = np.random.default_rng(0)
    data = root / "data"
    for g in range(groups):
        folder = data / f"group{g}"
        folder.mkdir(parents=True)
        for i in range(per_group):
            noise = rng.integers(-6, 7, size=(16, 16, 3))
            pixels = np.clip(np.array(COLOURS[g]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    paths = sorted(p.resolve() for p in data.rglob("*.png"))
    k = groups + (2 if duplicates else 0)
    settings = _settings(k)
    assert settings.data.crop_sizes[0] == 16
    torch.manual_seed(0)
    model = SwAV(settings.model.arch, settings.model.hidden_dim, settings.model.embedding_dim, k).eval()
    views = torch.stack([_view(p, settings) for p in paths])
    group = torch.tensor([int(p.parent.name.removeprefix("group")) for p in paths])
    with torch.no_grad():
        # A random net maps everything to nearly one direction; centring its output separates the groups.
        head_out = model.head(model.features([views]))
        model.head[-1].bias -= head_out.mean(dim=0)  # type: ignore[index, operator]
        z = model.embed(model.features([views])).double()
    means = torch.nn.functional.normalize(
        torch.stack([z[group == g].mean(dim=0) for g in range(groups)]), dim=1
    )
    rows = [means]
    if duplicates:
        away = torch.nn.functional.normalize(
            torch.randn(z.shape[1], generator=torch.Generator().manual_seed(5)), dim=0
        )
        away = away.double()
        twin = torch.nn.functional.normalize(
            away + 0.05 * torch.nn.functional.normalize(means[0], dim=0), dim=0
        )
        rows += [away[None], twin[None]]
    prototypes = torch.cat(rows)
    with torch.no_grad():
        model.prototypes.weight.copy_(prototypes.float())
    scores = z @ prototypes.t()
    # Preconditions of the planted set, checked on the float64 reference.
    top2 = scores.topk(2, dim=1).values
    assert (scores.argmax(dim=1) == group).all(), "planted groups are not separable; change the colours"
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3, "planted margin too small for float32"
    cos = prototypes @ prototypes.t()
    off_diagonal = cos[~torch.eye(k, dtype=torch.bool)]
    assert int((off_diagonal > 0.95).sum()) == (2 if duplicates else 0)
    write_export(model, root / "model.safetensors", settings=settings, step=None, epoch=None, with_head=True)
    return Planted(
        data=data,
        model=root / "model.safetensors",
        groups=groups,
        num_prototypes=k,
        paths=paths,
        group_of={str(p): int(g) for p, g in zip(paths, group.tolist(), strict=True)},
        scores=scores,
        prototypes=prototypes,
        temperature=settings.swav.temperature,
    )


def _json(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Planted, Path, dict[str, Any]]:
    from tests.conftest import run_cli

    root = tmp_path_factory.mktemp("planted")
    planted = build_planted(root)
    (planted.data / "group0" / "zz-broken.png").write_bytes(b"not a png at all")
    out = root / "out"
    result = run_cli(
        "inspect-clusters",
        str(planted.model),
        "--data",
        str(planted.data),
        "--out",
        str(out),
        "--sort-into",
        str(root / "sorted"),
        "--per-cluster",
        "4",
        "--json",
        cwd=root,
    )
    return planted, out, _json(result)


def test_planted_clusters_are_recovered_exactly(planted_run: tuple[Planted, Path, dict[str, Any]]) -> None:
    planted, out, summary = planted_run
    assert summary["n_images"] == len(planted.paths) == 30
    assert summary["skipped_images"] == 1
    assert summary["skipped_files"][0]["path"].endswith("zz-broken.png")
    assert summary["nmi"] == pytest.approx(1.0, abs=1e-9)
    assert summary["ari"] == pytest.approx(1.0, abs=1e-9)
    assert summary["accuracy"] == 1.0 and summary["purity"] == 1.0
    assert summary["prototypes_used"] == 3 and summary["empty_prototypes"] == 2
    sizes = np.array([10, 10, 10, 0, 0])
    assert summary["entropy_ratio"] == pytest.approx(math.log(3) / math.log(5))
    pairwise = np.abs(sizes[:, None] - sizes[None, :]).sum() / (2 * 25 * sizes.mean())
    assert summary["gini"] == pytest.approx(pairwise)
    assert summary["largest_over_median"] == 1.0

    with open(out / "assignments.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == [str(p) for p in planted.paths]
    probs = torch.softmax(planted.scores / planted.temperature, dim=1)
    for i, row in enumerate(rows):
        group = planted.group_of[row["path"]]
        assert int(row["argmax"]) == group and row["label"] == f"group{group}"
        assert float(row["argmax_prob"]) == pytest.approx(float(probs[i, group]), abs=1e-4)
        order = torch.argsort(probs[i], descending=True, stable=True)
        assert [int(row["top2"]), int(row["top3"])] == order[1:3].tolist()
        assert float(row["top2_prob"]) == pytest.approx(float(probs[i, order[1]]), abs=1e-4)
        assert 0 <= int(row["balanced"]) < planted.num_prototypes


def test_planted_duplicates_are_flagged(planted_run: tuple[Planted, Path, dict[str, Any]]) -> None:
    planted, out, summary = planted_run
    k = planted.num_prototypes
    cosine = float(planted.prototypes[k - 2] @ planted.prototypes[k - 1])
    assert [pair[:2] for pair in summary["near_duplicates"]] == [[k - 2, k - 1]]
    assert summary["near_duplicates"][0][2] == pytest.approx(cosine, abs=1e-5)
    clusters = json.loads((out / "clusters.json").read_text())["prototypes"]
    assert clusters[k - 2]["nearest_prototype"] == k - 1 and clusters[k - 1]["nearest_prototype"] == k - 2
    assert clusters[k - 2]["nearest_cosine"] == pytest.approx(cosine, abs=1e-5)
    cos = planted.prototypes @ planted.prototypes.t()
    cos.fill_diagonal_(-2)
    for p, entry in enumerate(clusters):
        assert entry["nearest_prototype"] == int(cos[p].argmax())


def test_clusters_json_grids_and_report(planted_run: tuple[Planted, Path, dict[str, Any]]) -> None:
    planted, out, summary = planted_run
    clusters = json.loads((out / "clusters.json").read_text())["prototypes"]
    probs = torch.softmax(planted.scores / planted.temperature, dim=1)
    for g in range(planted.groups):
        entry = clusters[g]
        assert entry["size_argmax"] == 10
        assert entry["labels"] == {f"group{g}": 10}
        members = [planted.paths.index(Path(m["path"])) for m in entry["most_confident"]]
        in_group = [i for i in range(30) if planted.group_of[str(planted.paths[i])] == g]
        best = sorted((float(probs[i, g]) for i in in_group), reverse=True)[:4]
        assert [float(probs[i, g]) for i in members] == pytest.approx(best, abs=1e-5)
        assert [m["confidence"] for m in entry["most_confident"]] == pytest.approx(best, abs=1e-5)
        mean_conf = float(probs[in_group, g].mean())
        assert entry["mean_confidence_argmax"] == pytest.approx(mean_conf, abs=1e-5)
    assert sum(e["size_balanced"] for e in clusters) == 30
    grids = sorted((out / "grids").glob("*.png"))
    assert [g.name for g in grids] == ["prototype-0000.png", "prototype-0001.png", "prototype-0002.png"]
    with Image.open(grids[0]) as image:
        assert image.width > 4 * 64 and image.height > 2 * 64
    assert summary["grids"] == 3
    with Image.open(out / "sizes.png") as chart:
        assert chart.size == (900, 560)
    page = (out / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: no network
    assert 'src="grids/prototype-0000.png"' not in page  # the sections are drawn by the page's script
    with open(out / "label_cluster_table.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0][0].startswith("label") and table[1][1:] == ["10", "0", "0", "0", "0"]
    assert not list(out.glob(".embeddings-*"))  # the temporary store is gone


def test_sort_into_links_every_image(planted_run: tuple[Planted, Path, dict[str, Any]]) -> None:
    planted, out, summary = planted_run
    sorted_root = Path(summary["sort_into"])
    assert summary["sorted_images"] == 30
    for g in range(planted.groups):
        folder = sorted_root / f"prototype-{g:04d}"
        links = sorted(folder.iterdir())
        assert len(links) == 10
        for link in links:
            assert link.is_symlink()
            assert planted.group_of[str(link.resolve())] == g
            assert link.name.startswith(f"group{g}__")
    assert not (sorted_root / "prototype-0003").exists()


def test_balanced_assignment_on_equal_groups_and_alias(tmp_path: Path, cli: Callable[..., Any]) -> None:
    planted = build_planted(tmp_path / "eq", groups=4, per_group=6, duplicates=False)
    result = cli(
        "cluster-inspect",
        str(planted.model),
        "--data",
        str(planted.data),
        "--out",
        str(tmp_path / "out"),
        "--assignment",
        "balanced",
        "--sort-into",
        str(tmp_path / "copies"),
        "--copy",
        "--sinkhorn-tolerance",
        "1e-4",
        "--json",
    )
    summary = _json(result)
    assert "not equal-partition" not in result.stderr
    assert summary["assignment"] == "balanced"
    assert summary["balanced"]["nmi"] == pytest.approx(1.0, abs=1e-9)
    assert summary["balanced"]["sinkhorn"]["converged"] is True
    assert summary["balanced"]["sinkhorn"]["max_marginal_error"] <= 1e-4
    assert summary["nmi"] == summary["balanced"]["nmi"] and summary["argmax"]["nmi"] == pytest.approx(1.0)
    copies = sorted((tmp_path / "copies").glob("prototype-*/*.png"))
    assert len(copies) == 24 and not any(c.is_symlink() for c in copies)
    with open(tmp_path / "out" / "assignments.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            assert int(row["balanced"]) == int(row["argmax"]) == planted.group_of[row["path"]]


def test_balanced_solve_out_of_passes_warns(tmp_path: Path, cli: Callable[..., Any]) -> None:
    planted = build_planted(tmp_path / "p")
    args = ("inspect-clusters", str(planted.model), "--data", str(planted.data), "--json")
    result = cli(
        *args, "--out", str(tmp_path / "short"), "--sinkhorn-iterations", "2", "--sinkhorn-tolerance", "1e-9"
    )
    sinkhorn = _json(result)["balanced"]["sinkhorn"]
    assert sinkhorn["iterations"] == 2 and sinkhorn["converged"] is False
    assert sinkhorn["max_marginal_error"] > 1e-9
    warning = [line for line in result.stderr.splitlines() if "not equal-partition" in line]
    assert len(warning) == 1 and "after 2 Sinkhorn passes" in warning[0]
    assert "raise --sinkhorn-iterations (now 2)" in warning[0]
    # Tolerance 0 asks for exactly N passes (the streaming twin of swavctl.sinkhorn): no warning.
    exact = cli(
        *args, "--out", str(tmp_path / "exact"), "--sinkhorn-iterations", "2", "--sinkhorn-tolerance", "0"
    )
    assert _json(exact)["balanced"]["sinkhorn"]["iterations"] == 2
    assert "not equal-partition" not in exact.stderr


def test_bad_input_is_one_line_and_status_2(tmp_path: Path, cli: Callable[..., Any]) -> None:
    settings = _settings(4)
    model = SwAV(settings.model.arch, settings.model.hidden_dim, settings.model.embedding_dim, 4)
    backbone_only = tmp_path / "backbone.safetensors"
    write_export(model, backbone_only, settings=settings, step=None, epoch=None, with_head=False)
    with_head = tmp_path / "model.safetensors"
    write_export(model, with_head, settings=settings, step=None, epoch=None, with_head=True)
    images = write_image_folder(tmp_path / "images", classes=2, per_class=2)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "notes.txt").write_text("no images here")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # Through the command line: one line on stderr, status 2, no traceback.
    cases = {
        "no projection head": [str(backbone_only), "--data", str(images), "--out", str(tmp_path / "o1")],
        "cannot write": [str(with_head), "--data", str(images), "--out", str(blocker / "sub")],
    }
    for expected, args in cases.items():
        result = cli("inspect-clusters", *args)
        assert result.returncode == 2, (expected, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
        assert "Traceback" not in result.stderr
    # The same UserError path (the command prints any UserError as above), in process.
    # (The options are checked when they are built, so each case builds them inside the check.)
    library_cases: dict[str, dict[str, Any]] = {
        "no image files": {"model": with_head, "data": str(empty), "out": tmp_path / "o2"},
        "model not found": {"model": tmp_path / "missing", "data": str(images)},
        "--assignment must be": {"model": with_head, "data": str(images), "assignment": "kmeans"},
        "not empty and was not written by swavctl": {
            "model": with_head,
            "data": str(images),
            "out": tmp_path / "o3",
            "sort_into": images,
        },
    }
    for expected, keywords in library_cases.items():
        with pytest.raises(UserError, match=expected) as caught:
            inspect_clusters(InspectOptions(**keywords))
        assert "\n" not in str(caught.value)


def test_no_arguments_uses_runs_latest_and_its_data(tmp_path: Path, cli: Callable[..., Any]) -> None:
    images = write_image_folder(tmp_path / "images", classes=2, per_class=8)
    pretrain = cli("pretrain", "--preset", "smoke", "--data", str(images), "--max-steps", "2", "--json")
    assert pretrain.returncode == 0, pretrain.stderr
    run_dir = (tmp_path / json.loads(pretrain.stdout)["out_dir"]).resolve()
    summary = _json(cli("inspect-clusters", "--json"))
    assert Path(summary["out"]) == run_dir / "clusters"
    assert Path(summary["data"]) == images.resolve()
    assert summary["n_images"] == 16 and summary["num_labels"] == 2
    assert (run_dir / "clusters" / "index.html").is_file()
    assert Path(summary["model"]).parent.parent == run_dir  # the newest checkpoint of runs/latest
    for key in ("n_images", "prototypes_used", "entropy_ratio", "nmi", "ari", "accuracy"):
        assert summary[key] is not None


def test_split_choice_prefers_held_out_images(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_image_folder(root / "train", classes=2, per_class=3)
    write_image_folder(root / "val", classes=2, per_class=1)
    loaded: Any = SimpleNamespace(settings=_settings(4).model_copy(), source=tmp_path / "m")
    loaded.settings.data.path = str(root)
    auto = resolve_images(None, split="auto", loaded=loaded, max_images=None)
    assert auto.folder == (root / "val").resolve() and len(auto.paths) == 2
    assert auto.label_names == ["class0", "class1"] and auto.labels == [0, 1]
    train = resolve_images(str(root), split="train", loaded=loaded, max_images=5)
    assert train.folder == (root / "train").resolve() and len(train.paths) == 5
    flat = resolve_images(str(root / "val" / "class0"), split="auto", loaded=loaded, max_images=None)
    assert flat.label_names is None and flat.labels is None
    with pytest.raises(UserError, match="no val/ folder"):
        resolve_images(str(root / "train"), split="val", loaded=loaded, max_images=None)
    loaded.settings.data.path = None
    with pytest.raises(UserError, match="records no dataset .*; pass --data DIR"):
        resolve_images(None, split="auto", loaded=loaded, max_images=None)
