"""Bubble-aware planning: which pipeline schedule, vpp and micro-batch count a layout runs best within a GPU's
memory.

For the config's pipeline (tp, pp, dp, recompute, the model), every candidate (schedule, vpp, micro-batches) is
priced with the cost model: the ideal-machine simulation of its action lists (schedules.simulated_bubble, with
each chunk's forward, B and W times from cost_model.chunk_phase_times) gives its bubble, and the memory plan
(weights, gradients, optimizer state and the activations the schedule holds in flight, memory.peak_in_flight)
its peak on every stage. The micro-batch count never changes what a step trains on: the target tokens per
update of a replica (data.max_tokens x optim.update_freq) stay fixed, and more micro-batches are smaller ones
(down to MIN_MICRO_TOKENS: four of the longest pairs preprocessing keeps, --max-len 256; smaller ones are
mostly kernel launches on a GPU).

    parallel.schedule=auto    the candidate with the least simulated bubble that fits the memory budget (ties:
                              fewer, larger micro-batches, then less memory)
    an explicit schedule      checked against the budget when one is given (--gpu-memory-gb)

`resolve` is the one place that decides: megabranch-train calls it before it builds the engine and the batches,
and --dry-run calls it to print the same decision, so the two always agree. An explicit parallel.layout pins
vpp (its stage count); the other candidates are built with the trainer's own automatic split.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..config import POSITIVE
from ..errors import UserError
from ..parallel.schedules import check_schedule, placement_of, simulated_bubble
from .memory import cost_model, stage_peak
from .partition import plan_layout

GiB = 2**30
DEFAULT_GPU_GB = 80.0
USABLE = 0.9  # of the GPU's memory: the rest for the CUDA context, allocator fragmentation, transient buffers
MIN_MICRO_TOKENS = 1024
CANDIDATES = (("1f1b", 1), ("zb-h1", 1), ("interleaved", 2), ("interleaved", 4), ("zb-v", 2))
SRC_LEN = TGT_LEN = 64  # sentence lengths the cost model prices (as --dry-run's memory plan)


@dataclass
class Option:
    schedule: str
    vpp: int
    m: int  # micro-batches per step (optim.update_freq)
    max_tokens: int  # target tokens per micro-batch (data.max_tokens)
    bubble: float  # simulated idle fraction of a step
    peaks: list  # planned peak bytes per pipeline stage

    @property
    def peak(self) -> float:
        return max(self.peaks)

    def describe(self) -> str:
        vpp = f" vpp {self.vpp}" if self.vpp > 1 else ""
        return (
            f"{self.schedule}{vpp} with {self.m} micro-batches of {self.max_tokens} tokens "
            f"({self.bubble * 100:.1f}% bubble, peak {self.peak / GiB:.1f} GiB)"
        )


def micro_batch_counts(max_tokens: int, update_freq: int) -> list[int]:
    """Micro-batch counts for the same tokens per update: the configured one, halved while it stays a whole
    number, doubled while micro-batches keep >= MIN_MICRO_TOKENS tokens."""
    tokens, out = max_tokens * update_freq, [update_freq]
    while out[0] % 2 == 0:
        out.insert(0, out[0] // 2)
    while tokens // (2 * out[-1]) >= MIN_MICRO_TOKENS:
        out.append(2 * out[-1])
    return out


def options(cfg, vocab: int, tgt_vocab: int | None, dp: int) -> list[Option]:
    """Every candidate the config's pipeline can run (and the configured one), priced."""
    p, mc, o = cfg.parallel, cfg.model, cfg.optim
    tokens = cfg.data.max_tokens * o.update_freq
    cands = list(CANDIDATES) if p.pp > 1 else [("1f1b", 1)]  # one stage: nothing to schedule
    if p.schedule != "auto" and (p.schedule, p.vpp) not in cands:
        cands.append((p.schedule, p.vpp))
    if p.layout:  # the stage count is pinned
        cands = [(k, v) for k, v in cands if v == p.vpp]
    out = []
    for kind, vpp in cands:
        try:
            layout = plan_layout(
                mc,
                p.pp,
                vpp,
                vocab,
                tgt_vocab,
                p.tp,
                layout=p.layout if vpp == p.vpp else "",
                by=p.balance,
                recompute=p.recompute,
                placement=placement_of(kind),
                sequence_parallel=p.sequence_parallel,
            )
        except UserError:  # too many stages for the layers, or too uneven a split
            continue
        for m in micro_batch_counts(cfg.data.max_tokens, o.update_freq):
            try:
                check_schedule(kind, p.pp, vpp, m)
            except UserError:
                continue
            micro = tokens // m
            cm = cost_model(cfg, vocab, micro, SRC_LEN, TGT_LEN, dp, p.zero)
            times = cm.chunk_phase_times(layout)
            bubble = simulated_bubble(kind, p.pp, vpp, m, *[[t[j] for t in times] for j in range(3)])
            out.append(Option(kind, vpp, m, micro, bubble, stage_peaks(cm, layout, kind, m)))
    return out


