"""Activation memory per rank and step time of tensor parallelism with and without sequence parallelism
(parallel.sequence_parallel), side by side, on gloo CPU processes.

    python -m tools.bench.sequence_parallel                 # tp 2, post_ln 4L-4L d=512, 8 x 128 tokens
    python -m tools.bench.sequence_parallel --tp 4 --residual pre_ln --runs 1

Every run is a fresh group of --tp processes (one thread each) training the same model on the same batches;
runs alternate between the variants. Activation memory is what autograd saves for the backward during one
training forward of a micro-batch and its loss on rank 0 (each storage once, parameters and buffers not
counted): what one
micro-batch holds from its forward to its backward, next to what the memory plan (planning/cost_model.py) says
for it. Step time is rank 0's median over --steps steps after one, then the median over the runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megabranch.config import Config, ModelConfig
from megabranch.parallel.executor import MicroBatch
from megabranch.parallel.layout import Chunk
from megabranch.planning.cost_model import CostModel
from megabranch.training.engine import Trainer

VOCAB = 8000


def _cfg(args, sequence_parallel: bool) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(
        residual=args.residual,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        d_model=args.d_model,
        n_heads=8,
        ffn_dim=4 * args.d_model,
        dropout=0.0,
        max_positions=1024,
    )
    cfg.parallel.tp, cfg.parallel.sequence_parallel = args.tp, sequence_parallel
    cfg.optim.update_freq, cfg.optim.clip_norm, cfg.log.health = 1, 1.0, False
    return cfg


def _batch(args, step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    src = torch.randint(4, VOCAB, (args.batch, args.length), generator=g)
    tgt = torch.randint(4, VOCAB, (args.batch, args.length), generator=g)
    prev = torch.cat([torch.full((args.batch, 1), 2), tgt[:, :-1]], 1)
    return {"src_tokens": src, "prev_output_tokens": prev, "target": tgt, "ntokens": int(tgt.numel())}


def saved_activation_bytes(model, forward) -> int:
    """Bytes of the distinct storages autograd saves while `forward()` runs, parameters and buffers excluded."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def _worker(rank, world, port, args, sequence_parallel, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tr = Trainer(_cfg(args, sequence_parallel), VOCAB)
        mb = MicroBatch.from_batch(0, _batch(args, 0), "cpu", tr.seq_split)
        chunk = tr.model[0].train()
        act = saved_activation_bytes(chunk, lambda: tr.executor.token_loss(chunk(mb.src_tokens, mb.prev_tokens), mb))
        times, loss = [], None
        for step in range(args.steps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            loss = tr.train_step([_batch(args, step)])["loss"]
            times.append(time.perf_counter() - t0)
        if rank == 0:
            results.put((act, statistics.median(times[1:]), loss))
    finally:
        dist.destroy_process_group()


def _run(args, sequence_parallel: bool) -> tuple[int, float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(args.tp, port, args, sequence_parallel, results), nprocs=args.tp, start_method="spawn"
    )
    return results.get()


def planned_bytes(args, sequence_parallel: bool) -> float:
    """The memory plan's activation bytes of one micro-batch on the whole model's chunk, tp rank 0."""
    cfg = _cfg(args, sequence_parallel)
    tokens = args.batch * args.length
    cm = CostModel(
        cfg.model,
        VOCAB,
        tp=args.tp,
        tokens=tokens,
        src_len=args.length,
        tgt_len=args.length,
        sequence_parallel=sequence_parallel,
    )
    return cm.chunk_activation_bytes(Chunk.of_layers(0, 2 * args.layers, args.layers, args.layers))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--residual", default="post_ln")
    ap.add_argument("--layers", type=int, default=4, help="encoder layers = decoder layers")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="sentences per micro-batch")
    ap.add_argument("--length", type=int, default=128, help="source = target tokens per sentence")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2, help="runs per variant, alternating")
    args = ap.parse_args(argv)
    rows: dict = {False: [], True: []}
    for _ in range(args.runs):
        for sp in (False, True):
            rows[sp].append(_run(args, sp))
    print(
        f"# sequence parallelism: tp {args.tp}, {args.residual} {args.layers}L-{args.layers}L d={args.d_model} "
        f"ffn={4 * args.d_model}, {args.batch} x {args.length} tokens per micro-batch, vocab {VOCAB}; "
        f"{args.runs} runs x {args.steps} steps; torch {torch.__version__}, gloo, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print("| sequence parallel | activations per rank, measured (MB) | planned (MB) | step (s) | loss after |")
    print("|---|---|---|---|---|")
    for sp in (False, True):
        act = rows[sp][0][0]
        step = statistics.median(r[1] for r in rows[sp])
        print(
            f"| {'yes' if sp else 'no'} | {act / 2**20:,.1f} | {planned_bytes(args, sp) / 2**20:,.1f} | "
            f"{step:.3f} | {rows[sp][-1][2]:.6f} |"
        )
    ratio = rows[True][0][0] / rows[False][0][0]
    times = statistics.median(r[1] for r in rows[True]) / statistics.median(r[1] for r in rows[False])
    print(
        f"sequence parallel / plain: activations x{ratio:.3f}, step time x{times:.3f}; step times per run: "
        + "; ".join(f"{'sp' if sp else 'plain'} " + " ".join(f"{r[1]:.3f}" for r in rows[sp]) for sp in rows)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
