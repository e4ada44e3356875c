"""Peak memory and step time of data-parallel training with gradients as bucket views (megabranch's GradReducer)
against the copy-in/copy-out reducer it replaced, on 2 gloo CPU processes.

    python -m tools.bench.grad_reducer                              # d=512 2L-2L, vocab 32k (31M parameters)
    python -m tools.bench.grad_reducer --d-model 256 --layers 4 --vocab 8000 --steps 5

Each variant runs in its own fresh pair of processes, the same model, data and step as the engine's: micro-
batches with the reducer armed for the last backward (buckets all-reduced while it runs), finish(), global-norm
clipping, AdamW, zero_grad. Variants:

* view: megabranch.parallel.data_parallel.GradReducer: .grad are views into the buckets (one gradient buffer);
* copy: CopyReducer below, the reducer before the views: .grad is autograd's own tensor, each final gradient is
  copied into its bucket slot by a post-accumulate hook, finish() copies the sums back (two gradient buffers).

Each variant runs --rounds times, the order alternating between rounds. Reported per variant: the step time
(rank 0's median over the steps after --warmup, then the median over the rounds), the peak RSS (max over ranks
and rounds, whole process: libraries, weights, AdamW state, activations and gradients) and the gradient bytes
held when the optimizer steps (every distinct .grad storage and bucket buffer, counted once); the last step's loss
shows that
both train the same.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megabranch.config import ModelConfig
from megabranch.model import build_model, label_smoothed_nll_loss
from megabranch.parallel.clip import clip_grad_norm_
from megabranch.parallel.data_parallel import GradReducer, assign_buckets


class CopyReducer:
    """The baseline: GradReducer as it was before its gradients became bucket views (same buckets, same launch
    order, same overlap), holding a second full-size gradient buffer and copying into and out of it."""

    def __init__(self, params, group, bucket_mb: float):
        self.params, self.group, self.armed = list(params), group, False
        self.buckets = []  # [params, buffer, ready, work]
        self.where = {}
        for b, members in enumerate(assign_buckets(self.params, bucket_mb)):
            offsets = [sum(q.numel() for q in members[:i]) for i in range(len(members))]
            for i, p in enumerate(members):
                self.where[id(p)] = (b, offsets[i])
            buffer = torch.zeros(sum(q.numel() for q in members), dtype=members[0].dtype)
            self.buckets.append([members, buffer, set(), None])
        self.next = 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def slot(self, p):
        b, off = self.where[id(p)]
        return self.buckets[b][1][off : off + p.numel()].view_as(p)

    def arm(self):
        self.armed = True

    def _on_grad(self, p):
        if not self.armed:
            return
        self.slot(p).copy_(p.grad)
        self.buckets[self.where[id(p)][0]][2].add(id(p))
        while self.next < len(self.buckets) and len(self.buckets[self.next][2]) == len(self.buckets[self.next][0]):
            self._launch(self.buckets[self.next], copied=True)

    def _launch(self, bucket, copied: bool):
        if not copied:
            for p in bucket[0]:
                if p.grad is None:
                    self.slot(p).zero_()
                else:
                    self.slot(p).copy_(p.grad)
        bucket[3] = dist.all_reduce(bucket[1], group=self.group, async_op=True)
        self.next += 1

    def finish(self):
        self.armed = False
        while self.next < len(self.buckets):
            self._launch(self.buckets[self.next], copied=False)
        for bucket in self.buckets:
            bucket[3].wait()
            for p in bucket[0]:
                if p.grad is None:
                    p.grad = self.slot(p).clone()
                else:
                    p.grad.copy_(self.slot(p))
            bucket[2], bucket[3] = set(), None
        self.next = 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def buffers(self):
        return [b[1] for b in self.buckets]


def _grad_bytes_held(params, buffers) -> int:
    storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in buffers}
    for p in params:
        if p.grad is not None:
            s = p.grad.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _batches(step: int, rank: int, args) -> list:
    g = torch.Generator().manual_seed(1000 * step + rank)
    out = []
    for _ in range(args.micro_batches):
        src = torch.randint(4, args.vocab, (args.batch, args.length), generator=g)
        tgt = torch.randint(4, args.vocab, (args.batch, args.length), generator=g)
        prev = torch.cat([torch.full((args.batch, 1), 2), tgt[:, :-1]], 1)
        out.append((src, prev, tgt))
    return out


def _worker(rank, world, port, variant, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mc = ModelConfig(
            encoder_layers=args.layers,
            decoder_layers=args.layers,
            d_model=args.d_model,
            n_heads=8,
            ffn_dim=4 * args.d_model,
            dropout=0.0,
            max_positions=args.length + 2,
        )
        model = build_model(mc, args.vocab, seed=1)
        params = list({id(p): p for p in model.parameters()}.values())
        group = dist.new_group(list(range(world)))
        if variant == "view":
            reducer = GradReducer(params, group, args.bucket_mb)
            buffers = [b.buffer for b in reducer.buckets]
        else:
            reducer = CopyReducer(params, group, args.bucket_mb)
            buffers = reducer.buffers()
        opt = torch.optim.AdamW(params, lr=1e-4)
        times, held, last = [], 0, 0.0
        for step in range(args.warmup + args.steps):
            batches = _batches(step, rank, args)
            dist.barrier()
            t = time.perf_counter()
            for i, (src, prev, tgt) in enumerate(batches):
                if i == len(batches) - 1:
                    reducer.arm()
                loss = label_smoothed_nll_loss(model(src, prev), tgt, 0.1)[0] / (args.batch * args.length)
                loss.backward()
                last = loss.item() if i == 0 else last + loss.item()
            reducer.finish()
            clip_grad_norm_(params, 1.0)
            held = max(held, _grad_bytes_held(params, buffers))
            opt.step()
            reducer.zero_grad()
            if step >= args.warmup:
                times.append(time.perf_counter() - t)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        queue.put((rank, statistics.median(times), peak_mb, held, sum(p.numel() for p in params), last))
    finally:
        dist.destroy_process_group()


def run_variant(variant: str, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(2, port, variant, args, queue), nprocs=2, join=True, start_method="spawn")
    rows = dict((r[0], r[1:]) for r in (queue.get() for _ in range(2)))
    return {
        "step_s": rows[0][0],
        "peak_rss_mb": max(r[1] for r in rows.values()),
        "grad_mb": rows[0][2] / 2**20,
        "params": rows[0][3],
        "loss": rows[0][4],
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2, help="encoder layers = decoder layers")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4, help="sentences per micro-batch")
    ap.add_argument("--length", type=int, default=16, help="source and target length")
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="fresh runs per variant, alternating (median step time)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = {"copy": [], "view": []}
    for r in range(args.rounds):  # alternating order, so a load that drifts on a shared machine hits both alike
        for v in ("copy", "view") if r % 2 == 0 else ("view", "copy"):
            runs[v].append(run_variant(v, args))
    results = {
        v: dict(rs[0], step_s=statistics.median(x["step_s"] for x in rs), peak_rss_mb=max(x["peak_rss_mb"] for x in rs))
        for v, rs in runs.items()
    }
    n = results["view"]["params"]
    print(
        f"# data-parallel gradient reducer: 2 gloo CPU processes, d={args.d_model} {args.layers}L-{args.layers}L "
        f"vocab {args.vocab} ({n / 1e6:.1f}M parameters, {4 * n / 2**20:.0f} MB of fp32 gradients), "
        f"{args.micro_batches} micro-batches of {args.batch}x{args.length} tokens, buckets {args.bucket_mb:g} MB; "
        f"median of {args.steps} steps after {args.warmup}, median over {args.rounds} alternating runs; "
        f"{platform.node() or 'host'}: {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print("| reducer | step (s) | peak RSS (MB) | gradient bytes held (MB) | last step's loss (rank 0) |")
    print("|---|---|---|---|---|")
    for v, r in results.items():
        print(f"| {v} | {r['step_s']:.3f} | {r['peak_rss_mb']:,.0f} | {r['grad_mb']:,.0f} | {r['loss']:.6f} |")
    c, w = results["copy"], results["view"]
    print(
        f"\nview - copy: peak RSS {w['peak_rss_mb'] - c['peak_rss_mb']:+,.0f} MB, gradient bytes "
        f"{w['grad_mb'] - c['grad_mb']:+,.0f} MB, step time {100 * (w['step_s'] / c['step_s'] - 1):+.1f}%"
    )
    for v, rs in runs.items():
        print(f"{v}: step time per run (s) " + ", ".join(f"{x['step_s']:.3f}" for x in rs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
