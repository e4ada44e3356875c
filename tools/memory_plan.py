#!/usr/bin/env python3
"""Per-stage memory of a pipeline x tensor-parallel layout, from a meta-device build (nothing is allocated).

    python tools/memory_plan.py                                  # 500L-500L d=512, pp=64, tp=8 (the default example)
    python tools/memory_plan.py --config configs/demo.yaml --set parallel.pp=4 --set parallel.tp=2
    python tools/memory_plan.py --set parallel.layout='E0-3|E4-5,D0|D1-5' ...

Every pipeline rank's stage modules are built on the meta device with the trainer's own code
(megabranch.parallel.pipeline.build_stage + apply_tensor_parallel), so the parameter counts are exact, tied-table
copies and tensor-parallel shards included (the rank printed is tensor-parallel rank 0). Per stage:

    weights, grads      fp32 (bf16 runs autocast fp32 parameters, so there are no separate master weights)
    optimizer           AdamW exp_avg + exp_avg_sq, fp32 = 8 bytes/param; divided by dp with --zero (ZeRO-1)
    act/mb              activations one micro-batch of --tokens target tokens keeps for its backward, with the
                        configured parallel.recompute (and, for comparison, without recomputation)
    total               weights + grads + optimizer + act/mb: what the layout decides, and what is balanced
    peak                total with every micro-batch the schedule has in flight on that stage (1F1B: stage r
                        holds pp - r of them; no layout can even that out, so it is reported, not balanced)

Exit status 1 when the heaviest stage's total is more than --max-imbalance (10%) over the lightest, unless
--allow-imbalance; 2 on a configuration error. The automatic layout balances memory here (--balance memory) and
the layout string to train with exactly this split is printed (parallel.layout).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabranch.config import load_config  # noqa: E402
from megabranch.errors import UserError, cli_main  # noqa: E402
from megabranch.parallel.grid import Grid  # noqa: E402
from megabranch.parallel.partition import CostModel, imbalance, plan_layout  # noqa: E402
from megabranch.parallel.pipeline import build_stage, check_schedule, schedule_actions  # noqa: E402

DEFAULT_EXAMPLE = [
    "model.encoder_layers=500", "model.decoder_layers=500", "model.d_model=512", "model.n_heads=8",
    "model.ffn_dim=2048", "parallel.pp=64", "parallel.tp=8", "parallel.recompute=1",
]
MB = 2**20


def peak_in_flight(kind: str, pp: int, vpp: int, m: int, rank: int, act: list[float]) -> float:
    """Most activation bytes rank `rank` holds at once under the schedule (act[v]: one micro-batch of chunk v)."""
    held, peak = 0.0, 0.0
    for op, v, _ in schedule_actions(kind, pp, vpp, m, rank):
        held += act[v] if op == "F" else -act[v]
        peak = max(peak, held)
    return peak


def plan(cfg, vocab: int, tokens: int, src_len: int, tgt_len: int, balance: str, dp: int, zero: bool, m: int):
    p, mc = cfg.parallel, cfg.model
    tp, pp, vpp = p.tp, p.pp, p.vpp
    act_size = 2 if cfg.optim.precision in ("bf16", "fp16") else 4
    cm = CostModel(mc, vocab, tp=tp, tokens=tokens, src_len=src_len, tgt_len=tgt_len, act_size=act_size,
                   recompute=p.recompute, state_bytes_per_param=4 + 4 + 8 / (dp if zero else 1))
    layout = plan_layout(mc, pp, vpp, vocab, tp=tp, layout=p.layout, cost_model=cm, by=balance, max_imbalance=1e9)
    kind = p.schedule if not (vpp > 1 and p.schedule == "1f1b") else "interleaved"
    check_schedule(kind, pp, vpp, m)
    rows = []
    for r in range(pp):
        grid = Grid(tp=tp, pp=pp, dp=dp, vpp=vpp, pp_rank=r, tp_rank=0)
        stage = build_stage(mc, layout, grid, vocab, device="meta", recompute=p.recompute)
        params = sum(q.numel() for q in {id(q): q for q in stage.parameters()}.values())
        chunks = layout.chunks_of_rank(r)
        act = [cm.chunk_activation_bytes(c) for c in chunks]
        act_full = [cm.chunk_activation_bytes(c, recompute=0) for c in chunks]
        weights = grads = 4.0 * params
        optim = 8.0 * params / (dp if zero else 1)
        static = weights + grads + optim
        rows.append(SimpleNamespace(
            rank=r, layers="|".join(c.describe() for c in chunks), params=params, weights=weights, grads=grads,
            optim=optim, act=sum(act), act_full=sum(act_full), total=static + sum(act),
            peak=static + peak_in_flight(kind, pp, vpp, m, r, act),
            time=sum(cm.chunk_costs(layout)[c.index].time for c in chunks),
        ))
    return layout, rows, kind


def _fmt(b: float) -> str:
    return f"{b / MB:,.1f}"


def print_table(rows, out=None) -> None:
    out = out or sys.stdout
    head = ["stage", "layers", "params (M)", "weights MB", "grads MB", "optim MB", "act/mb MB", "act/mb no-rc MB",
            "total MB", "peak MB"]
    body = [[str(r.rank), r.layers if len(r.layers) <= 28 else r.layers[:25] + "...", f"{r.params / 1e6:,.2f}",
             _fmt(r.weights), _fmt(r.grads), _fmt(r.optim), _fmt(r.act), _fmt(r.act_full), _fmt(r.total),
             _fmt(r.peak)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(line(head), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for b in body:
        print(line(b), file=out)


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="memory_plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML/JSON config (default: the 500L-500L d=512 pp=64 tp=8 example)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--vocab", type=int, default=32000, help="joint vocabulary size (default 32000)")
    ap.add_argument("--tokens", type=int, default=4096, help="target tokens per micro-batch (default 4096)")
    ap.add_argument("--src-len", type=int, default=64)
    ap.add_argument("--tgt-len", type=int, default=64)
    ap.add_argument("--dp", type=int, default=1, help="data-parallel size (divides the optimizer with --zero)")
    ap.add_argument("--zero", action="store_true", help="ZeRO-1: optimizer states sharded over dp")
    ap.add_argument("--micro-batches", type=int, default=0, help="micro-batches per step for the peak (default 4*pp)")
    ap.add_argument("--balance", choices=("memory", "time"), default="memory",
                    help="what the automatic layout balances (the trainer's default is time)")
    ap.add_argument("--max-imbalance", type=float, default=0.10, help="allowed (heaviest - lightest) / lightest")
    ap.add_argument("--allow-imbalance", action="store_true", help="exit 0 even when the stages are uneven")
    args = ap.parse_args(argv)
    overrides = args.set if (args.config or args.set) else DEFAULT_EXAMPLE
    cfg = load_config(args.config, overrides)
    if args.dp < 1:
        raise UserError(f"--dp={args.dp}: must be >= 1")
    m = args.micro_batches or 4 * cfg.parallel.pp
    t0 = time.time()
    layout, rows, kind = plan(cfg, args.vocab, args.tokens, args.src_len, args.tgt_len, args.balance, args.dp,
                              args.zero, m)
    mc, p = cfg.model, cfg.parallel
    print(f"# memory plan: {mc.residual} {mc.encoder_layers}L-{mc.decoder_layers}L d={mc.d_model} ffn={mc.ffn_dim} "
          f"heads={mc.n_heads} vocab={args.vocab}; tp={p.tp} pp={p.pp} vpp={p.vpp} dp={args.dp}"
          f"{' zero-1' if args.zero else ''}; recompute={p.recompute}; {args.tokens} tokens per micro-batch; "
          f"schedule {kind} with {m} micro-batches; {cfg.optim.precision}; tensor-parallel rank 0 of each stage")
    print_table(rows)
    totals = [r.total for r in rows]
    ratio = imbalance(totals)
    heavy, light = max(rows, key=lambda r: r.total), min(rows, key=lambda r: r.total)
    print(f"\nheaviest stage {heavy.rank}: {_fmt(heavy.total)} MB, "
          f"lightest stage {light.rank}: {_fmt(light.total)} MB: "
          f"{(ratio - 1) * 100:.1f}% over (limit {args.max_imbalance * 100:.0f}%); balanced on {args.balance}; "
          f"stage compute time spread {(imbalance([r.time for r in rows]) - 1) * 100:.1f}%")
    print(f"parameters: {sum(r.params for r in rows) * p.tp / 1e9:.3f}B over all ranks (tied copies included); "
          f"built on meta in {time.time() - t0:.1f}s")
    print(f"layout: {layout}")
    if ratio - 1 > args.max_imbalance and not args.allow_imbalance:
        print(f"memory_plan: error: stage {heavy.rank} is {(ratio - 1) * 100:.1f}% heavier than stage {light.rank} "
              f"(limit {args.max_imbalance * 100:.0f}%); pass --allow-imbalance to accept", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
