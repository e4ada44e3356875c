"""Per-stage memory and parameters of a pipeline x tensor-parallel layout, from a meta-device build (nothing is
allocated). Used by tools/memory_plan.py (the report with its imbalance check) and `megabranch-train --dry-run`.

Every pipeline rank's stage modules are built on the meta device with the trainer's own code
(megabranch.parallel.pipeline.build_stage + apply_tensor_parallel), so the parameter counts are exact, tied-table
copies and tensor-parallel shards included (the rank reported is tensor-parallel rank 0). Per stage:

    weights             fp32 (bf16 runs autocast fp32 parameters, so there are no separate master weights)
    grads               what is really allocated for gradients (data_parallel.gradient_bytes): each parameter's
                        gradient once, in its dtype; with dp > 1 that is the all-reduce bucket buffers (every
                        .grad is a view into them, no second copy), with dp == 1 autograd's own .grad tensors
    optimizer           AdamW exp_avg + exp_avg_sq, fp32 = 8 bytes/param; divided by dp with ZeRO-1
    act/mb              activations one micro-batch of `tokens` target tokens keeps for its backward, with the
                        configured parallel.recompute (and, for comparison, without recomputation)
    total               weights + grads + optimizer + act/mb: what the layout decides, and what is balanced
    peak                total with every micro-batch the schedule has in flight on that stage (1F1B: stage r
                        holds pp - r of them)
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from .data_parallel import gradient_bytes
from .grid import Grid
from .partition import CostModel, plan_layout
from .pipeline import build_stage, check_schedule, schedule_actions

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
        unique = list({id(q): q for q in stage.parameters()}.values())
        params = sum(q.numel() for q in unique)
        chunks = layout.chunks_of_rank(r)
        act = [cm.chunk_activation_bytes(c) for c in chunks]
        act_full = [cm.chunk_activation_bytes(c, recompute=0) for c in chunks]
        weights, grads = 4.0 * params, float(gradient_bytes(unique))
        optim = 8.0 * params / (dp if zero else 1)
        static = weights + grads + optim
        rows.append(SimpleNamespace(
            rank=r, layers="|".join(c.describe() for c in chunks), params=params, weights=weights, grads=grads,
            optim=optim, act=sum(act), act_full=sum(act_full), total=static + sum(act),
            peak=static + peak_in_flight(kind, pp, vpp, m, r, act),
            time=sum(cm.chunk_costs(layout)[c.index].time for c in chunks),
        ))
    return layout, rows, kind


def fmt_mb(b: float) -> str:
    return f"{b / MB:,.1f}"


def print_table(rows, out=None) -> None:
    out = out or sys.stdout
    head = ["stage", "layers", "params (M)", "weights MB", "grads MB", "optim MB", "act/mb MB", "act/mb no-rc MB",
            "total MB", "peak MB"]
    body = [[str(r.rank), r.layers if len(r.layers) <= 28 else r.layers[:25] + "...", f"{r.params / 1e6:,.2f}",
             fmt_mb(r.weights), fmt_mb(r.grads), fmt_mb(r.optim), fmt_mb(r.act), fmt_mb(r.act_full), fmt_mb(r.total),
             fmt_mb(r.peak)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(line(head), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for b in body:
        print(line(b), file=out)


# --- megabranch-train --dry-run -------------------------------------------------------------------------------

def data_vocab(data_dir: str, default: int = 32000) -> tuple[int, int, str]:
    """(source vocab, target vocab, where it came from): data_dir/meta.json when it exists, else `default`."""
    import json
    import os

    path = os.path.join(data_dir, "meta.json")
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                meta = json.load(fh)
            sizes = meta["vocab_size"]
            return int(sizes[meta["source_lang"]]), int(sizes[meta["target_lang"]]), path
        except (ValueError, KeyError, TypeError):
            pass
    return default, default, f"default {default} (no {path})"


def model_parameters(mc, vocab: int, tgt_vocab: int) -> int:
    """Parameters of the single-process model (tied tables once), counted on the meta device."""
    from ..model.transformer import count_parameters, meta_model

    return count_parameters(meta_model(mc, vocab, tgt_vocab))


def resolve_world_size(cfg, world_size: int | None = None) -> tuple[int, int]:
    """(world size, data-parallel size): world_size, else $WORLD_SIZE, else tp * pp; refuses a world size that is
    not a multiple of tp * pp (a layout that does not fit the machines)."""
    import os

    from ..errors import UserError

    p = cfg.parallel
    mp = p.tp * p.pp
    if world_size is None:
        env = os.environ.get("WORLD_SIZE", "")
        world_size = int(env) if env.isdigit() and int(env) > 0 else mp
    if world_size < 1 or world_size % mp:
        raise UserError(f"world size {world_size} does not fit parallel.tp * parallel.pp = {p.tp} * {p.pp} = {mp}: "
                        f"it must be a positive multiple of {mp} (nodes x GPUs per node = tp * pp * dp)")
    return world_size, world_size // mp


def dry_run(cfg, world_size: int | None = None, backend: str = "native", ds_config: dict | None = None,
            vocab: int | None = None, out=None) -> dict:
    """Print the stage layout, parameters per stage, the memory plan and the effective batch for `cfg`, without
    training or a process group. Raises UserError for what the trainer would refuse. Returns the numbers."""
    import copy

    from ..errors import UserError

    out = out or sys.stdout
    p, mc, o = cfg.parallel, cfg.model, cfg.optim
    world, dp = resolve_world_size(cfg, world_size)
    if vocab:
        src_v, tgt_v, where = vocab, vocab, "--vocab"
    else:
        src_v, tgt_v, where = data_vocab(cfg.data.data_dir)
    if mc.share_all_embeddings and src_v != tgt_v:
        raise UserError(f"model.share_all_embeddings needs one joint vocabulary ({where}: {src_v} vs {tgt_v})")
    if backend == "deepspeed" and (p.tp != 1 or p.vpp != 1):
        raise UserError(f"--backend deepspeed runs pipeline x data parallelism only: set parallel.tp=1 and "
                        f"parallel.vpp=1 (got tp={p.tp}, vpp={p.vpp})")
    layout = plan_layout(mc, p.pp, p.vpp, src_v, tgt_v, p.tp, layout=p.layout, by=p.balance, recompute=p.recompute)
    planned = copy.deepcopy(cfg)
    planned.parallel.layout = str(layout)
    m = o.update_freq
    kind = p.schedule if not (p.vpp > 1 and p.schedule == "1f1b") else "interleaved"
    check_schedule(kind, p.pp, p.vpp, m)
    _, rows, kind = plan(planned, src_v, cfg.data.max_tokens, 64, 64, p.balance, dp, p.zero, m)
    total = model_parameters(mc, src_v, tgt_v)
    tokens = cfg.data.max_tokens * o.update_freq * dp
    print(f"# dry run ({backend} backend): {mc.residual} {mc.encoder_layers}L-{mc.decoder_layers}L d={mc.d_model} "
          f"ffn={mc.ffn_dim} heads={mc.n_heads}; vocab {src_v}/{tgt_v} ({where})", file=out)
    print(f"world size {world} = tp {p.tp} x pp {p.pp} x dp {dp}; vpp {p.vpp}; schedule {kind}; "
          f"recompute {p.recompute}; {o.precision}{'; ZeRO-1' if p.zero else ''}", file=out)
    print(f"parameters: {total:,} ({total / 1e6:.1f}M, single-process model, tied tables once)", file=out)
    print(f"stage layout: {layout}", file=out)
    if backend == "deepspeed":
        from ..backends.deepspeed import ds_parts

        part = ((ds_config or {}).get("pipeline") or {}).get("partition", "megabranch")
        if part in ("megabranch", "best", ""):
            print(f"deepspeed layer parts: {ds_parts(cfg, p.pp, src_v, tgt_v)} (LayerSpec indices per stage)", file=out)
        else:
            print(f"deepspeed partition_method: {part} (DeepSpeed splits at start-up)", file=out)
    print(f"memory plan ({cfg.data.max_tokens} tokens per micro-batch, {m} micro-batches per step, "
          f"tensor-parallel rank 0 of each stage):", file=out)
    print_table(rows, out)
    print(f"effective batch: max_tokens {cfg.data.max_tokens} x update_freq {o.update_freq} x dp {dp} = "
          f"{tokens:,} tokens per step", file=out)
    return {"world_size": world, "dp": dp, "layout": str(layout), "parameters": total,
            "stage_parameters": [r.params for r in rows], "peak_bytes": [r.peak for r in rows],
            "effective_tokens": tokens}
