"""`megabranch-train --rehearse`: a config's cluster run rehearsed on one CPU. For each chosen rank, that rank's
engine (training.engine.Trainer: its stage of the real model, tensor-parallel shards, optimizer or ZeRO-1 shard,
gradient buckets, precision) is built at full size on fake tensors over a fake world of the run's size, and one
training step of its own action list runs (F, B, W per micro-batch; messages are fake tensors of the planned
shape and dtype; collectives move nothing), then the optimizer step. Reported per rank: parameters, the peak memory
split by kind and where in the step it falls, FLOPs, device-to-host reads, and from the roofline of a named GPU
with the simulated bubble a predicted step time, tokens/s per GPU and MFU, beside the planner's numbers
(planning/memory.py, planning/cost_model.py). The instruments are planning/rehearsal.py's.

The step rehearsed is a steady-state one: the engine first takes one update with zero gradients, so AdamW's state
exists as from the second step on. Micro-batches are the planner's: data.max_tokens target tokens in sentences of
64 source and 64 target tokens. Where a GPU run differs from the CPU's, the rehearsal takes the GPU's side:
layer_norm in float32 under autocast, AdamW's multi-tensor (foreach) step, allocations in 512-byte blocks; fp16
runs as bf16 (the same bytes; the loss scaler's state is a few numbers).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .config import ints
from .dry_run import data_vocab, resolve_world_size
from .errors import UserError
from .parallel.executor import MicroBatch
from .parallel.grid import rank_of
from .parallel.schedules import placement_of
from .planning.memory import cost_model, plan, schedule_kind
from .planning.partition import plan_layout
from .planning.rehearsal import (
    GPU,
    GPUS,
    GRANULE,
    KINDS,
    HostReads,
    MemoryTimeline,
    Peak,
    SyncLog,
    autocast_of,
    fake_world,
    gpu_kernels,
    gpu_named,
    phase_totals,
    roofline_step,
)
from .planning.schedule_choice import SRC_LEN, TGT_LEN, resolve
from .training.engine import Trainer

GiB = 2**30


@dataclass
class RankReport:
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    layers: str
    params: int  # parameters this rank holds (each tied table once)
    peak: Peak  # bytes by kind at the step's peak, and where it falls
    static: dict  # bytes of parameters, gradients and optimizer state when the schedule is done
    flops: dict  # FLOPs by phase ("F0", "B1", "W0", "step")
    seconds: dict  # roofline seconds by phase
    syncs: SyncLog
    held: dict = field(default_factory=dict)  # by phase: bytes one action leaves held (F: a micro-batch's
    # activations until its B; B: the change to what waits for W), averaged over the micro-batches
    rise: dict = field(default_factory=dict)  # by phase: the most bytes above its start one action reached
    high: dict = field(default_factory=dict)  # by phase: the most bytes alive during it ("after": the optimizer)
    cuda_held: list | None = None  # forward_held on fake CUDA tensors, per local chunk (a CUDA build of torch)
    planned_peak: float = 0.0
    planned_flops: float = 0.0
    wall_s: float = 0.0
    vpp: int = 1

    @property
    def model_flops(self) -> float:
        """FLOPs of the forward, B and W actions (the step's training FLOPs; with recomputation, also the
        recomputed forward)."""
        f, b, w, _ = phase_totals(self.flops, self.vpp)
        return sum(f) + sum(b) + sum(w)


@dataclass
class Rehearsal:
    cfg: object  # the config as planned (parallel.schedule=auto decided)
    world: int
    dp: int
    gpu: GPU
    layout: object
    kind: str
    m: int
    ranks: list = field(default_factory=list)  # RankReport
    step_s: float | None = None  # predicted step time (every pipeline stage rehearsed)


def parse_ranks(text: str | None, world: int) -> list[int] | None:
    """--ranks "0,5,17" -> [0, 5, 17]; one-line UserErrors for what is not a rank of the world."""
    if text is None:
        return None
    try:
        ranks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ranks {text!r}: expected comma-separated rank numbers, e.g. 0,8,17") from None
    if not ranks:
        raise UserError(f"--ranks {text!r}: expected comma-separated rank numbers, e.g. 0,8,17")
    for r in ranks:
        if not 0 <= r < world:
            raise UserError(f"--ranks: rank {r} is outside the world of {world} ranks (0-{world - 1})")
    return sorted(set(ranks))


def default_ranks(tp: int, pp: int, dp: int) -> list[int]:
    """One rank per pipeline stage (tensor-parallel rank 0, data-parallel rank 0). The tensor-parallel ranks of
    a stage hold shards of one shape (parallelize refuses sizes tp does not divide) and run the same code, and so
    do the data-parallel replicas (ZeRO-1's first shard is the largest): each stands for the others."""
    return [rank_of(0, 0, s, tp, dp) for s in range(pp)]


def fake_batches(cfg, vocab: int, tgt_vocab: int) -> list[dict]:
    """The planner's micro-batches (data.max_tokens target tokens in sentences of SRC_LEN / TGT_LEN tokens), one
    per optim.update_freq, made under the caller's fake mode."""
    b = max(1, cfg.data.max_tokens // TGT_LEN)
    out = []
    for _ in range(cfg.optim.update_freq):
        out.append(
            {
                "src_tokens": torch.randint(4, vocab, (b, SRC_LEN)),
                "prev_output_tokens": torch.randint(4, tgt_vocab, (b, TGT_LEN)),
                "target": torch.randint(4, tgt_vocab, (b, TGT_LEN)),
                "ntokens": b * TGT_LEN,
            }
        )
    return out


def as_on_cuda(optimizer) -> None:
    """torch's AdamW takes its multi-tensor (foreach) step on CUDA by default (one full-size temporary), its
    per-tensor one on the CPU: rehearse the GPU's."""
    if isinstance(optimizer, torch.optim.AdamW):
        for group in optimizer.param_groups:
            group["foreach"] = True


def classify(timeline: MemoryTimeline, engine, reads: HostReads) -> None:
    """Tag what the engine holds across steps: its parameters, their gradients (dp > 1: the bucket buffers the
    .grad are views of; dp == 1: tagged as the backward makes them) and the optimizer state; AdamW's step
    counters are host tensors on a GPU run."""
    params = list({id(p): p for p in engine.model.parameters()}.values())
    for p in params:
        timeline.retag(p, "params")
        if p.grad is not None:
            timeline.retag(p.grad, "grads")
    opt = engine.optimizer
    ids = {id(p) for p in params}
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                timeline.retag(value, "optim")
                if key == "step":
                    reads.host_tensor(value)
    for value in vars(opt).values():
        if isinstance(value, torch.Tensor) and id(value) not in ids:
            timeline.retag(value, "optim")


def rehearse_rank(cfg, rank: int, world: int, vocab: int, tgt_vocab: int, gpu: GPU, granule: int = GRANULE):
    """Build global rank `rank`'s engine on fake tensors over a fake world of `world` ranks and run one steady-
    state training step -> RankReport (planner columns empty)."""
    started = time.perf_counter()
    with fake_world(rank, world), FakeTensorMode(allow_non_fake_inputs=True):
        report = measure_step(cfg, vocab, tgt_vocab, gpu, granule)
    report.wall_s = time.perf_counter() - started
    return report


def measure_step(cfg, vocab: int, tgt_vocab: int, gpu: GPU, granule: int = GRANULE, fake: bool = True):
    """This process's engine (over the process group there is: the fake world, or a real one) built under the
    instruments, its first update taken with zero gradients, then one training step measured -> RankReport.
    fake=False: real tensors, and host reads return their real values (still counted)."""
    syncs = SyncLog()
    reads = HostReads(syncs, answer=fake)
    timeline = MemoryTimeline(gpu, granule, reads)
    with gpu_kernels(), reads, timeline:
        engine = Trainer(cfg, vocab, tgt_vocab, "cpu", init_seed=0)
        as_on_cuda(engine.optimizer)
        timeline.at("the first update (optimizer state)")
        for p in engine.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        engine.clip_and_step()
        classify(timeline, engine, reads)

        def gradient(q):  # dp == 1: a gradient is the backward's tensor that AccumulateGrad kept
            if q.grad is not None:
                timeline.retag(q.grad, "grads")

        hooks = [
            p.register_post_accumulate_grad_hook(gradient)
            for p in {id(q): q for q in engine.params}.values()
            if p.requires_grad
        ]
        batches = fake_batches(cfg, vocab, tgt_vocab)
        engine.executor.on_action = timeline.action
        timeline.at("the step, before the schedule")
        timeline.reset_peak()
        for kept in (timeline.flops, timeline.seconds, timeline.held, timeline.actions, timeline.rise, timeline.high):
            kept.clear()
        syncs.counts.clear()
        engine.train_step(batches)
        timeline.at("after the step")
        for h in hooks:
            h.remove()
        g = engine.grid
        layers = "|".join(c.describe() for c in engine.layout.chunks_of_rank(g.pp_rank))
        params = sum(p.numel() for p in {id(q): q for q in engine.model.parameters()}.values())
    held = {ph: timeline.held[ph] / n for ph, n in timeline.actions.items()}
    static = {k: timeline.at_end[k] for k in ("params", "grads", "optim")}
    return RankReport(
        g.rank,
        g.tp_rank,
        g.pp_rank,
        g.dp_rank,
        layers,
        params,
        timeline.peak,
        static,
        dict(timeline.flops),
        dict(timeline.seconds),
        syncs,
        held=held,
        rise=dict(timeline.rise),
        high=dict(timeline.high),
        vpp=g.vpp,
    )


def forward_held(cfg, rank: int, world: int, vocab: int, tgt_vocab: int, device: str) -> list[int]:
    """Bytes one micro-batch's forward of each local chunk of global rank `rank` keeps for its backward (the
    tensors autograd saves, and the chunk's output or loss), on fake tensors of `device` under the run's
    autocast. On "cuda" (a CUDA build of torch, no GPU needed) this is the GPU run's own autocast and kernel
    choice, and any tensor the forward makes on the CPU (a mask, positions, alpha, a random seed) fails it; on
    "cpu", planning.rehearsal.gpu_kernels stands in for CUDA's kernels. -> one number per local chunk."""
    held = []
    kernels = gpu_kernels() if device == "cpu" else contextlib.nullcontext()
    reads = HostReads(SyncLog())
    with (
        fake_world(rank, world),
        FakeTensorMode(allow_non_fake_inputs=True),
        reads,
        MemoryTimeline(GPUS["H100"], 1, reads),
        kernels,
    ):
        engine = Trainer(cfg, vocab, tgt_vocab, device, init_seed=0)
        (batch,) = fake_batches(cfg, vocab, tgt_vocab)[:1]
        mb = MicroBatch.from_batch(0, batch, engine.device)
        engine.model.train()
        ex = engine.executor
        for v, chunk in enumerate(engine.layout.chunks_of_rank(engine.grid.pp_rank)):
            inputs = [
                torch.empty(shape, dtype=engine.precision.activation_dtype, device=engine.device, requires_grad=True)
                for shape in mb.shapes(chunk, True, ex.d, ex.history)
            ]
            kept = _Storages()
            with torch.autograd.graph.saved_tensors_hooks(kept.add, lambda t: t), autocast_of(engine.precision):
                out = engine.model[v](mb.src_tokens, mb.prev_tokens, *inputs)
                out = ex.token_loss(out, mb) if chunk.output else out
            for t in out:
                kept.add(t)
            held.append(kept.bytes())
    return held


class _Storages:
    """Distinct storages of the tensors added (and the tensors, so they stay alive)."""

    def __init__(self):
        self._kept: dict = {}

    def add(self, t: torch.Tensor) -> torch.Tensor:
        self._kept.setdefault(id(t.untyped_storage()), t)
        return t

    def bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self._kept.values())


def planned(cfg, vocab: int, tgt_vocab: int, dp: int):
    """The trainer's layout for the planned config, and the planner's rows (planning/memory.plan) and cost-model
    FLOPs per pipeline rank for it."""
    p, o = cfg.parallel, cfg.optim
    kind = schedule_kind(cfg)
    layout = plan_layout(
        cfg.model,
        p.pp,
        p.vpp,
        vocab,
        tgt_vocab,
        p.tp,
        layout=p.layout,
        by=p.balance,
        recompute=p.recompute,
        placement=placement_of(kind),
    )
    pinned = copy.deepcopy(cfg)
    pinned.parallel.layout = str(layout)
    _, rows, _ = plan(pinned, vocab, cfg.data.max_tokens, SRC_LEN, TGT_LEN, p.balance, dp, p.zero, o.update_freq)
    cm = cost_model(cfg, vocab, cfg.data.max_tokens, SRC_LEN, TGT_LEN, dp, p.zero)
    flops = [sum(cm.chunk_step_flops(layout, c, o.update_freq) for c in layout.chunks_of_rank(r)) for r in range(p.pp)]
    return layout, kind, rows, flops


def rehearse(
    cfg,
    world_size: int | None = None,
    ranks: str | None = None,
    gpu: str = "H100",
    vocab: int | None = None,
    gpu_memory_gb: float | None = None,
    granule: int = GRANULE,
    out=None,
) -> Rehearsal:
    """Rehearse `cfg` on a world of `world_size` ranks (default $WORLD_SIZE, else tp * pp): the ranks of
    `ranks` ("0,8,17"; default one per pipeline stage), priced for `gpu`. Prints the tables to `out` (None:
    stdout; False: nothing) and returns the numbers."""
    spec = gpu_named(gpu)
    ints(1).check_flag("--vocab", vocab, " (a vocabulary size)")
    world, dp = resolve_world_size(cfg, world_size)
    chosen = parse_ranks(ranks, world)
    if vocab:
        src_v, tgt_v = vocab, vocab
    else:
        src_v, tgt_v, _ = data_vocab(cfg.data.data_dir)
    cfg = resolve(cfg, src_v, tgt_v, dp, gpu_memory_gb).cfg
    if cfg.optim.precision == "fp16":
        cfg = copy.deepcopy(cfg)
        cfg.optim.precision = "bf16"
    p = cfg.parallel
    layout, kind, rows, flops = planned(cfg, src_v, tgt_v, dp)
    result = Rehearsal(cfg, world, dp, spec, layout, kind, cfg.optim.update_freq)
    for r in chosen or default_ranks(p.tp, p.pp, dp):
        report = rehearse_rank(cfg, r, world, src_v, tgt_v, spec, granule)
        report.planned_peak, report.planned_flops = rows[report.pp_rank].peak, flops[report.pp_rank]
        result.ranks.append(report)
    result.step_s = predicted_step(result)
    if torch.version.cuda:  # a CUDA build of torch: each stage's forward on fake CUDA tensors too
        for report in result.ranks:
            report.cuda_held = forward_held(cfg, report.rank, world, src_v, tgt_v, "cuda")
    if out is not False:
        print_report(result, out or sys.stdout)
    return result


def predicted_step(r: Rehearsal) -> float | None:
    """Step seconds: the schedule's ideal-machine makespan with each chunk's roofline (F, B, W) seconds, plus the
    slowest rank's work outside the schedule. None unless every pipeline stage was rehearsed."""
    pp, vpp = r.layout.pp, r.layout.vpp
    by_stage = {x.pp_rank: x for x in r.ranks}
    if len(by_stage) < pp:
        return None
    k = pp * vpp
    f, b, w = [0.0] * k, [0.0] * k, [0.0] * k
    rest = 0.0
    for stage, rep in by_stage.items():
        ff, bb, ww, other = phase_totals(rep.seconds, vpp)
        for v, chunk in enumerate(r.layout.chunks_of_rank(stage)):
            f[chunk.index], b[chunk.index], w[chunk.index] = ff[v] / r.m, bb[v] / r.m, ww[v] / r.m
        rest = max(rest, other)
    return roofline_step(r.kind, pp, vpp, r.m, f, b, w) + rest


def _table(head: list[str], body: list[list[str]], out) -> None:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for cells in [head, ["-" * w for w in widths]] + body:
        print(
            "| "
            + " | ".join(
                c.rjust(w) if i and c[:1].isdigit() else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )
            + " |",
            file=out,
        )


def _g(n: float) -> str:
    return f"{n / GiB:.2f}"


def print_report(r: Rehearsal, out) -> None:
    cfg, p = r.cfg, r.cfg.parallel
    print(
        f"# rehearsal: world {r.world} = tp {p.tp} x pp {p.pp} x dp {r.dp}; schedule {r.kind}"
        f"{f' vpp {p.vpp}' if p.vpp > 1 else ''}; {r.m} micro-batches of {cfg.data.max_tokens} target tokens; "
        f"{cfg.optim.precision}{'; ZeRO-1' if p.zero else ''}; recompute {p.recompute}",
        file=out,
    )
    print("memory per rank (GiB; fake tensors at full size; peak split by kind; plan: planning/memory.py):", file=out)
    body = []
    for x in r.ranks:
        diff = (x.peak.total - x.planned_peak) / x.planned_peak * 100 if x.planned_peak else float("nan")
        body.append(
            [
                str(x.rank),
                f"tp{x.tp_rank} pp{x.pp_rank} dp{x.dp_rank}",
                x.layers if len(x.layers) <= 24 else x.layers[:21] + "...",
                f"{x.params / 1e6:,.1f}",
            ]
            + [_g(x.peak.kinds[k]) for k in KINDS]
            + [_g(x.peak.total), _g(x.planned_peak), f"{diff:+.1f}%", x.peak.where]
        )
    _table(
        ["rank", "position", "layers", "params M"] + list(KINDS) + ["peak", "plan", "vs plan", "peak falls in"],
        body,
        out,
    )
    print(
        f"compute per rank (FLOPs of the step's F, B and W; cost model: planning/cost_model.py; roofline on "
        f"{r.gpu.name}):",
        file=out,
    )
    body = []
    for x in r.ranks:
        f, b, w, rest = phase_totals(x.seconds, x.vpp)
        diff = (x.model_flops - x.planned_flops) / x.planned_flops * 100 if x.planned_flops else float("nan")
        body.append(
            [
                str(x.rank),
                f"{x.model_flops / 1e12:,.2f}",
                f"{x.planned_flops / 1e12:,.2f}",
                f"{diff:+.1f}%",
                f"{sum(f):.3f}",
                f"{sum(b):.3f}",
                f"{sum(w):.3f}",
                f"{rest:.3f}",
                str(x.syncs.inside_loop()),
                str(x.syncs.outside_loop()),
                f"{x.wall_s:.1f}",
            ]
        )
    _table(
        [
            "rank",
            "TFLOP/step",
            "cost model",
            "vs",
            "F s",
            "B s",
            "W s",
            "rest s",
            "syncs in loop",
            "syncs outside",
            "rehearsed in s",
        ],
        body,
        out,
    )
    if r.step_s is not None:
        per_gpu_tokens = cfg.data.max_tokens * r.m / (p.tp * p.pp)
        model = sum(3 * sum(phase_totals(x.flops, x.vpp)[0]) for x in {x.pp_rank: x for x in r.ranks}.values())
        mfu = model / (p.pp * r.step_s * r.gpu.bf16_flops)
        print(
            f"prediction on {r.gpu.name} (roofline: every op at the GPU's peak FLOP/s or bandwidth, the "
            f"schedule's simulated bubble, no communication time): step {r.step_s:.3f} s, "
            f"{per_gpu_tokens / r.step_s:,.0f} target tokens/s per GPU, MFU {mfu * 100:.1f}%",
            file=out,
        )
    else:
        print("prediction: rehearse every pipeline stage (the default ranks) for the step time", file=out)
    if r.ranks[0].cuda_held is None:
        print(
            "fake-CUDA forward: not run (this torch has no CUDA build; where one is installed each stage's "
            "forward also runs on fake CUDA tensors)",
            file=out,
        )
    else:
        held = "; ".join(f"rank {x.rank}: " + ", ".join(f"{b / 2**20:,.1f}" for b in x.cuda_held) for x in r.ranks)
        print(
            f"fake-CUDA forward: ok, nothing made on the CPU (MiB one micro-batch keeps per local chunk, CUDA's "
            f"autocast and kernel choice: {held})",
            file=out,
        )
    first = r.ranks[0]
    print(f"device-to-host reads in rank {first.rank}'s step:", file=out)
    for line in first.syncs.lines():
        print(f"  {line}", file=out)
