"""Run a test body in N gloo processes on the CPU (a stand-in for N GPUs).

    def body(rank, world, tmpdir): ...        # module-level, so it can be pickled to the workers
    run_workers(body, 4, tmpdir)

Each worker gets the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK) on top of the test's
own, and an initialised gloo process group; an exception in any worker fails the test with that worker's traceback.

Workers fork from a forkserver that imported torch and megabranch once: a fresh interpreter per worker (spawn)
spends seconds importing torch, the largest part of a small multi-process test on two cores. The forkserver also
imports torch._dynamo: every worker builds its stage on the meta device, whose normal_ and arange are Python
references behind torch.compiler.disable, and the first of them imports Dynamo (about 1 CPU-s per worker, a third
of a small two-process test). The forkserver has run nothing but imports (no thread pool, no process group), so
forking it is as clean as a spawn.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# tensors in a worker's arguments travel as shared-memory file names: a forkserver passes at most ~250 file
# descriptors to a child, fewer than a reference model's parameters
mp.set_sharing_strategy("file_system")
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(
    ["torch", "torch.distributed", "torch._dynamo", "megabranch.training.engine", "tests.helpers.dist"]
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, env, fn, args, errors):
    os.environ.clear()  # the test's environment as it is now, not the forkserver's from its start
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))  # reported to the parent, which fails the test
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world: int, *args) -> None:
    errors = _CTX.SimpleQueue()
    try:
        mp.start_processes(
            _entry,
            args=(world, free_port(), dict(os.environ), fn, args, errors),
            nprocs=world,
            join=True,
            start_method="forkserver",
        )
    except Exception as e:
        msgs = []
        while not errors.empty():
            rank, tb = errors.get()
            msgs.append(f"--- rank {rank} ---\n{tb}")
        raise AssertionError("worker failed:\n" + ("\n".join(msgs) or str(e))) from None
