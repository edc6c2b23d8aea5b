"""SLURM: environment parsing, the shipped sbatch script, and SIGUSR1 -> checkpoint -> requeue.

The requeue test runs a real 2-task job the way srun starts it (two processes with SLURM_*
variables; each is one gloo worker), sends SIGUSR1 to both as SLURM does, and records the calls
of a fake ``scontrol`` on PATH.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from swavctl.config import resolve
from swavctl.distributed import dist
from swavctl.errors import UserError
from swavctl.weights import checkpoint as ckpt
from tests.conftest import REPO, cli_env, free_port, last_logged_step, wait_until, write_image_folder

SBATCH = REPO / "docs" / "sbatch" / "swav-rn50-800ep.sbatch"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8(x2)", [8, 8]),
        ("4,2(x3)", [4, 2, 2, 2]),
        ("16(x4)", [16] * 4),  # the official code reads the first character: 1
        ("1", [1]),
        ("2(x2),3,1(x2)", [2, 2, 3, 1, 1]),
    ],
)
def test_tasks_per_node(text: str, expected: list[int]) -> None:
    assert dist.parse_tasks_per_node(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("node7", ["node7"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("gpu[099-101]", ["gpu099", "gpu100", "gpu101"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("cn[1,3]-ib", ["cn1-ib", "cn3-ib"]),
    ],
)
def test_nodelist(text: str, expected: list[str]) -> None:
    assert dist.expand_nodelist(text) == expected


@pytest.mark.parametrize("bad", ["gpu[3-1]", "gpu[01-", "x(8)"])
def test_bad_slurm_strings_are_user_errors(bad: str) -> None:
    with pytest.raises(UserError):
        dist.expand_nodelist(bad) if "(" not in bad else dist.parse_tasks_per_node(bad)


def _task_env(
    procid: int, *, per_node: str, nodes: str, ntasks: int, node: int, local: int
) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "123456",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(local),
        "SLURM_NODEID": str(node),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_STEP_NODELIST": nodes,
        "SLURM_STEP_TASKS_PER_NODE": per_node,
    }


def test_slurm_env_uneven_nodes() -> None:
    # 4 tasks on the first node, 2 on each of three more: rank 7 is the 2nd task of the 3rd node.
    env = dist.slurm_env(_task_env(7, per_node="4,2(x3)", nodes="cn[1-4]", ntasks=10, node=2, local=1))
    assert env is not None
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (7, 10, 1, 2, 2)
    assert env.master_addr == "cn1" and env.master_port == 15000 + 123456 % 20000
    assert env.init_method == f"tcp://cn1:{env.master_port}"


def test_slurm_env_inconsistent_counts_are_refused() -> None:
    with pytest.raises(UserError, match="add up to 16, not SLURM_STEP_NUM_TASKS=12"):
        dist.slurm_env(_task_env(0, per_node="8(x2)", nodes="g[1-2]", ntasks=12, node=0, local=0))


def test_detect_env_precedence_and_non_workers() -> None:
    slurm = _task_env(1, per_node="2", nodes="g1", ntasks=2, node=0, local=1)
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    found = dist.detect_env({**slurm, **torchrun})
    assert found is not None and found.source == "torchrun" and (found.rank, found.world_size) == (3, 4)
    assert dist.detect_env(slurm) is not None and dist.detect_env(slurm).source == "slurm"  # type: ignore[union-attr]
    # The batch script itself: not a worker, even though SLURM_NTASKS=64 and, as many clusters set
    # in the batch shell, SLURM_PROCID, SLURM_LOCALID and SLURM_NODEID are all 0 (only srun sets the
    # step variables).
    batch_shell = {
        "SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
        "SLURM_NTASKS": "64", "SLURM_TASKS_PER_NODE": "8(x8)", "SLURM_NODELIST": "g[1-8]",
        "SLURM_JOB_NODELIST": "g[1-8]",
    }  # fmt: skip
    assert dist.detect_env(batch_shell) is None
    assert dist.detect_env(_task_env(0, per_node="1", nodes="g1", ntasks=1, node=0, local=0)) is None
    assert dist.detect_env({}) is None


def _sbatch_directives() -> dict[str, str]:
    found = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].strip().partition("=")
            found[key] = value
    return found


def test_the_sbatch_script_starts_the_64_gpu_recipe(tmp_path: Path) -> None:
    """Run the script with a fake srun that records how it was called, then check what each
    of the 64 tasks would do with the variables SLURM sets for that job."""
    directives = _sbatch_directives()
    nodes, per_node = int(directives["--nodes"]), int(directives["--ntasks-per-node"])
    assert (nodes, per_node, int(directives["--gpus-per-node"])) == (8, 8, 8)
    assert directives["--signal"].startswith("USR1@") and "--requeue" in directives

    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "srun.json"
    (fake / "srun").write_text(
        "#!/bin/sh\n"
        f'exec {shlex.quote(sys.executable)} -c "import json, os, sys; '
        f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open('{record}', 'w'))\" \"$@\"\n"
    )
    (fake / "srun").chmod(0o755)
    job = {  # what sbatch sets in the batch shell of this job
        "SLURM_JOB_ID": "987654",
        "SLURM_JOB_NODELIST": "gpu[001-008]",
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_CPUS_PER_TASK": directives["--cpus-per-task"],
        "PATH": f"{fake}:{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", str(SBATCH), "/data/imagenet"],
        env=job,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    srun = json.loads(record.read_text())
    argv, env = srun["argv"], srun["env"]
    assert "--kill-on-bad-exit=1" in argv
    command = argv[argv.index("swavctl") :]
    assert command[:2] == ["swavctl", "pretrain"]
    flags = dict(zip(command[2::2], command[3::2], strict=False))
    assert flags["--preset"] == "swav-rn50-800ep" and flags["--data"] == "/data/imagenet"
    assert flags["--out"] == "runs/swav-rn50-800ep"  # fixed: a requeued job resumes it

    # Each task: srun adds its own variables to the batch environment.
    master_port = int(env["MASTER_PORT"])
    seen = set()
    for procid in range(nodes * per_node):
        task = {
            **env,
            "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % per_node),
            "SLURM_NODEID": str(procid // per_node),
            "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
            "SLURM_STEP_NODELIST": env["SLURM_JOB_NODELIST"],
            "SLURM_STEP_TASKS_PER_NODE": env["SLURM_TASKS_PER_NODE"],
        }
        place = dist.detect_env(task)
        assert place is not None and place.source == "slurm"
        assert (place.world_size, place.local_world_size) == (64, 8)
        assert place.master_addr == "gpu001" and place.master_port == master_port == 15000 + 987654 % 20000
        assert place.local_rank == procid % 8 and place.node_rank == procid // 8
        seen.add(place.rank)
    assert seen == set(range(64))

    settings = resolve(preset=flags["--preset"], flags={"data.path": flags["--data"], "dist.gpus": 8})
    global_batch = settings.train.batch_size * nodes * per_node
    assert global_batch == 4096 and settings.optim.base_lr == 4.8 and settings.train.epochs == 800
    assert settings.dist.sync_batchnorm and settings.model.arch == "resnet50"


def test_sigusr1_under_slurm_checkpoints_then_requeues_once(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=32)
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "scontrol.log"
    run_dir = tmp_path / "run"
    # Records its arguments and which checkpoints were committed when it was called.
    (fake / "scontrol").write_text(
        f'#!/bin/sh\necho "$* | $(ls {run_dir}/checkpoints | grep json | tr "\\n" " ")" >> {log}\n'
    )
    (fake / "scontrol").chmod(0o755)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = cli_env(
            PATH=f"{fake}:{os.environ['PATH']}",
            MASTER_PORT=port,
            SWAVCTL_TEST_STEP_SLEEP="0.1",
            **_task_env(rank, per_node="2", nodes="127.0.0.1", ntasks=2, node=0, local=rank),
        )
        env["SLURM_JOB_ID"] = "4242"
        args = ["pretrain", "--preset", "smoke", "--gpus", "0", "--batch-size", "4", "--data", str(images)]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "swavctl", *args, "--out", "run"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        wait_until(lambda: last_logged_step(run_dir) >= 3, timeout=240, proc=procs[0])
        for proc in procs:  # SLURM signals every task of the step
            proc.send_signal(signal.SIGUSR1)
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [138, 138], outputs[0][1][-2000:]
    text = " ".join(outputs[0][1].split())
    assert "stopped by SIGUSR1 at step" in text and "requeued SLURM job 4242" in text
    step = int(text.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    calls = log.read_text().splitlines()
    assert len(calls) == 1  # once, by rank 0
    arguments, committed = calls[0].split(" | ")
    assert arguments == "requeue 4242"
    assert f"step-{step:09d}.json" in committed.split()  # after the checkpoint committed
    assert ckpt.verify(ckpt.checkpoint_at(run_dir, step)) is None
