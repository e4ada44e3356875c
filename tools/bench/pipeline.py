"""Measured pipeline bubble of megabranch's 1F1B, interleaved 1F1B, ZB-H1 and ZB-V schedules next to the theory.

    python -m tools.bench.pipeline                       # p=4 CPU processes (gloo), m in 4 8 16, vpp 2
    python -m tools.bench.pipeline --pp 4 --micro-batches 4 8 16 32 --fwd-ms 20 --compute sleep

Each pipeline rank runs megabranch.parallel.executor.PipelineExecutor (the trainer's executor: the same action
lists, the same point-to-point messages, the same B/W split machinery) over stand-in chunks whose compute is made
uniform: every chunk's forward takes --fwd-ms / vpp and its backward twice that, so a rank does the same work
under every schedule. Under a zero-bubble schedule the backward is split like a real chunk's: its B (the input
gradient, what the previous rank waits for) takes --fwd-ms / vpp and leaves the other half, the weight gradient,
to the executor's WeightGradStore, which runs it in the schedule's W. With --compute sleep (the default) that time
is slept, so 2 CPU cores can host 4 stages without the stages competing for cores (the schedule and the messages
are real; the FLOPs are not); --compute spin runs 128x128 matrix products for that long instead (use it only with
at least pp free cores).

bubble = 1 - (compute time of a rank) / (wall time of the step), averaged over ranks and steps; theory, with
forward = B = W: 1F1B (p-1)/(m+p-1), interleaved with v chunks per rank (p-1)/(v*m+p-1), ZB-H1 (p-1)/(3m+p-1),
ZB-V (p-1)/(6m+p-1) (from m >= 2p-1 on; fewer micro-batches cannot fill its V). The ideal-machine simulation of
the same action lists (schedules.simulate, free messages) is printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megabranch.model.span import Carried
from megabranch.parallel.executor import MicroBatch, PipelineExecutor
from megabranch.parallel.layout import chunk_rank, chunk_virtual
from megabranch.parallel.schedules import placement_of, simulate

D, B, S = 64, 4, 16  # the activation that travels: (B, S, D) floats


class _Work(torch.autograd.Function):
    """Identity whose forward and backward take a fixed time (slept or spun). While a WeightGradStore collects
    (a split schedule's B), the backward does half and defers the other half, its weight gradient, to the W."""

    @staticmethod
    def forward(ctx, x, w, seconds, mode, clock, store):
        ctx.seconds, ctx.mode, ctx.clock, ctx.store, ctx.w = seconds, mode, clock, store, w
        _busy(seconds, mode, clock)
        return x * w

    @staticmethod
    def backward(ctx, g):
        if ctx.store is None or ctx.store.collecting is None:
            _busy(2 * ctx.seconds, ctx.mode, ctx.clock)
            return g, None, None, None, None, None
        _busy(ctx.seconds, ctx.mode, ctx.clock)  # B
        w, seconds, mode, clock = ctx.w, ctx.seconds, ctx.mode, ctx.clock

        def weight_gradient():  # W
            _busy(seconds, mode, clock)
            return [(w, torch.zeros_like(w))]

        ctx.store.defer([w], weight_gradient)
        return g, None, None, None, None, None


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

    cfg = SimpleNamespace(residual="post_ln")  # what the executor reads of a model slice's config

    def __init__(self, seconds: float, mode: str, clock: list):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seconds, self.mode, self.clock = seconds, mode, clock
        self.store = None  # the executor's WeightGradStore

    def needs_admin_profile(self) -> bool:  # what the executor asks a model slice before the first step
        return False

    def forward(self, src_tokens, prev_tokens, *inputs):
        x = inputs[0] if inputs else torch.ones(B, S, D)
        return (_Work.apply(x, self.w, self.seconds, self.mode, self.clock, self.store),)


def _zero_loss(out, mb):
    loss = out[0].sum() * 0.0
    return loss, loss.detach()


def _spec(index: int, k: int, pp: int, placement: str) -> SimpleNamespace:
    """What the executor reads of a layout Chunk: one (B, S, D) hidden in, one out."""
    hidden = (Carried.ENCODER_HIDDEN,)
    return SimpleNamespace(
        index=index,
        rank=chunk_rank(index, pp, placement),
        virtual=chunk_virtual(index, pp),
        output=index == k - 1,
        receives=() if index == 0 else hidden,
        sends=() if index == k - 1 else hidden,
        runs_decoder=False,
        message_shapes=lambda incoming, b, s, t, d, history=False: [(b, s, d)],
    )


SCHEDULES = (("1f1b", 1), ("interleaved", None), ("zb-h1", 1), ("zb-v", 2))  # None: --vpp


def _theory(kind: str, p: int, vpp: int, m: int) -> float | None:
    if kind == "zb-v" and m < 2 * p - 1:
        return None
    ops = {"1f1b": 1, "interleaved": vpp, "zb-h1": 3, "zb-v": 6}[kind]
    return (p - 1) / (ops * m + p - 1)


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        grid = SimpleNamespace(pp_rank=rank, pp_ranks=list(range(world)), tp=1, tp_group=None)
        for kind, vpp in SCHEDULES:
            if kind not in args.schedules:
                continue
            vpp = vpp or args.vpp
            for m in args.micro_batches:
                k = world * vpp
                clock = [0.0]
                chunks = nn.ModuleList(UniformChunk(args.fwd_ms / 1000 / vpp, args.compute, clock) for _ in range(vpp))
                specs = [_spec(c, k, world, placement_of(kind)) for c in range(k)]
                layout = SimpleNamespace(
                    pp=world,
                    vpp=vpp,
                    num_chunks=k,
                    chunks=specs,
                    chunks_of_rank=lambda r, specs=specs: sorted(
                        (c for c in specs if c.rank == r), key=lambda c: c.virtual
                    ),
                )
                ex = PipelineExecutor(chunks, layout, grid, kind, D)
                ex.loss_fn = _zero_loss
                for ch in chunks:
                    ch.store = ex.weight_grads
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
    ap.add_argument("--schedules", nargs="+", default=[k for k, _ in SCHEDULES], choices=[k for k, _ in SCHEDULES])
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args.pp, port, args, queue), nprocs=args.pp, join=True, start_method="spawn")
    per_rank = dict(queue.get() for _ in range(args.pp))
    p = args.pp
    print(
        f"# pipeline bubble: p={p} gloo CPU processes, uniform stages (forward {args.fwd_ms:g} ms + backward "
        f"{2 * args.fwd_ms:g} ms per rank per micro-batch, {args.compute}; zero-bubble: B and W {args.fwd_ms:g} ms "
        f"each), {args.steps} steps after {args.warmup} warm-up; {platform.node() or 'host'}: {os.cpu_count()} "
        f"cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print("| schedule | vpp | m | step wall (s) | measured bubble | theory | ideal-machine simulation |")
    print("|---|---|---|---|---|---|---|")
    for idx, (kind, vpp, m, _, _) in enumerate(per_rank[0]):
        walls = [per_rank[r][idx][3] for r in range(p)]
        busy = [per_rank[r][idx][4] for r in range(p)]
        wall = max(walls)
        measured = sum(1 - b / wall for b in busy) / p
        theory = _theory(kind, p, vpp, m)
        f = args.fwd_ms / vpp
        t_sim = simulate(kind, p, vpp, m, f, f, f)
        sim = 1 - m * vpp * 3 * f / t_sim
        shown = f"{theory:.3f}" if theory is not None else "n/a (m < 2p-1)"
        print(f"| {kind} | {vpp} | {m} | {wall:.3f} | {measured:.3f} | {shown} | {sim:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
