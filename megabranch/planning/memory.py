"""Per-stage memory and parameters of a pipeline x tensor-parallel layout, from a meta-device build (nothing is
allocated). Used by megabranch.memory_plan (the report with its imbalance check) and `megabranch-train --dry-run`.

Every pipeline rank's stage modules are built on the meta device with the trainer's own code
(megabranch.parallel.stage.build_stage + apply_tensor_parallel), so the parameter counts are exact, tied-table
copies and tensor-parallel shards included (the rank reported is tensor-parallel rank 0). Per stage:

    weights             fp32 (bf16 runs autocast fp32 parameters, so there are no separate master weights)
    grads               what is really allocated for gradients (data_parallel.gradient_bytes): each parameter's
                        gradient once, in its dtype; with dp > 1 that is the all-reduce bucket buffers (every
                        .grad is a view into them, no second copy), with dp == 1 autograd's own .grad tensors
    optimizer           AdamW exp_avg + exp_avg_sq, fp32 = 8 bytes/param; divided by dp with ZeRO-1
    act/mb              activations one micro-batch of `tokens` target tokens keeps for its backward, with the
                        configured parallel.recompute (and, for comparison, without recomputation); under
                        parallel.sequence_parallel the replicated regions' share of it is 1/tp
    total               weights + grads + optimizer + act/mb: what the layout decides, and what is balanced
    peak                total with every micro-batch the schedule has in flight on that stage (1F1B: stage r
                        holds pp - r of them); under a split backward (zb-h1, zb-v) a micro-batch holds its
                        activations from F to B and what B leaves for W (cost_model.chunk_weight_grad_bytes)
                        from B to W, so the W's a stage postpones count too
    sent/mb             bytes the stage's chunks send on for one micro-batch (their input gradients come back
                        the same size); under DLCL every hidden is the stack's history so far (model/span.py);
                        1/tp of each sequence under parallel.sequence_parallel
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from ..parallel.data_parallel import gradient_bytes
from ..parallel.grid import Grid
from ..parallel.schedules import check_schedule, placement_of, schedule_actions, splits_backward
from ..parallel.stage import build_stage
from .cost_model import CostModel
from .partition import plan_layout

MB = 2**20


def peak_in_flight(
    kind: str,
    pp: int,
    vpp: int,
    m: int,
    rank: int,
    act: list[float],
    w_act: list[float] | None = None,
    during: list | None = None,
    sent: list[float] | None = None,
) -> float:
    """Most activation bytes rank `rank` holds at once under the schedule (act[v]: one micro-batch of chunk v from
    its forward to its backward; w_act[v]: from a split backward's B to its W, default act[v]; during[v]: the
    (F, B, W) bytes one action of chunk v reaches above what was held before it, cost_model.chunk_transients;
    sent[v]: the gradient a B of chunk v sends to another rank, which the executor holds until the step ends)."""
    w_act = act if w_act is None else w_act
    split = splits_backward(kind)
    held, peak = 0.0, 0.0
    for op, v, _ in schedule_actions(kind, pp, vpp, m, rank):
        if during is not None:
            peak = max(peak, held + during[v]["FBW".index(op)])
        if op == "F":
            held += act[v]
        elif op == "B":
            held += ((w_act[v] - act[v]) if split else -act[v]) + (sent[v] if sent is not None else 0.0)
        else:
            held -= w_act[v]
        peak = max(peak, held)
    return peak


def stage_peak(cm: CostModel, layout, kind: str, m: int, rank: int, static: float) -> float:
    """Planned peak bytes of pipeline rank `rank`: its `static` bytes (weights, gradients, optimizer state) plus
    the most the schedule holds at once (activations in flight, each action's transients) and, for a schedule
    that does not split its backward, the low-precision copies autocast keeps of the weights for the whole
    schedule; or, when more, the optimizer step's: one float32 copy of the parameters (the multi-tensor AdamW's
    temporary, ZeRO-1's all-gathered vector)."""
    chunks = layout.chunks_of_rank(rank)
    act = [cm.chunk_held_bytes(c) for c in chunks]
    w_act = [cm.chunk_weight_grad_bytes(c) for c in chunks]
    during = [cm.chunk_transients(c, splits_backward(kind)) for c in chunks]
    sent = [cm.received_bytes(c) if c.index > 0 and layout.chunks[c.index - 1].rank != rank else 0.0 for c in chunks]
    cached = 0.0 if splits_backward(kind) or cm.act >= 4 else cm.act * sum(cm.chunk_linear_params(c) for c in chunks)
    schedule = cached + peak_in_flight(kind, layout.pp, layout.vpp, m, rank, act, w_act, during, sent)
    return static + max(schedule, 4.0 * cm.params_of(chunks))


def schedule_kind(cfg) -> str:
    """The schedule the trainer runs for cfg.parallel (1f1b with vpp > 1 runs interleaved)."""
    p = cfg.parallel
    return "interleaved" if p.vpp > 1 and p.schedule == "1f1b" else p.schedule


def stage_statics(mc, layout, vocab: int, tp: int, dp: int, zero: bool, recompute: int) -> list[SimpleNamespace]:
    """Per pipeline rank: parameters and the bytes that do not depend on the micro-batch (weights, gradients,
    optimizer state, buffers), from the rank's stage built on the meta device."""
    out = []
    for r in range(layout.pp):
        grid = Grid(tp=tp, pp=layout.pp, dp=dp, vpp=layout.vpp, pp_rank=r, tp_rank=0)
        stage = build_stage(mc, layout, grid, vocab, device="meta", recompute=recompute)
        unique = list({id(q): q for q in stage.parameters()}.values())
        params = sum(q.numel() for q in unique)
        weights, grads = 4.0 * params, float(gradient_bytes(unique))
        optim = 8.0 * params / (dp if zero else 1)
        buffers = float(sum(b.numel() * b.element_size() for b in stage.buffers()))
        out.append(
            SimpleNamespace(
                params=params,
                weights=weights,
                grads=grads,
                optim=optim,
                buffers=buffers,
                static=weights + grads + optim + buffers,
            )
        )
    return out


def cost_model(cfg, vocab: int, tokens: int, src_len: int, tgt_len: int, dp: int, zero: bool) -> CostModel:
    p = cfg.parallel
    act_size = 2 if cfg.optim.precision in ("bf16", "fp16") else 4
    return CostModel(
        cfg.model,
        vocab,
        tp=p.tp,
        tokens=tokens,
        src_len=src_len,
        tgt_len=tgt_len,
        act_size=act_size,
        recompute=p.recompute,
        state_bytes_per_param=4 + 4 + 8 / (dp if zero else 1),
        sequence_parallel=p.sequence_parallel,
    )


def plan(cfg, vocab: int, tokens: int, src_len: int, tgt_len: int, balance: str, dp: int, zero: bool, m: int):
    p, mc = cfg.parallel, cfg.model
    tp, pp, vpp = p.tp, p.pp, p.vpp
    cm = cost_model(cfg, vocab, tokens, src_len, tgt_len, dp, zero)
    kind = schedule_kind(cfg)
    check_schedule(kind, pp, vpp, m)
    layout = plan_layout(
        mc,
        pp,
        vpp,
        vocab,
        tp=tp,
        layout=p.layout,
        cost_model=cm,
        by=balance,
        max_imbalance=1e9,
        placement=placement_of(kind),
    )
    statics = stage_statics(mc, layout, vocab, tp, dp, zero, p.recompute)
    times = cm.chunk_costs(layout)
    rows = []
    for r, st in enumerate(statics):
        chunks = layout.chunks_of_rank(r)
        act = [cm.chunk_activation_bytes(c) for c in chunks]
        act_full = [cm.chunk_activation_bytes(c, recompute=0) for c in chunks]
        rows.append(
            SimpleNamespace(
                rank=r,
                layers="|".join(c.describe() for c in chunks),
                params=st.params,
                weights=st.weights,
                grads=st.grads,
                optim=st.optim,
                buffers=st.buffers,
                act=sum(act),
                act_full=sum(act_full),
                total=st.static + sum(act),
                sent=sum(cm.message_bytes(c) for c in chunks),
                peak=stage_peak(cm, layout, kind, m, r, st.static),
                time=sum(times[c.index].time for c in chunks),
            )
        )
    return layout, rows, kind


def fmt_mb(b: float) -> str:
    return f"{b / MB:,.1f}"


def print_table(rows, out=None) -> None:
    out = out or sys.stdout
    head = [
        "stage",
        "layers",
        "params (M)",
        "weights MB",
        "grads MB",
        "optim MB",
        "act/mb MB",
        "act/mb no-rc MB",
        "total MB",
        "peak MB",
        "sent/mb MB",
    ]
    body = [
        [
            str(r.rank),
            r.layers if len(r.layers) <= 28 else r.layers[:25] + "...",
            f"{r.params / 1e6:,.2f}",
            fmt_mb(r.weights),
            fmt_mb(r.grads),
            fmt_mb(r.optim),
            fmt_mb(r.act),
            fmt_mb(r.act_full),
            fmt_mb(r.total),
            fmt_mb(r.peak),
            fmt_mb(r.sent),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return (
            "| " + " | ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
        )

    print(line(head), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for b in body:
        print(line(b), file=out)
