"""What the training health monitor costs: train_step time with log.health on and off, side by side.

    OMP_NUM_THREADS=1 python -m tools.bench.health [--layers 6] [--d-model 64] [--steps 60] [--log-interval 10]

Two engines with the same weights take turns step by step on the same batches (so a change of machine load hits
both alike); with the monitor on, every log_interval-th step also measures its update-to-weight ratios, as the
run loop asks. Step times are this process's CPU time (time.process_time: one thread, so what the step computes,
and much less of what other processes on the machine take), median and mean of each, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megabranch.config import load_config
from megabranch.training.engine import Trainer


def _batch(step: int, vocab: int, sentences: int, length: int) -> dict:
    g = torch.Generator().manual_seed(step)
    src = torch.randint(4, vocab, (sentences, length), generator=g)
    tgt = torch.randint(4, vocab, (sentences, length), generator=g)
    prev = torch.cat([torch.full((sentences, 1), 2), tgt[:, :-1]], 1)
    return {"src_tokens": src, "prev_output_tokens": prev, "target": tgt, "ntokens": int(tgt.numel())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--tokens", type=int, default=2048, help="target tokens per step")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-interval", type=int, default=10)
    args = ap.parse_args(argv)
    d = args.d_model
    sets = [
        f"model.encoder_layers={args.layers}",
        f"model.decoder_layers={args.layers}",
        f"model.d_model={d}",
        f"model.n_heads={max(1, d // 16)}",
        f"model.ffn_dim={4 * d}",
        "model.dropout=0.1",
        "optim.clip_norm=1.0",
    ]
    engines = {
        on: Trainer(load_config(None, sets + [f"log.health={str(on).lower()}"]), args.vocab, init_seed=1)
        for on in (False, True)
    }
    times: dict = {False: [], True: []}
    length = 32
    for step in range(args.steps):
        batch = _batch(step, args.vocab, max(1, args.tokens // length), length)
        for on in (False, True) if step % 2 == 0 else (True, False):
            engine = engines[on]
            if on:
                engine.health.measure_next = (step + 1) % args.log_interval == 0
            t0 = time.process_time()
            engine.train_step([batch])
            if on and (step + 1) % args.log_interval == 0:
                engine.health.take_interval(step + 1)
            if step >= 2:  # the first steps warm the allocator up
                times[on].append(time.process_time() - t0)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    mean_off, mean_on = statistics.fmean(times[False]), statistics.fmean(times[True])
    print(
        f"{args.layers}L-{args.layers}L d={d}, {args.tokens} target tokens per step, {torch.get_num_threads()} "
        f"thread(s), {len(times[True])} steps each, update ratios every {args.log_interval} steps"
    )
    print("| monitor | median step (CPU s) | mean step (CPU s) |")
    print("|---|---|---|")
    print(f"| off | {off:.4f} | {mean_off:.4f} |")
    print(f"| on | {on:.4f} | {mean_on:.4f} |")
    print(f"on / off: median {on / off:.4f}, mean {mean_on / mean_off:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
