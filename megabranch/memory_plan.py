"""Per-stage memory of a pipeline x tensor-parallel layout, from a meta-device build (nothing is allocated).

    python -m megabranch.memory_plan                             # 500L-500L d=512, pp=64, tp=8 (the default example)
    python -m megabranch.memory_plan --config configs/demo.yaml --set parallel.pp=4 --set parallel.tp=2
    python -m megabranch.memory_plan --set parallel.layout='E0-3|E4-5,D0|D1-5' ...

Every pipeline rank's stage modules are built on the meta device with the trainer's own code
(megabranch.parallel.stage.build_stage + apply_tensor_parallel), so the parameter counts are exact, tied-table
copies and tensor-parallel shards included (the rank printed is tensor-parallel rank 0). Per stage:

    weights             fp32 (bf16 runs autocast fp32 parameters, so there are no separate master weights)
    grads               each parameter's gradient once (with --dp > 1 the all-reduce buckets, which the .grad
                        are views into; no second copy)
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
import sys
import time

from .config import load_config
from .errors import UserError, cli_main
from .planning.memory import fmt_mb, plan, print_table
from .planning.partition import imbalance

DEFAULT_EXAMPLE = [
    "model.encoder_layers=500",
    "model.decoder_layers=500",
    "model.d_model=512",
    "model.n_heads=8",
    "model.ffn_dim=2048",
    "parallel.pp=64",
    "parallel.tp=8",
    "parallel.recompute=1",
]


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
    ap.add_argument(
        "--balance",
        choices=("memory", "time"),
        default="memory",
        help="what the automatic layout balances (the trainer's default is time)",
    )
    ap.add_argument("--max-imbalance", type=float, default=0.10, help="allowed (heaviest - lightest) / lightest")
    ap.add_argument("--allow-imbalance", action="store_true", help="exit 0 even when the stages are uneven")
    args = ap.parse_args(argv)
    overrides = args.set if (args.config or args.set) else DEFAULT_EXAMPLE
    cfg = load_config(args.config, overrides)
    if args.dp < 1:
        raise UserError(f"--dp={args.dp}: must be >= 1")
    m = args.micro_batches or 4 * cfg.parallel.pp
    t0 = time.time()
    layout, rows, kind = plan(
        cfg, args.vocab, args.tokens, args.src_len, args.tgt_len, args.balance, args.dp, args.zero, m
    )
    mc, p = cfg.model, cfg.parallel
    print(
        f"# memory plan: {mc.residual} {mc.encoder_layers}L-{mc.decoder_layers}L d={mc.d_model} ffn={mc.ffn_dim} "
        f"heads={mc.n_heads} vocab={args.vocab}; tp={p.tp} pp={p.pp} vpp={p.vpp} dp={args.dp}"
        f"{' zero-1' if args.zero else ''}{' sequence-parallel' if p.sequence_parallel else ''}; "
        f"recompute={p.recompute}; {args.tokens} tokens per micro-batch; "
        f"schedule {kind} with {m} micro-batches; {cfg.optim.precision}; tensor-parallel rank 0 of each stage"
    )
    print_table(rows)
    totals = [r.total for r in rows]
    ratio = imbalance(totals)
    heavy, light = max(rows, key=lambda r: r.total), min(rows, key=lambda r: r.total)
    print(
        f"\nheaviest stage {heavy.rank}: {fmt_mb(heavy.total)} MB, "
        f"lightest stage {light.rank}: {fmt_mb(light.total)} MB: "
        f"{(ratio - 1) * 100:.1f}% over (limit {args.max_imbalance * 100:.0f}%); balanced on {args.balance}; "
        f"stage compute time spread {(imbalance([r.time for r in rows]) - 1) * 100:.1f}%"
    )
    print(
        f"parameters: {sum(r.params for r in rows) * p.tp / 1e9:.3f}B over all ranks (tied copies included); "
        f"built on meta in {time.time() - t0:.1f}s"
    )
    print(f"layout: {layout}")
    if ratio - 1 > args.max_imbalance and not args.allow_imbalance:
        print(
            f"memory_plan: error: stage {heavy.rank} is {(ratio - 1) * 100:.1f}% heavier than stage {light.rank} "
            f"(limit {args.max_imbalance * 100:.0f}%); pass --allow-imbalance to accept",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
