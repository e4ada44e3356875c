"""The process grid: rank layout and process groups for tensor (tp), pipeline (pp) and data (dp) parallelism.

The one place that knows how global ranks map to (tp, dp, pp) coordinates. Megatron's order: tp varies
fastest, then dp, then pp, so a tensor-parallel group is a block of consecutive ranks (one node's NVLink
domain) and pipeline neighbours are tp*dp ranks apart:

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

Every rank creates every group in the same order (torch.distributed.new_group is collective).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass
class Grid:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: object = None  # None when the dimension has size 1 (or there is no process group at all)
    pp_group: object = None
    dp_group: object = None
    pp_ranks: list = field(default_factory=lambda: [0])  # global ranks of my pipeline, indexed by stage
    tp_ranks: list = field(default_factory=lambda: [0])
    dp_ranks: list = field(default_factory=lambda: [0])
    timeout: timedelta | None = None  # of every group of the grid (None: torch's default, 30 minutes)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return f"world {self.world} = tp {self.tp} x pp {self.pp} x dp {self.dp} (vpp {self.vpp})"


def coords(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """global rank -> (tp_rank, dp_rank, pp_rank)."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return tp_rank + tp * (dp_rank + dp * pp_rank)


def check_sizes(world: int, tp: int, pp: int) -> int:
    """-> dp; a one-line UserError when the world cannot be split that way."""
    if tp < 1 or pp < 1:
        raise UserError(f"parallel.tp={tp}, parallel.pp={pp}: both must be >= 1")
    if world % (tp * pp):
        raise UserError(f"world size {world} is not divisible by parallel.tp * parallel.pp = {tp} * {pp} = {tp * pp}")
    return world // (tp * pp)


def process_group_timeout(timeout_s: float | None) -> timedelta | None:
    """parallel.timeout_s as the timeout torch.distributed takes (None: torch's default)."""
    return None if timeout_s is None else timedelta(seconds=timeout_s)


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Join the job torchrun / SLURM / the deepspeed launcher started (env:// rendezvous). timeout_s bounds the
    rendezvous and every wait on the world group (parallel.timeout_s)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # plain srun without torchrun
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "RANK" not in os.environ:
        raise UserError("no distributed environment: launch with torchrun (RANK/WORLD_SIZE/MASTER_ADDR unset)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # the watchdog that makes an NCCL timeout fire: abort the communicators and the process (3: torch's
        # default since 2.2; set here so an inherited 0 cannot turn a dead peer into a hang)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    timeout = process_group_timeout(timeout_s)
    if timeout is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, timeout=timeout)


def build_grid(tp: int = 1, pp: int = 1, vpp: int = 1, timeout_s: float | None = None) -> Grid:
    """Create every group of the grid, each with timeout_s (new groups do not inherit the world's timeout).
    Without an initialised process group, a 1x1x1 grid."""
    if not dist.is_initialized():
        check_sizes(1, tp, pp)
        if tp * pp != 1:
            raise UserError(f"parallel.tp={tp}, parallel.pp={pp} need {tp * pp} processes: launch with torchrun")
        return Grid(vpp=vpp)
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = check_sizes(world, tp, pp)
    if vpp > 1 and pp == 1:
        raise UserError(f"parallel.vpp={vpp} needs parallel.pp > 1")
    tp_rank, dp_rank, pp_rank = coords(rank, tp, dp)
    grid = Grid(
        tp=tp,
        pp=pp,
        dp=dp,
        vpp=vpp,
        rank=rank,
        tp_rank=tp_rank,
        pp_rank=pp_rank,
        dp_rank=dp_rank,
        timeout=process_group_timeout(timeout_s),
    )

    def make(groups_of_ranks):
        mine_group, mine_ranks = None, None
        for ranks in groups_of_ranks:
            g = dist.new_group(ranks, timeout=grid.timeout) if len(ranks) > 1 else None
            if rank in ranks:
                mine_group, mine_ranks = g, ranks
        return mine_group, mine_ranks

    grid.tp_group, grid.tp_ranks = make(
        [[rank_of(t, d, p, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)]
    )
    grid.dp_group, grid.dp_ranks = make(
        [[rank_of(t, d, p, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    )
    grid.pp_group, grid.pp_ranks = make(
        [[rank_of(t, d, p, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    )
    return grid
