"""Several processes, one GPU each: the launch read from its environment, and the process group.

``torchrun --nproc-per-node N -m mla_runner ...`` starts N copies of the runner with ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and the rendezvous address in their environment; ``srun`` (and so Hydra's submitit SLURM launcher,
with several tasks per node) gives each task ``SLURM_STEP_NUM_TASKS``, ``SLURM_PROCID`` and ``SLURM_LOCALID``, and
the rendezvous is the job's first node, on a port derived from the job id. These launchers' protocols are the one
place the runner reads the environment. Every rank builds the same engine over its shard of the model and runs the
same scheduler on the same requests: the steps agree because every collective leaves all ranks the same bits
(hidden states after each all-reduce, logits after the all-gather) and sampling is deterministic given them (greedy
is argmax; sampled draws are keyed by the request's seed and position, alike on every rank). Only rank 0 prints, writes
files and shows progress bars. A single process creates no process group.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mla_runner.config import ParallelConfig
from mla_runner.errors import ConfigError
from mla_runner.models.parallel import Parallel


@dataclass(frozen=True)
class Launch:
    """What the launcher said about this process: the world size, its rank, and its rank on this node; and, under
    SLURM, where the ranks meet (``master``: host and port)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    master: Optional[tuple[str, int]] = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Launch:
        if "WORLD_SIZE" in env:  # torchrun, or any launcher that speaks its protocol
            return cls(int(env["WORLD_SIZE"]), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)))
        if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # a task of an srun step
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
            port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
            return cls(int(env["SLURM_STEP_NUM_TASKS"]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                       (first_host(nodes), port))
        return cls()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,09],cpu1" -> "gpu03"."""
    prefix, ranges = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist).groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def rank() -> int:
    """This process's rank (0 in a single process): rank 0 alone writes files and prints."""
    return Launch.from_env().rank


def setup(cfg: ParallelConfig, device: torch.device) -> tuple[Parallel, torch.device]:
    """The layout of this process and its device (``cuda:<local rank>``); joins the process group (NCCL on GPUs,
    gloo on CPUs) unless there is one process or a group already exists."""
    launch = Launch.from_env()
    if cfg.size is not None and cfg.size != launch.world:
        how = "without torchrun" if launch.world == 1 else f"with {launch.world} processes"
        raise ConfigError(f"parallel.size={cfg.size} but the runner was started {how}: launch it with "
                          f"torchrun --nproc-per-node {cfg.size} -m mla_runner ...")
    par = Parallel(launch.rank, launch.world, cfg.moe)
    if launch.world == 1:
        return par, device
    if device.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {launch.local_rank} has no GPU: {torch.cuda.device_count()} visible, "
                              "start at most that many processes per node")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast (NVLS) stays off: NCCL reads this
        if launch.master is not None:  # SLURM: the rendezvous env:// reads
            os.environ.setdefault("MASTER_ADDR", launch.master[0])
            os.environ.setdefault("MASTER_PORT", str(launch.master[1]))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=launch.rank,
                                world_size=launch.world, device_id=device if device.type == "cuda" else None)
    if dist.get_world_size() != launch.world:
        raise ConfigError(f"the process group has {dist.get_world_size()} ranks, the launcher started {launch.world}")
    return par, device


def shutdown() -> None:
    """Leave the process group (end of a torchrun job); nothing without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
