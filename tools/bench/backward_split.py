"""Time of a backward split into B (input gradient) and W (weight gradients): megabranch's split
(megabranch/parallel/weight_grad.py) and torch.distributed.pipelining's graph-level one (stage_backward_input /
stage_backward_weight) next to one plain backward, on one decoder chunk of growing depth.

    python -m tools.bench.backward_split                       # 9 and 39 decoder layers, d 32, 4 x 8 tokens
    python -m tools.bench.backward_split --layers 9 39 99 --recompute 1

The chunk is a middle decoder slice of megabranch's model (it receives the encoder output and the decoder
hidden, the inputs B differentiates towards) with the output projection. Median over --repeats runs, one thread.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from megabranch.config import ModelConfig
from megabranch.model import Transformer
from megabranch.model.span import Span
from megabranch.parallel.weight_grad import WeightGradStore, defer_weight_grads

VOCAB, B, S, T = 40, 4, 8, 8


def _chunk(layers: int, recompute: int, d: int) -> Transformer:
    n = layers + 1
    cfg = ModelConfig(
        encoder_layers=1, decoder_layers=n, d_model=d, n_heads=4, ffn_dim=2 * d, dropout=0.0, max_positions=64
    )
    model = Transformer(cfg, VOCAB, span=Span.of_layers(2, n + 1, 1, n), seed=0)  # D1..D(n-1) and the output
    model.decoder.recompute = recompute
    return model


def _one(model, mode: str, store=None) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    src, prev = torch.randint(4, VOCAB, (B, S), generator=g), torch.randint(4, VOCAB, (B, T), generator=g)
    d = model.cfg.d_model
    memory = torch.randn(B, S, d, generator=g).requires_grad_()
    y = torch.randn(B, T, d, generator=g).requires_grad_()
    loss = model(src, prev, memory, y).logsumexp(-1).sum()
    t0 = time.perf_counter()
    if mode == "plain":
        loss.backward()
        return time.perf_counter() - t0, 0.0
    if mode == "megabranch":
        with store.collect(0):
            loss.backward()
        t1 = time.perf_counter()
        store.run(0)
        return t1 - t0, time.perf_counter() - t1
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    _, groups = stage_backward_input([loss], None, [memory, y], model.parameters())
    t1 = time.perf_counter()
    stage_backward_weight(model.parameters(), groups)
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[9, 39])
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--recompute", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"# backward split: decoder chunk d={args.d_model}, {B} x {T} tokens, recompute {args.recompute}, "
        f"median of {args.repeats}; torch {torch.__version__}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print("| layers | plain backward (s) | megabranch B (s) | megabranch W (s) | torch B (s) | torch W (s) |")
    print("|---|---|---|---|---|---|")
    for n in args.layers:
        base = _chunk(n, args.recompute, args.d_model)
        row = {}
        for mode in ("plain", "megabranch", "torch"):
            model, store = copy.deepcopy(base), WeightGradStore()
            if mode == "megabranch":
                defer_weight_grads(model, store)
            runs = [_one(model, mode, store) for _ in range(args.repeats + 1)][1:]  # the first warms up
            row[mode] = [statistics.median(r[i] for r in runs) for i in (0, 1)]
        print(
            f"| {n} | {row['plain'][0]:.4f} | {row['megabranch'][0]:.4f} | {row['megabranch'][1]:.4f} | "
            f"{row['torch'][0]:.4f} | {row['torch'][1]:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
