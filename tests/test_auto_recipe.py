"""The recipe ``swavctl pretrain --data DIR`` chooses without a preset: the rules, as pure functions
of what the run sees (no images needed), and what the survey reads from real files."""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from swavctl import config
from swavctl.config import Settings
from swavctl.distributed.cores import usable_cores
from swavctl.files.latest import follow
from swavctl.train import auto_recipe as ar
from swavctl.train.auto_recipe import Seen
from swavctl.train.survey import cpu_has_amx, evenly_spaced, is_colour, shorter_side, survey_images
from tests.conftest import cli_env, last_logged_step, run_cli, start_watched, wait_until, write_image_folder

IMAGENET = 1_281_167
CPU_480 = Seen(images=480, side=64, colour=True, device="cpu", device_name="CPU", devices=1, cores=2)


def _gpus(count: int, images: int = IMAGENET, side: int = 400) -> Seen:
    return Seen(images=images, side=side, colour=True, device="cuda", device_name="NVIDIA H100 80GB HBM3",
                devices=count, cores=16 * max(1, count // 8))  # fmt: skip


def _choose(seen: Seen, flags: dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> ar.Choice:
    """The choice as the CLI makes it: the flags and --set values resolved on top of the chosen tree."""

    def resolve(base: dict[str, Any]) -> Settings:
        return config.resolve(base=base, flags=flags, overrides=overrides)

    return ar.choose(seen, resolve, config.explicit_keys(flags, overrides))


#: The settings a paper preset fixes for its batch (not the machine's: workers, checkpoints, dist).
RECIPE_KEYS = ("data.crop_counts", "data.crop_sizes", "data.min_scales", "data.max_scales", "data.augment",
               "model", "swav", "optim", "train.epochs", "train.batch_size")  # fmt: skip


def _recipe(settings: Settings) -> dict[str, Any]:
    flat = config.dotted(settings.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in RECIPE_KEYS)}


@pytest.mark.parametrize(("gpus", "preset"), [(4, "swav-rn50-400ep-bs256"), (64, "swav-rn50-800ep")])
def test_imagenet_on_gpus_lands_on_the_papers_recipe_for_its_batch(gpus: int, preset: str) -> None:
    choice = _choose(_gpus(gpus))
    assert _recipe(choice.settings) == _recipe(config.resolve(preset=preset))
    groups = choice.settings.dist.sync_batchnorm_group
    assert groups == config.resolve(preset=preset).dist.sync_batchnorm_group
    global_batch = 64 * gpus
    assert f"global batch {global_batch}: the paper's batch-{global_batch} recipe ({preset})" in choice.line
    head = f"recipe: {IMAGENET:,} colour images of ~400 px on {gpus} GPUs (NVIDIA H100"
    assert choice.line.startswith(head)
    assert "scaled" not in choice.line


def test_a_batch_between_the_papers_scales_the_nearer_recipe_linearly() -> None:
    # 512 is nearer 256 (1024 is the two recipes' geometric mean): the batch-256 values, lr x 2.
    s = _choose(_gpus(8)).settings
    assert (s.optim.base_lr, s.optim.final_lr, s.optim.warmup_epochs) == pytest.approx((1.2, 0.0012, 0))
    assert (s.train.epochs, s.swav.queue_length, s.swav.queue_start_epoch) == (400, 3584, 15)
    assert s.swav.freeze_prototypes_steps == -(-IMAGENET // 512)  # one epoch
    line = _choose(_gpus(8)).line
    assert "the paper's batch-256 recipe (swav-rn50-400ep-bs256), the nearer one, with its learning" in line
    assert "rates scaled linearly (0.6 x 512/256)" in line and "lr 1.2," in line
    # 2048 is nearer 4096: its values halved; a batch under 3000 prototypes gets a queue to 4096.
    s = _choose(_gpus(32)).settings
    assert (s.optim.base_lr, s.optim.start_warmup_lr, s.optim.warmup_epochs) == pytest.approx((2.4, 0.15, 10))
    assert (s.train.epochs, s.swav.queue_length) == (800, 2048)
    assert "(4.8 x 2048/4096)" in _choose(_gpus(32)).line


def test_480_colour_images_of_64_px_on_2_cpu_cores() -> None:
    choice = _choose(CPU_480)
    s = choice.settings
    assert s.preset == ar.AUTO
    assert (s.model.arch, s.model.hidden_dim, s.model.embedding_dim) == ("convnet-tiny", 256, 64)
    assert s.model.prototypes == 30
    assert (s.data.crop_counts, s.data.crop_sizes) == ([2, 4], [32, 16])
    assert (s.data.augment_on, s.data.workers) == ("device", 0)
    assert s.data.augment == config.AugmentSettings()  # colour photographs: the paper's augmentation
    assert (s.train.batch_size, s.swav.queue_length, s.swav.freeze_prototypes_steps) == (64, 0, 8)
    assert s.optim.base_lr == 4.8 and s.optim.warmup_epochs == min(10, s.train.epochs // 10)
    assert s.swav.temperature == ar.SMALL_DATA_TEMPERATURE == 0.2  # tens of prototypes
    assert _choose(CPU_480, overrides=["swav.temperature=0.1"]).settings.swav.temperature == 0.1
    # The epochs fill the CPU budget by the cost model, and the line says how long that is.
    assert ar.MIN_EPOCHS <= s.train.epochs <= ar.MAX_EPOCHS
    assert ar.estimate_seconds(CPU_480, s) <= ar.BUDGET_S["cpu"]
    assert ar.estimate_seconds(CPU_480, s, epochs=s.train.epochs + 1) > ar.BUDGET_S["cpu"]
    assert choice.line == (
        "recipe: 480 colour images of ~64 px on 2 CPU cores: convnet-tiny, crops 2x32+4x16, 30 prototypes, "
        f"batch 64, lr 4.8, {s.train.epochs} epochs (about 4 min)"
    )
    # Twice as many cores: the same recipe in about as long, with about twice the epochs.
    more = _choose(Seen(**{**CPU_480.__dict__, "cores": 4})).settings.train.epochs
    assert 1.8 * s.train.epochs <= more <= 2.2 * s.train.epochs


def test_a_cpu_with_amx_trains_in_bf16_and_fits_more_epochs() -> None:
    amx = Seen(**{**CPU_480.__dict__, "cpu_bf16": True})
    plain, fast = _choose(CPU_480), _choose(amx)
    assert (plain.settings.train.precision, fast.settings.train.precision) == ("auto", "bf16")
    assert ": convnet-tiny in bf16, crops" in fast.line and "bf16" not in plain.line
    # The cost model counts AMX's bf16 step: more epochs in the same budget.
    assert fast.settings.train.epochs >= 2 * plain.settings.train.epochs
    assert ar.estimate_seconds(amx, fast.settings) <= ar.BUDGET_S["cpu"]
    # The user's precision wins, and the epochs are then counted at it.
    chosen = _choose(amx, overrides=["train.precision=fp32"]).settings
    assert (chosen.train.precision, chosen.train.epochs) == ("fp32", plain.settings.train.epochs)


def test_grey_images_skip_the_colour_jitter_that_does_nothing_to_them() -> None:
    s = _choose(Seen(**{**CPU_480.__dict__, "colour": False})).settings
    assert (s.data.augment.hue, s.data.augment.saturation, s.data.augment.grayscale_prob) == (0, 0, 0)
    assert (s.data.augment.brightness, s.data.augment.contrast) == (0.8, 0.8)


@pytest.mark.parametrize(
    ("images", "side", "arch", "crops"),
    [(5_000, 32, "resnet18-small", [16, 8]), (5_000, 64, "resnet18-small", [32, 16]),
     (20_000, 256, "resnet18", [144, 64]), (60_000, 500, "resnet50", [224, 96])],
)  # fmt: skip
def test_small_data_on_a_gpu(images: int, side: int, arch: str, crops: list[int]) -> None:
    s = _choose(_gpus(1, images=images, side=side)).settings
    assert (s.model.arch, s.data.crop_sizes, s.data.crop_counts) == (arch, crops, [2, 6])
    assert s.model.prototypes == min(3000, round(images / 160) * 10)
    assert s.train.epochs <= ar.MAX_EPOCHS and s.optim.base_lr == 4.8


def test_a_queue_when_the_batch_is_small_against_the_prototypes() -> None:
    assert ar.queue_for(256, 3000) == 3840  # the paper's batch-256 queue
    assert ar.queue_for(4096, 3000) == 0 and ar.queue_for(64, 30) == 0
    assert ar.queue_for(64, 200) == 256  # 64 + 256 >= 200 x 4096 / 3000 = 273.1
    # 4000 images: 250 prototypes, batch 64: a queue of 320 from a tenth of the run (at most 15).
    s = _choose(Seen(**{**CPU_480.__dict__, "images": 4000})).settings
    assert (s.model.prototypes, s.swav.queue_length) == (250, 320)
    assert s.swav.queue_start_epoch == min(15, max(1, s.train.epochs // 10)) < s.train.epochs


def test_the_users_values_win_and_the_recipe_is_built_around_them() -> None:
    flags = {"model.arch": "resnet18-small", "train.epochs": 12}
    choice = _choose(CPU_480, flags=flags, overrides=["model.prototypes=100"])
    s = choice.settings
    assert (s.model.arch, s.model.hidden_dim, s.model.embedding_dim) == ("resnet18-small", 1024, 128)
    assert (s.train.epochs, s.model.prototypes, s.optim.warmup_epochs) == (12, 100, 1)
    assert s.swav.queue_length == 128  # batch 64 < 100 prototypes
    assert "resnet18-small, crops 2x32+4x16, 100 prototypes, batch 64, queue 128 from epoch 1" in choice.line
    assert "12 epochs" in choice.line

    # A fixed architecture costs what it costs: an epoch of resnet18-small is far slower than the tiny net's.
    def epoch_s(settings: Settings) -> float:
        return ar.estimate_seconds(CPU_480, settings, 2) - ar.estimate_seconds(CPU_480, settings, 1)

    assert epoch_s(s) > 5 * epoch_s(_choose(CPU_480).settings)
    # The crop lists go together: the user's lists win, and the recipe fills the others while the
    # user's have its two groups (global, local). Fixing only the scales keeps the chosen sizes:
    # the defaults' 224 and 96 px crops of 64 px images would cost 50 times as much.
    s = _choose(CPU_480, overrides=["data.crop_sizes=[48,24]", "data.crop_counts=[2,2]"]).settings
    assert (s.data.crop_sizes, s.data.crop_counts, s.data.min_scales) == ([48, 24], [2, 2], [0.14, 0.05])
    s = _choose(CPU_480, overrides=["data.min_scales=[0.3,0.1]", "data.max_scales=[1.0,0.3]"]).settings
    assert (s.data.crop_sizes, s.data.crop_counts) == ([32, 16], [2, 4])
    assert (s.data.min_scales, s.data.max_scales) == ([0.3, 0.1], [1.0, 0.3])
    # Three groups of the user's: none of the recipe's two-group lists.
    three = ["data.crop_counts=[2,2,2]", "data.crop_sizes=[32,24,16]"]
    three += ["data.min_scales=[0.5,0.2,0.05]", "data.max_scales=[1,0.5,0.2]"]
    s = _choose(CPU_480, overrides=three).settings
    assert (s.data.crop_counts, s.data.crop_sizes) == ([2, 2, 2], [32, 24, 16])
    # A fixed batch sets the freeze and the queue; the monitor stays off when the user says so.
    labelled = Seen(**{**CPU_480.__dict__, "labelled": "/data/patches"})
    assert _choose(labelled).settings.monitor.knn_data == "/data/patches"
    s = _choose(labelled, flags={"train.batch_size": 16}, overrides=["monitor.knn_data=''"]).settings
    assert (s.swav.freeze_prototypes_steps, s.swav.queue_length, s.monitor.knn_data) == (30, 32, "")


def test_the_choice_depends_only_on_what_it_sees() -> None:
    assert _choose(CPU_480).settings == _choose(CPU_480).settings
    assert _choose(_gpus(4)).line == _choose(_gpus(4)).line


def test_crop_and_prototype_rules() -> None:
    assert ar.global_crop(CPU_480) == 32 and ar.local_crop(32) == 16
    demo_like = Seen(**{**CPU_480.__dict__, "side": 32, "images": 1438})
    assert (ar.global_crop(demo_like), ar.local_crop(16)) == (16, 8)  # the demo's crops
    assert ar.global_crop(_gpus(1)) == 224 and ar.local_crop(224) == 96
    assert [ar.prototypes_for(n) for n in (30, 480, 1438, IMAGENET)] == [10, 30, 90, 3000]
    assert [ar.batch_for(Seen(**{**CPU_480.__dict__, "images": n})) for n in (32, 100, 480)] == [8, 16, 64]


def test_a_folder_of_few_images_is_warned_about_and_a_larger_one_is_not() -> None:
    few = _choose(Seen(**{**CPU_480.__dict__, "images": ar.FEW_IMAGES - 1}))
    assert len(few.warnings) == 1 and few.warnings[0].startswith(f"warning: only {ar.FEW_IMAGES - 1} images;")
    assert f"among {few.settings.model.prototypes} prototypes" in few.warnings[0]
    assert _choose(Seen(**{**CPU_480.__dict__, "images": ar.FEW_IMAGES})).warnings == ()
    assert _choose(CPU_480).warnings == ()


def test_forward_costs() -> None:
    assert ar.forward_macs("resnet50", 224) == ar.MACS_224["resnet50"]
    assert ar.forward_macs("resnet18-small", 32) == pytest.approx(16 * ar.forward_macs("resnet18", 32))
    assert ar.forward_macs("convnet-tiny", 32) == 4 * ar.forward_macs("convnet-tiny", 16)
    # Counted by hand for convnet-tiny (width 32) at 16 px: 14.4 M multiply-accumulates.
    assert ar.forward_macs("convnet-tiny", 16) == pytest.approx(14_376_960)


# ---------------------------------------------------------------------------------------------
# The survey: real files


def test_the_survey_reads_headers_and_tells_colour_from_grey(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(40, 70), dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=2)).save(tmp_path / "grey-rgb.jpg", quality=75)
    Image.fromarray(grey).save(tmp_path / "grey-l.png")
    Image.fromarray(rng.integers(0, 256, size=(50, 30, 3), dtype=np.uint8)).save(tmp_path / "colour.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert shorter_side(tmp_path / "grey-rgb.jpg") == 40 and shorter_side(tmp_path / "colour.png") == 30
    assert shorter_side(tmp_path / "broken.png") is None and is_colour(tmp_path / "broken.png") is None
    assert is_colour(tmp_path / "grey-rgb.jpg") is False  # JPEG chroma noise is not colour
    assert is_colour(tmp_path / "grey-l.png") is False and is_colour(tmp_path / "colour.png") is True
    paths = sorted(tmp_path.iterdir())
    assert survey_images(paths) == (40, False)  # median of 30, 40, 40; one colour image of three
    many = [Path(f"{i:04d}.png") for i in range(1000)]
    assert evenly_spaced(many, 4) == [many[0], many[250], many[500], many[750]]
    assert evenly_spaced(many[:3], 4) == many[:3]


# ---------------------------------------------------------------------------------------------
# End to end: the command, the line, resolved.toml, and a re-run that resumes


def test_pretrain_without_a_preset_chooses_says_records_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "patches"
    write_image_folder(data / "train", per_class=16, size=16)
    write_image_folder(data / "val", per_class=4, size=16, seed=1)
    command = ("pretrain", "--data", str(data), "--gpus", "0", "--max-steps", "8",
               "--set", "checkpoint.every_steps=1")  # fmt: skip
    latest = tmp_path / "runs" / "latest"  # a pointer to the newest run folder
    first = start_watched(*command, cwd=tmp_path, env=cli_env(SWAVCTL_TEST_STEP_SLEEP="0.3"))
    try:
        wait_until(lambda: last_logged_step(follow(latest)) >= 2, timeout=240, proc=first.proc)
        first.proc.send_signal(signal.SIGINT)
        code, errors = first.exit_within(120)
    finally:
        first.kill()
    assert code == 130, errors[-2000:]
    assert " ".join(errors.split()).endswith("re-run the same command to resume"), errors[-2000:]
    lines = [line for line in errors.splitlines() if line.startswith("recipe: ")]
    assert len(lines) == 1, errors[-2000:]
    # 32 images: warned once, right after the recipe line, with the fix.
    flat = " ".join(errors.split())
    assert flat.count("warning: only 32 images;") == 1, errors[-2000:]
    assert "Add images, or start from pretrained weights with --init PATH" in flat
    run = follow(latest)
    resolved = config.from_toml_text((run / "resolved.toml").read_text(), "resolved.toml")
    # 32 images of 16 px: the tiny net, 16 + 8 px crops, 10 prototypes, batch 8 (a quarter of the
    # images), and so a queue; the k-NN monitor on the folder's own val/.
    assert (resolved.preset, resolved.model.arch, resolved.model.prototypes) == ("auto", "convnet-tiny", 10)
    assert (resolved.data.crop_counts, resolved.data.crop_sizes) == ([2, 4], [16, 8])
    assert resolved.train.batch_size == 8
    assert (resolved.swav.queue_length, resolved.monitor.knn_data) == (8, str(data))
    assert resolved.train.max_steps == 8 and resolved.checkpoint.every_steps == 1
    cores = usable_cores()
    assert lines[0] == (
        f"recipe: 32 colour images of ~16 px on {cores} CPU core{'s' if cores > 1 else ''}: convnet-tiny"
        f"{' in bf16' if cpu_has_amx() else ''}, "
        "crops 2x16+4x8, 10 prototypes, batch 8, "
        f"queue 8 from epoch {resolved.swav.queue_start_epoch}, lr 4.8, "
        f"{resolved.train.epochs} epochs (about {lines[0].rsplit('(about ', 1)[1]}"
    )
    stopped = last_logged_step(run)

    again = run_cli(*command, "--json", cwd=tmp_path, env=cli_env())
    assert again.returncode == 0, again.stderr
    assert [line for line in again.stderr.splitlines() if line.startswith("recipe: ")] == lines
    assert f"re-running the unfinished run in {run}" in again.stderr
    summary = json.loads(again.stdout)
    assert (summary["resumed_from_step"], summary["steps"]) == (stopped, 8)
    assert follow(latest) == run
    assert config.from_toml_text((run / "resolved.toml").read_text(), "resolved.toml") == resolved


def test_flags_and_set_values_win_over_the_chosen_recipe(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "images", per_class=16, size=16)
    out = run_cli(
        "pretrain", "--data", str(data), "--gpus", "0", "--max-steps", "1", "--out", "run", "--epochs", "3",
        "--batch-size", "4", "--set", "model.prototypes=12", "--set", "data.augment.hue=0.1", cwd=tmp_path,
        env=cli_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    resolved = config.from_toml_text((tmp_path / "run" / "resolved.toml").read_text(), "resolved.toml")
    assert (resolved.train.epochs, resolved.train.batch_size, resolved.model.prototypes) == (3, 4, 12)
    assert (resolved.data.augment.hue, resolved.swav.freeze_prototypes_steps) == (0.1, 8)  # 32 / 4
    assert resolved.monitor.knn_data is None  # one folder of classes: no held-out part to monitor on
    assert "12 prototypes, batch 4, queue 16 from epoch 1, lr 4.8, 3 epochs" in out.stderr


def test_the_api_chooses_as_the_command_does(tmp_path: Path) -> None:
    import swavctl

    data = str(write_image_folder(tmp_path / "images", per_class=16, size=16))
    chosen = swavctl.load_settings(data=data, gpus=0, overrides={"train.epochs": 3})
    assert (chosen.preset, chosen.model.arch, chosen.train.batch_size, chosen.train.epochs) == (
        "auto", "convnet-tiny", 8, 3
    )  # fmt: skip
    assert swavctl.load_settings(preset="smoke", data=data).preset == "smoke"  # a preset: no choice
