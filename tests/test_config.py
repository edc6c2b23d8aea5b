"""The settings tree: sources and their order, typos, bad values, TOML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from swavctl import config
from swavctl.errors import UserError


def test_defaults_are_the_paper_recipe() -> None:
    s = config.resolve()
    assert s.data.crop_counts == [2, 6] and s.data.crop_sizes == [224, 96]
    assert s.data.min_scales == [0.14, 0.05] and s.data.max_scales == [1.0, 0.14]
    assert s.data.augment.std == (0.228, 0.224, 0.225)
    assert (s.swav.temperature, s.swav.epsilon, s.swav.sinkhorn_iterations) == (0.1, 0.05, 3)
    assert s.model.prototypes == 3000 and s.train.seed == 31


def test_sources_override_in_order() -> None:
    s = config.resolve(
        preset="smoke",
        flags={"train.epochs": 7, "model.arch": "resnet18"},
        overrides=["train.epochs=9", "data.crop_sizes=[32, 16]", "swav.temperature=0.2"],
    )
    assert s.model.prototypes == 8  # from the preset
    assert s.model.arch == "resnet18"  # flag over preset
    assert s.train.epochs == 9  # --set over flag
    assert s.data.crop_sizes == [32, 16]
    assert s.swav.temperature == 0.2
    assert s.preset == "smoke"


def test_unset_flags_do_not_override_the_preset() -> None:
    s = config.resolve(preset="smoke", flags={"train.epochs": None})
    assert s.train.epochs == 2


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.protoypes=10", "unknown setting 'model.protoypes'; did you mean 'model.prototypes'?"),
        ("data.augment.blur_prb=0.1", "did you mean 'data.augment.blur_prob'?"),
        ("trian.epochs=3", "did you mean 'train'?"),
    ],
)
def test_typos_name_the_dotted_path_and_nearest_key(override: str, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        config.resolve(overrides=[override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_values_are_refused() -> None:
    with pytest.raises(UserError, match=r"invalid value for 'swav.temperature'"):
        config.resolve(overrides=["swav.temperature=-1"])
    with pytest.raises(UserError, match="same length"):
        config.resolve(overrides=["data.crop_sizes=[224]"])
    with pytest.raises(UserError, match="assignment_crops"):
        config.resolve(overrides=["swav.assignment_crops=[0, 9]"])


def test_preset_typo_and_bad_preset_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="did you mean 'smoke'"):
        config.resolve(preset="smok")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nprototypes = 'many'\n")
    with pytest.raises(UserError, match=r"preset bad.toml: invalid value for 'model.prototypes'"):
        config.resolve(preset=str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        config.resolve(preset=str(broken))


def test_a_folder_named_like_a_preset_does_not_hide_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. a data folder called demo/
    assert config.preset_path("demo").is_file() and config.preset_path("demo").parent.name == "presets"
    own = tmp_path / "mine"
    own.write_text("[train]\nepochs = 3\n")  # a preset file without the .toml suffix
    assert config.resolve(preset="mine").train.epochs == 3
    with pytest.raises(UserError, match="preset file not found: sub/x"):
        config.preset_path("sub/x")


def test_every_field_has_a_description() -> None:
    fields = list(config.iter_fields())
    assert len(fields) > 40
    missing = [key for key, description, _ in fields if not description.strip()]
    assert missing == []


@pytest.mark.parametrize("name", ["smoke", "demo", "swav-rn50-800ep", "swav-rn50-400ep-bs256"])
def test_presets_validate_and_round_trip(name: str) -> None:
    s = config.resolve(preset=name)
    again = config.from_toml_text(config.to_toml(s), source="roundtrip")
    assert again == s


def test_paper_presets_hold_the_paper_numbers() -> None:
    big = config.resolve(preset="swav-rn50-800ep")
    assert big.train.epochs == 800 and big.train.batch_size * 64 == 4096
    assert (big.optim.base_lr, big.optim.final_lr, big.optim.warmup_epochs) == (4.8, 0.0048, 10)
    assert big.swav.queue_length == 0 and big.swav.freeze_prototypes_steps == 313
    small = config.resolve(preset="swav-rn50-400ep-bs256")
    assert small.train.epochs == 400 and small.train.batch_size * 4 == 256
    assert small.swav.queue_length == 3840 and small.swav.queue_start_epoch == 15
    assert (small.optim.base_lr, small.optim.final_lr, small.optim.warmup_epochs) == (0.6, 0.0006, 0)


def test_several_overrides_can_change_list_lengths_together() -> None:
    s = config.resolve(
        overrides=[
            "data.crop_counts=[2]",
            "data.crop_sizes=[16]",
            "data.min_scales=[0.4]",
            "data.max_scales=[1.0]",
        ]
    )
    assert s.data.crop_counts == [2] and s.data.total_crops == 2


def test_override_parsing() -> None:
    assert config.parse_override("a.b=3") == (["a", "b"], 3)
    assert config.parse_override("a=hello") == (["a"], "hello")
    assert config.parse_override("a=[1, 2]") == (["a"], [1, 2])
    with pytest.raises(UserError):
        config.parse_override("novalue")


def test_a_presets_knn_monitor_stays_with_its_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notes: list[str] = []
    assert config.resolve(preset="demo", notes=notes).monitor.knn_data == "demo" and not notes
    moved = config.resolve(preset="demo", flags={"data.path": "photos"}, notes=notes)
    assert moved.monitor.knn_data is None
    assert len(notes) == 1 and "--knn-data DIR" in notes[0]
    # An explicit flag or --set still wins, and says nothing.
    notes.clear()
    flags = {"data.path": "photos", "monitor.knn_data": "labelled"}
    flagged = config.resolve(preset="demo", flags=flags, notes=notes)
    assert flagged.monitor.knn_data == "labelled"
    overridden = config.resolve(
        preset="demo", flags={"data.path": "photos"}, overrides=["monitor.knn_data=demo"], notes=notes
    )
    assert overridden.monitor.knn_data == "demo" and not notes
    # The same folder however it is written keeps the monitor (resolved.toml records it absolute).
    (tmp_path / "own.toml").write_text('[data]\npath = "photos"\n[monitor]\nknn_data = "labelled"\n')
    monkeypatch.chdir(tmp_path)
    same = config.resolve(preset="own.toml", flags={"data.path": str(tmp_path / "photos")}, notes=notes)
    assert same.monitor.knn_data == "labelled" and not notes
    assert config.resolve(preset="own.toml", flags={"data.path": "./photos/"}).monitor.knn_data == "labelled"
    # The preset itself is not changed by the run's flags.
    assert config.load_preset("demo")["monitor"]["knn_data"] == "demo"
