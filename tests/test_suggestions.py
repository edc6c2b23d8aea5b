"""Every command swavctl suggests does what the suggestion says: each one is run here.

After ``--max-steps``, after a complete run, after a re-run with other settings beside an
unfinished ``runs/latest``, and after a stop by a signal.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
from pathlib import Path

import pytest

from swavctl import config
from swavctl.train.schedule import learning_rate
from tests.conftest import cli_env, last_logged_step, run_cli, start_watched, wait_until, write_image_folder

SMOKE = ("pretrain", "--preset", "smoke", "--gpus", "0")  # 16 images: 2 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=8))


def _suggested(text: str, lead: str) -> list[str]:
    """The ``swavctl ...`` command that follows ``lead`` in ``text``, as arguments after ``swavctl``."""
    line = next(x for x in text.splitlines() if lead in x)
    command = shlex.split(line.split(lead, 1)[1].strip())
    assert command[0] == "swavctl" and "--fresh" not in command, line
    return command[1:]


def _run(args: list[str] | tuple[str, ...], cwd: Path) -> tuple[dict[str, object], str]:
    result = run_cli(*args, "--json", cwd=cwd, env=cli_env())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_after_max_steps_the_suggestion_trains_on_to_the_end(tmp_path: Path, images: str) -> None:
    result = run_cli(*SMOKE, "--data", images, "--max-steps", "2", cwd=tmp_path, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert "stopped at step 2 of 4; to train it on to its 2 epochs:" in result.stderr
    command = _suggested(result.stderr, "to train it on to its 2 epochs:")
    # The same command again says it starts a new run, and suggests the same thing.
    again = run_cli(*SMOKE, "--data", images, "--max-steps", "2", cwd=tmp_path, env=cli_env())
    assert "already finished with these settings; starting a new run" in again.stderr
    assert _suggested(again.stderr, "To train it on to its 2 epochs:") == command
    summary, _ = _run(command, tmp_path)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert isinstance(summary["samples_per_s"], float) and summary["samples_per_s"] > 0


def test_after_a_complete_run_the_suggestion_extends_it_on_a_recomputed_schedule(
    tmp_path: Path, images: str
) -> None:
    first, _ = _run((*SMOKE, "--data", images), tmp_path)
    assert first["steps"] == 4
    again = run_cli(*SMOKE, "--data", images, cwd=tmp_path, env=cli_env())
    assert "already finished with these settings; starting a new run" in again.stderr
    command = _suggested(again.stderr, "To continue it to 4 epochs:")
    assert command[-2:] == ["--epochs", "4"]
    summary, errors = _run(command, tmp_path)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 8
    assert Path(str(summary["out_dir"])) == (tmp_path / str(first["out_dir"])).resolve()
    smoke = config.resolve(preset="smoke").optim
    expected = learning_rate(
        4, steps_per_epoch=2, epochs=4, base_lr=smoke.base_lr, final_lr=smoke.final_lr,
        warmup_epochs=smoke.warmup_epochs, start_warmup_lr=smoke.start_warmup_lr,
    )  # fmt: skip
    assert f"learning rate at step 4: {expected:.6g} (cosine to step 8, 4 epochs)" in errors
    assert "schedule is recomputed over 4 epochs instead of 2" in errors
    lines = [
        json.loads(x) for x in (tmp_path / str(first["out_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    step5 = next(r for r in lines if r["step"] == 5)
    assert step5["lr"] == pytest.approx(expected, rel=1e-12)  # the rate it said, not the old schedule's end
    assert all("time_utc" in r for r in lines)


def test_other_settings_beside_an_unfinished_latest_start_a_new_run_and_say_how_to_resume(
    tmp_path: Path, images: str
) -> None:
    old, _ = _run((*SMOKE, "--data", images, "--max-steps", "2"), tmp_path)
    old_dir = (tmp_path / str(old["out_dir"])).resolve()
    (old_dir / "summary.json").unlink()  # as if it had crashed after its checkpoint
    result = run_cli(
        *SMOKE,
        "--data",
        images,
        "--max-steps",
        "1",
        "--set",
        "optim.base_lr=0.2",
        cwd=tmp_path,
        env=cli_env(),
    )
    assert result.returncode == 0, result.stderr
    assert (
        f"{old_dir} (runs/latest) is an unfinished run with other settings (optim.base_lr, " in result.stderr
    )
    command = _suggested(result.stderr, "To resume that one instead:")
    summary, _ = _run(command, tmp_path)
    assert Path(str(summary["out_dir"])) == old_dir and summary["resumed_from_step"] == 2


def test_a_stop_by_signal_says_re_run_the_same_command_and_that_resumes(tmp_path: Path, images: str) -> None:
    command = (*SMOKE, "--data", images, "--out", "run", "--set", "train.epochs=20")
    proc = start_watched(*command, "--fresh", cwd=tmp_path, env=cli_env(SWAVCTL_TEST_STEP_SLEEP="0.05"))
    try:
        wait_until(lambda: last_logged_step(tmp_path / "run") >= 2, timeout=120, proc=proc.proc)
        proc.proc.send_signal(signal.SIGTERM)
        code, errors = proc.exit_within(120)
    finally:
        proc.kill()
    assert code == 143, errors[-2000:]
    text = " ".join(errors.split())
    # The command had --fresh: running it again would set the checkpoints aside, so it says so.
    assert "re-run the same command without --fresh to resume" in text, errors[-2000:]
    stopped_at = int(text.split("stopped by SIGTERM at step ")[1].split(";")[0])
    summary, _ = _run(command, tmp_path)  # the same command, without --fresh
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == 40


def test_a_model_pretrained_on_an_unlabelled_folder_is_evaluated_on_the_labelled_one_it_asks_for(
    tmp_path: Path, images: str
) -> None:
    """eval-linear on a model whose recorded folder has no classes names that folder as the
    pretraining data and asks for labelled images with --data DIR; given them, it evaluates."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(Path(images).rglob("*.png"))):
        shutil.copy(path, flat / f"{i:03d}.png")
    trained = run_cli(
        *SMOKE, "--data", str(flat), "--max-steps", "1", "--out", "r", cwd=tmp_path, env=cli_env()
    )
    assert trained.returncode == 0, trained.stderr
    refused = run_cli("eval-linear", "r", "--gpus", "0", cwd=tmp_path, env=cli_env())
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no classes: "), refused.stderr
    assert str(flat) in lines[0] and "the folder the model was pretrained on" in lines[0]
    assert lines[0].endswith("give a labelled folder with --data DIR")
    followed = run_cli(
        "eval-linear", "r", "--gpus", "0", "--data", images, "--json", cwd=tmp_path, env=cli_env()
    )
    assert followed.returncode == 0, followed.stderr
    assert json.loads(followed.stdout)["mode"] == "fast"
