#!/usr/bin/env python3
"""Measured pipeline bubble of megabranch's 1F1B and interleaved 1F1B schedules next to the theory.

    python tools/bench_pipeline.py                       # p=4 CPU processes (gloo), m in 4 8 16, vpp 2
    python tools/bench_pipeline.py --pp 4 --micro-batches 4 8 16 32 --fwd-ms 20 --compute sleep

Each pipeline rank runs megabranch.parallel.executor.PipelineExecutor (the trainer's executor: the same action
lists, the same point-to-point messages) over stages whose compute is made uniform: every chunk's forward takes
--fwd-ms / vpp and its backward twice that, so a rank does the same work under both schedules. With --compute
sleep (the default) that time is slept, so 2 CPU cores can host 4 stages without the stages competing for
cores (the schedule and the messages are real; the FLOPs are not); --compute spin runs 128x128 matrix products
for that long instead (use it only with at least pp free cores).

bubble = 1 - (compute time of a rank) / (wall time of the step), averaged over ranks and steps; theory:
1F1B (p-1)/(m+p-1), interleaved with v chunks per rank (p-1)/(v*m+p-1). The ideal-machine simulation of the
same action lists (schedules.simulate, free messages) is printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

D, B, S = 64, 4, 16  # the activation that travels: (B, S, D) floats


class _Work(torch.autograd.Function):
    """Identity whose forward and backward take a fixed time (slept or spun)."""

    @staticmethod
    def forward(ctx, x, w, seconds, mode, clock):
        ctx.seconds, ctx.mode, ctx.clock = seconds, mode, clock
        _busy(seconds, mode, clock)
        return x * w

    @staticmethod
    def backward(ctx, g):
        _busy(2 * ctx.seconds, ctx.mode, ctx.clock)
        return g, None, None, None, None


_A = torch.ones(128, 128)


def _busy(seconds: float, mode: str, clock: list) -> None:
    t = time.perf_counter()
    if mode == "sleep":
        time.sleep(seconds)
    else:  # real CPU work in small matrix products, which (like any torch kernel) run without the GIL
        while time.perf_counter() - t < seconds:
            torch.mm(_A, _A)
    clock[0] += time.perf_counter() - t


class UniformChunk(nn.Module):
    """Stands in for a model slice: receives and sends one (B, S, D) tensor, the last chunk returns its output for
    the executor's loss (a zero-weight sum here)."""

    def __init__(self, seconds: float, mode: str, clock: list):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seconds, self.mode, self.clock = seconds, mode, clock

    def forward(self, src_tokens, prev_tokens, *inputs):
        x = inputs[0] if inputs else torch.ones(B, S, D)
        return (_Work.apply(x, self.w, self.seconds, self.mode, self.clock),)


def _zero_loss(out, mb):
    loss = out[0].sum() * 0.0
    return loss, loss.detach()


def _spec(index: int, k: int, pp: int) -> SimpleNamespace:
    """What the executor reads of a layout Chunk."""
    return SimpleNamespace(index=index, rank=index % pp, output=index == k - 1, receives="" if index == 0 else "x",
                           sends="" if index == k - 1 else "x")


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megabranch.parallel.executor import MicroBatch, PipelineExecutor

    try:
        results = []
        grid = SimpleNamespace(pp_rank=rank, pp_ranks=list(range(world)), tp=1, tp_group=None)
        for kind, vpp in (("1f1b", 1), ("interleaved", args.vpp)):
            for m in args.micro_batches:
                if kind == "interleaved" and m % world:
                    continue
                k = world * vpp
                clock = [0.0]
                chunks = nn.ModuleList(UniformChunk(args.fwd_ms / 1000 / vpp, args.compute, clock) for _ in range(vpp))
                specs = [_spec(c, k, world) for c in range(k)]
                layout = SimpleNamespace(pp=world, vpp=vpp, num_chunks=k,
                                         chunks_of_rank=lambda r, specs=specs: [c for c in specs if c.rank == r])
                ex = PipelineExecutor(chunks, layout, grid, kind, D)
                ex.loss_fn = _zero_loss
                tok = torch.ones(B, S, dtype=torch.long)
                mbs = [MicroBatch(i, tok, tok, tok, B * S) for i in range(m)]
                walls, busy = [], []
                for step in range(args.warmup + args.steps):
                    dist.barrier()
                    clock[0] = 0.0
                    t = time.perf_counter()
                    ex.run(mbs, 1.0)
                    wall = time.perf_counter() - t
                    if step >= args.warmup:
                        walls.append(wall)
                        busy.append(clock[0])
                results.append((kind, vpp, m, sum(walls) / len(walls), sum(busy) / len(busy)))
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--vpp", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--fwd-ms", type=float, default=20.0, help="forward time of one rank's share of the model")
    ap.add_argument("--compute", choices=("sleep", "spin"), default="sleep")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    from megabranch.parallel.schedules import simulate

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args.pp, port, args, queue), nprocs=args.pp, join=True, start_method="spawn")
    per_rank = dict(queue.get() for _ in range(args.pp))
    p = args.pp
    print(f"# pipeline bubble: p={p} gloo CPU processes, uniform stages (forward {args.fwd_ms:g} ms + backward "
          f"{2 * args.fwd_ms:g} ms per rank per micro-batch, {args.compute}), {args.steps} steps after {args.warmup} "
          f"warm-up; {platform.node() or 'host'}: {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| schedule | vpp | m | step wall (s) | measured bubble | theory | ideal-machine simulation |")
    print("|---|---|---|---|---|---|---|")
    for idx, (kind, vpp, m, _, _) in enumerate(per_rank[0]):
        walls = [per_rank[r][idx][3] for r in range(p)]
        busy = [per_rank[r][idx][4] for r in range(p)]
        wall = max(walls)
        measured = sum(1 - b / wall for b in busy) / p
        theory = (p - 1) / (vpp * m + p - 1)
        f = args.fwd_ms / vpp
        t_sim = simulate(kind, p, vpp, m, f, 2 * f)
        sim = 1 - m * vpp * 3 * f / t_sim
        print(f"| {kind} | {vpp} | {m} | {wall:.3f} | {measured:.3f} | {theory:.3f} | {sim:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