def stage_peaks(cm, layout, kind: str, m: int) -> list[float]:
    """Planned peak bytes of every pipeline stage (memory.stage_peak): its parameters' weights, gradients and
    optimizer state and its buffers (cost model, equal to the meta-device build), plus the schedule's."""
    peaks = []
    for r in range(layout.pp):
        chunks = layout.chunks_of_rank(r)
        static = cm.params_of(chunks) * cm.state_bytes + cm.buffer_bytes(chunks)
        peaks.append(stage_peak(cm, layout, kind, m, r, static))
    return peaks


def choose(opts: list[Option], budget: float) -> Option | None:
    """The least bubble among the options that fit `budget` bytes; ties: fewer micro-batches, less memory."""
    fitting = [o for o in opts if o.peak <= budget]
    if not fitting:
        return None
    return min(
        fitting,
        key=lambda o: (
            round(o.bubble, 9),
            o.m,
            o.peak,
            CANDIDATES.index((o.schedule, o.vpp)) if (o.schedule, o.vpp) in CANDIDATES else len(CANDIDATES),
        ),
    )


def budget_bytes(gpu_memory_gb: float) -> float:
    """Usable bytes of a GPU of `gpu_memory_gb` GiB (what torch.cuda reports as total_memory / 2**30)."""
    return gpu_memory_gb * GiB * USABLE


@dataclass
class Plan:
    cfg: object  # the config to train with (parallel.schedule=auto decided)
    options: list  # every priced candidate
    chosen: Option | None  # the option the config runs
    gpu_memory_gb: float
    budget: float  # usable bytes


def resolve(cfg, vocab: int, tgt_vocab: int | None, dp: int, gpu_memory_gb: float | None = None) -> Plan:
    """Decide parallel.schedule=auto (and check an explicit schedule when gpu_memory_gb is given); one-line
    UserErrors name the setting and an option that would fit."""
    p, o = cfg.parallel, cfg.optim
    gb = DEFAULT_GPU_GB if gpu_memory_gb is None else float(gpu_memory_gb)
    POSITIVE.check_flag("--gpu-memory-gb", gb, " (GiB)")
    budget = budget_bytes(gb)
    if p.schedule != "auto":
        check_schedule(p.schedule, p.pp, p.vpp, o.update_freq)
    opts = options(cfg, vocab, tgt_vocab, dp)
    best = choose(opts, budget)
    where = f"--gpu-memory-gb {gb:g} ({USABLE:.0%} usable)"
    if p.schedule == "auto":
        if best is None:
            least = min(opts, key=lambda x: x.peak) if opts else None
            need = f"; the least memory is {least.describe()}" if least else ""
            raise UserError(
                f"parallel.schedule=auto: no schedule of this pipeline fits {where}{need}; set "
                f"parallel.recompute=1, raise parallel.pp or parallel.zero=true"
            )
        planned = copy.deepcopy(cfg)
        planned.parallel.schedule, planned.parallel.vpp = best.schedule, best.vpp
        planned.optim.update_freq, planned.data.max_tokens = best.m, best.max_tokens
        return Plan(planned, opts, best, gb, budget)
    mine = next((x for x in opts if (x.schedule, x.vpp, x.m) == (p.schedule, p.vpp, o.update_freq)), None)
    if gpu_memory_gb is not None and mine is not None and mine.peak > budget:
        stage = mine.peaks.index(mine.peak)
        alt = (
            f"; {best.describe()} fits (parallel.schedule=auto picks it)"
            if best
            else "; nothing fits: set parallel.recompute=1 or raise parallel.pp"
        )
        raise UserError(
            f"parallel.schedule={p.schedule} with optim.update_freq={o.update_freq} needs "
            f"{mine.peak / GiB:.1f} GiB on stage {stage}, over {where}{alt}"
        )
    return Plan(cfg, opts, mine, gb, budget)
