"""Process groups: where a process learns its rank, and helpers that work with no group at all.

A worker finds its place from the environment, in this order:

1. ``torchrun`` / torch.distributed.elastic (also ``swavctl``'s own launcher): ``RANK``,
   ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
2. a SLURM ``srun`` step: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``,
   ``SLURM_NODEID``, the step's node list and tasks-per-node string. The master is the first node
   of the step; the port is ``MASTER_PORT`` or derived from the job id.

Without either (or with a world of one) there is no process group, and every helper answers as a
single process would: world size 1, rank 0, reductions are no-ops.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from swavctl.errors import UserError, messages


def is_distributed() -> bool:
    """True when a process group with more than one process is initialized."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group, 1 without one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group, 0 without one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank()
    return 0


def is_main() -> bool:
    """True on rank 0 (and always without a process group)."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (or ``group``'s) in place and return it; a no-op on one process."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM, group=group)
    return tensor


def subgroups(size: int) -> Any:
    """This rank's group of ``size`` consecutive ranks (0..size-1, size..2*size-1, ...).

    Every rank must call it (each group is created by all ranks). ``size`` 0, or at least the
    world size, means every rank: the default group, returned as None. Raises :class:`UserError`
    when a smaller ``size`` does not divide the world size.
    """
    world = world_size()
    if size == 0 or size >= world or not is_distributed():
        return None
    if world % size:
        raise UserError(f"dist.sync_batchnorm_group={size} must divide the number of processes ({world})")
    mine = None
    for start in range(0, world, size):
        group = torch_dist.new_group(list(range(start, start + size)))
        if start <= rank() < start + size:
            mine = group
    return mine


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, in place; a no-op on one process."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    """Wait for every rank; a no-op on one process."""
    if is_distributed():
        torch_dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects); ``obj`` itself on one process."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list on one process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``tensor`` concatenated in rank order; ``tensor`` itself on one process.

    Ranks may hold different numbers of rows (zero included); the trailing dimensions and dtype
    must agree. Rows travel padded to the largest count, then the padding is cut off.
    """
    if not is_distributed():
        return tensor
    world = world_size()
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch_dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    most = max(sizes)
    padded = tensor.new_zeros((most, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch_dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


# ---------------------------------------------------------------------------------------------
# Where this process sits: torchrun / elastic or SLURM


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a multi-process job, as read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" (torchrun, elastic, swavctl's launcher) or "slurm"
    node_rank: int = 0

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ.get(key, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {key}={value!r} is not an integer") from None


def parse_tasks_per_node(text: str) -> list[int]:
    """Expand SLURM's compressed tasks-per-node string: ``"8(x2)"`` -> [8, 8], ``"4,2(x3)"`` -> [4, 2, 2, 2].

    (The official SwAV code reads only the first character, so ``"16(x4)"`` became 1.)
    """
    counts: list[int] = []
    for part in text.strip().split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(\s*x\s*(\d+)\s*\))?\s*", part)
        if not match:
            raise UserError(
                f"cannot parse SLURM tasks-per-node {text!r} (expected forms like '8(x2)' or '4,2(x3)')"
            )
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a[1-2,4],b"`` -> ["a[1-2,4]", "b"]."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise UserError(f"cannot parse SLURM node list {text!r}: unbalanced brackets")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_one(name: str, nodelist: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", name)
    if not match:
        return [name]
    prefix, suffix = name[: match.start()], name[match.end() :]
    values: list[str] = []
    for item in match.group(1).split(","):
        bounds = item.strip().split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values.append(bounds[0])
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            lo, hi = int(bounds[0]), int(bounds[1])
            if hi < lo:
                raise UserError(f"cannot parse SLURM node list {nodelist!r}: range {item!r} runs backwards")
            width = len(bounds[0])  # zero padding is kept: gpu[01-04] -> gpu01..gpu04
            values.extend(f"{n:0{width}d}" for n in range(lo, hi + 1))
        else:
            raise UserError(f"cannot parse SLURM node list {nodelist!r}: bad range {item!r}")
    # Later bracket groups (e.g. rack[1-2]-node[01-02]) are expanded recursively, in order.
    return [expanded for value in values for expanded in _expand_one(prefix + value + suffix, nodelist)]


def expand_nodelist(text: str) -> list[str]:
    """Expand a SLURM host list: ``"gpu[01-04,07]"`` -> gpu01..gpu04, gpu07; ``"a1,b[2-3]"`` -> a1, b2, b3."""
    nodes = [node for part in _split_top_level(text) for node in _expand_one(part, text)]
    if not nodes:
        raise UserError(f"cannot parse SLURM node list {text!r}: no nodes")
    return nodes


def slurm_port(environ: Mapping[str, str]) -> int:
    """``MASTER_PORT`` if set, else a port in 15000..34999 derived from the job id (same on all tasks)."""
    if environ.get("MASTER_PORT"):
        return _int(environ, "MASTER_PORT")
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or "0"
    return 15000 + (int(job) if job.isdigit() else 0) % 20000


def slurm_env(environ: Mapping[str, str]) -> DistEnv | None:
    """The place of this ``srun`` task, or None outside an srun step.

    Only srun sets the step variables (``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_NODELIST`` ...).
    The batch script itself is not a worker, although on many clusters it too has
    ``SLURM_PROCID=0``, ``SLURM_LOCALID=0`` and ``SLURM_NODEID=0``, and ``SLURM_NTASKS`` counts the
    tasks that srun *will* start: a plain ``swavctl`` command there (an evaluation after the
    training step, or ``--gpus 8`` on one node) would otherwise wait for peers that never come.
    """
    if any(key not in environ for key in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS")):
        return None
    tasks_key = "SLURM_STEP_NUM_TASKS"
    world = _int(environ, tasks_key)
    rank_ = _int(environ, "SLURM_PROCID")
    local = _int(environ, "SLURM_LOCALID")
    nodes_text = (
        environ.get("SLURM_STEP_NODELIST")
        or environ.get("SLURM_JOB_NODELIST")
        or environ.get("SLURM_NODELIST")
    )
    per_node_text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not nodes_text or not per_node_text:
        raise UserError(
            "SLURM step without SLURM_NODELIST / SLURM_TASKS_PER_NODE: cannot find the master node"
        )
    nodes = expand_nodelist(nodes_text)
    per_node = parse_tasks_per_node(per_node_text)
    node = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else _node_of_rank(rank_, per_node)
    if len(per_node) != len(nodes):
        raise UserError(
            f"SLURM tasks per node {per_node_text!r} ({len(per_node)} nodes) does not match the node list "
            f"{nodes_text!r} ({len(nodes)} nodes)"
        )
    if sum(per_node) != world:
        raise UserError(
            f"SLURM tasks per node {per_node_text!r} add up to {sum(per_node)}, not {tasks_key}={world}"
        )
    if not 0 <= rank_ < world or not 0 <= node < len(nodes) or not 0 <= local < per_node[node]:
        raise UserError(
            f"inconsistent SLURM task: procid {rank_}, localid {local}, node {node}, world {world}"
        )
    return DistEnv(
        rank=rank_,
        world_size=world,
        local_rank=local,
        local_world_size=per_node[node],
        master_addr=environ.get("MASTER_ADDR") or nodes[0],
        master_port=slurm_port(environ),
        source="slurm",
        node_rank=node,
    )


def _node_of_rank(rank_: int, per_node: list[int]) -> int:
    """Node index of a rank under SLURM's default block distribution."""
    seen = 0
    for node, count in enumerate(per_node):
        seen += count
        if rank_ < seen:
            return node
    return len(per_node) - 1


def torchrun_env(environ: Mapping[str, str]) -> DistEnv | None:
    """The place of a worker started by torchrun / torch.distributed.elastic, or None."""
    if not all(key in environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    world = _int(environ, "WORLD_SIZE")
    return DistEnv(
        rank=_int(environ, "RANK"),
        world_size=world,
        local_rank=_int(environ, "LOCAL_RANK"),
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world,
        master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 29500,
        source="torchrun",
        node_rank=_int(environ, "GROUP_RANK") if "GROUP_RANK" in environ else 0,
    )


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """This process's place in a multi-process job (torchrun first, then SLURM), or None.

    A world of one is not a multi-process job: it returns None.
    """
    environ = os.environ if environ is None else environ
    found = torchrun_env(environ) or slurm_env(environ)
    if found is None or found.world_size <= 1:
        return None
    return found


def init_process_group(env: DistEnv, *, use_cuda: bool, timeout_s: float) -> torch.device:
    """Join the job's process group (NCCL on GPUs, gloo on CPUs); returns this worker's device."""
    device = torch.device("cpu")
    if use_cuda:
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(messages.not_enough_gpus(max(env.local_world_size, 1), 0))
        # With one visible device per task (e.g. srun --gpus-per-task=1) it is device 0.
        device = torch.device("cuda", env.local_rank % count)
        torch.cuda.set_device(device)
    if torch_dist.is_initialized():
        return device
    kwargs: dict[str, Any] = {}
    if use_cuda:
        kwargs["device_id"] = device
    torch_dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        # torchrun/elastic: env:// (MASTER_ADDR/PORT, or the agent's store); SLURM: tcp://first node.
        # RANK/WORLD_SIZE set by hand without MASTER_ADDR/PORT: torchrun_env's defaults, not a
        # traceback from env://.
        init_method=None if env.source == "torchrun" and _has_master(os.environ) else env.init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return device


def _has_master(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("MASTER_ADDR")) and bool(environ.get("MASTER_PORT"))


def destroy_process_group() -> None:
    """Leave the process group, if any (errors on the way out are ignored)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer may be gone already
            torch_dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# SLURM requeue


def requeue_slurm_job(environ: Mapping[str, str] | None = None) -> str:
    """Run ``scontrol requeue $SLURM_JOB_ID`` once; returns a one-line report of what happened."""
    environ = os.environ if environ is None else environ
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not job:
        return "not requeued: SLURM_JOB_ID is not set"
    scontrol = shutil.which("scontrol", path=environ.get("PATH"))
    if scontrol is None:
        return f"not requeued: scontrol is not on PATH (job {job})"
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"requeue of job {job} failed: {exc}"
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        return f"requeue of job {job} failed (exit {done.returncode}): {detail[0] if detail else ''}"
    return f"requeued SLURM job {job}"
