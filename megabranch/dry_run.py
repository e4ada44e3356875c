"""`megabranch-train --dry-run`: the stage layout, parameters per stage, the memory plan, the pipeline schedules
(simulated bubble and peak memory per stage of each schedule x micro-batch count, planning/schedule_choice.py) and the
effective batch of a config, without training or a process group (what the launch scripts print before they
start a job)."""

from __future__ import annotations

import copy
import os
import sys

from .backends.deepspeed.layers import check_layout, check_scheme
from .backends.deepspeed.partition import ds_parts
from .config import ints
from .data.meta import META, read_meta
from .errors import UserError
from .model import count_parameters, meta_model
from .parallel.schedules import check_schedule, placement_of
from .planning.memory import plan, print_table, schedule_kind
from .planning.partition import plan_layout
from .planning.schedule_choice import GiB, resolve


def data_vocab(data_dir: str, default: int = 32000) -> tuple[int, int, str]:
    """(source vocab, target vocab, where it came from): data_dir/meta.json when it exists, else `default`."""
    path = os.path.join(data_dir, META)
    if os.path.isfile(path):
        try:
            meta = read_meta(data_dir)
            first, sizes = meta["directions"][0], meta["vocab_size"]
            return int(sizes[first["source_lang"]]), int(sizes[first["target_lang"]]), path
        except (UserError, KeyError, TypeError, ValueError):
            pass
    return default, default, f"default {default} (no {path})"


def model_parameters(mc, vocab: int, tgt_vocab: int) -> int:
    """Parameters of the single-process model (tied tables once), counted on the meta device."""
    return count_parameters(meta_model(mc, vocab, tgt_vocab))


def resolve_world_size(cfg, world_size: int | None = None) -> tuple[int, int]:
    """(world size, data-parallel size): world_size, else $WORLD_SIZE, else tp * pp; refuses a world size that is
    not a multiple of tp * pp (a layout that does not fit the machines)."""
    p = cfg.parallel
    mp = p.tp * p.pp
    if world_size is None:
        env = os.environ.get("WORLD_SIZE", "")
        world_size = int(env) if env.isdigit() and int(env) > 0 else mp
    if world_size < 1 or world_size % mp:
        raise UserError(
            f"world size {world_size} does not fit parallel.tp * parallel.pp = {p.tp} * {p.pp} = {mp}: "
            f"it must be a positive multiple of {mp} (nodes x GPUs per node = tp * pp * dp)"
        )
    return world_size, world_size // mp


def dry_run(
    cfg,
    world_size: int | None = None,
    backend: str = "native",
    ds_config: dict | None = None,
    vocab: int | None = None,
    out=None,
    gpu_memory_gb: float | None = None,
) -> dict:
    """Print the stage layout, parameters per stage, the memory plan, the schedule table and the effective batch
    for `cfg`, without training or a process group. Raises UserError for what the trainer would refuse (a
    schedule that does not fit `gpu_memory_gb`, when given, included). Returns the numbers."""
    out = out or sys.stdout
    p, mc = cfg.parallel, cfg.model
    world, dp = resolve_world_size(cfg, world_size)
    ints(1).check_flag("--vocab", vocab, " (a vocabulary size)")
    if vocab:
        src_v, tgt_v, where = vocab, vocab, "--vocab"
    else:
        src_v, tgt_v, where = data_vocab(cfg.data.data_dir)
    if mc.share_all_embeddings and src_v != tgt_v:
        raise UserError(f"model.share_all_embeddings needs one joint vocabulary ({where}: {src_v} vs {tgt_v})")
    if backend == "deepspeed":
        check_scheme(mc)
        check_layout(cfg, world)
    asked = p.schedule
    if backend == "deepspeed":
        if asked == "auto":
            raise UserError(
                "parallel.schedule=auto plans the native engine's schedules; --backend deepspeed runs "
                "DeepSpeed's own 1F1B: set parallel.schedule=1f1b"
            )
        planned_cfg, schedule_plan = cfg, None
    else:
        schedule_plan = resolve(cfg, src_v, tgt_v, dp, gpu_memory_gb)
        planned_cfg = schedule_plan.cfg
    p, o = planned_cfg.parallel, planned_cfg.optim
    kind = schedule_kind(planned_cfg)
    layout = plan_layout(
        mc,
        p.pp,
        p.vpp,
        src_v,
        tgt_v,
        p.tp,
        layout=p.layout,
        by=p.balance,
        recompute=p.recompute,
        placement=placement_of(kind),
        sequence_parallel=p.sequence_parallel,
    )
    planned = copy.deepcopy(planned_cfg)
    planned.parallel.layout = str(layout)
    m = o.update_freq
    check_schedule(kind, p.pp, p.vpp, m)
    _, rows, kind = plan(planned, src_v, planned_cfg.data.max_tokens, 64, 64, p.balance, dp, p.zero, m)
    total = model_parameters(mc, src_v, tgt_v)
    tokens = planned_cfg.data.max_tokens * o.update_freq * dp
    print(
        f"# dry run ({backend} backend): {mc.residual} {mc.encoder_layers}L-{mc.decoder_layers}L d={mc.d_model} "
        f"ffn={mc.ffn_dim} heads={mc.n_heads}; vocab {src_v}/{tgt_v} ({where})",
        file=out,
    )
    print(
        f"world size {world} = tp {p.tp} x pp {p.pp} x dp {dp}; vpp {p.vpp}; schedule {kind}; "
        f"recompute {p.recompute}; {o.precision}{'; ZeRO-1' if p.zero else ''}"
        f"{'; sequence parallel' if p.sequence_parallel else ''}",
        file=out,
    )
    print(f"parameters: {total:,} ({total / 1e6:.1f}M, single-process model, tied tables once)", file=out)
    print(f"stage layout: {layout}", file=out)
    if backend == "deepspeed":
        part = ((ds_config or {}).get("pipeline") or {}).get("partition", "megabranch")
        if part in ("megabranch", "best", ""):
            print(f"deepspeed layer parts: {ds_parts(cfg, p.pp, src_v, tgt_v)} (LayerSpec indices per stage)", file=out)
        else:
            print(f"deepspeed partition_method: {part} (DeepSpeed splits at start-up)", file=out)
    print(
        f"memory plan ({planned_cfg.data.max_tokens} tokens per micro-batch, {m} micro-batches per step, "
        f"tensor-parallel rank 0 of each stage):",
        file=out,
    )
    print_table(rows, out)
    info = {
        "world_size": world,
        "dp": dp,
        "layout": str(layout),
        "parameters": total,
        "stage_parameters": [r.params for r in rows],
        "peak_bytes": [r.peak for r in rows],
        "sent_bytes": [r.sent for r in rows],
        "effective_tokens": tokens,
        "schedule": kind,
        "vpp": p.vpp,
        "micro_batches": m,
        "max_tokens": planned_cfg.data.max_tokens,
        "bubble": None,
    }
    if schedule_plan is not None:
        print_schedule_table(schedule_plan, out)
        mine = schedule_plan.chosen
        if mine is not None:
            info["bubble"] = mine.bubble
            how = "chosen by parallel.schedule=auto" if asked == "auto" else "the configured schedule"
            print(f"simulated bubble: {mine.bubble * 100:.1f}% ({how}: {mine.describe()})", file=out)
    print(
        f"effective batch: max_tokens {planned_cfg.data.max_tokens} x update_freq {o.update_freq} x dp {dp} = "
        f"{tokens:,} tokens per step",
        file=out,
    )
    return info


def print_schedule_table(schedule_plan, out) -> None:
    """The schedules x micro-batch counts of the pipeline: simulated bubble, peak GiB per stage, fits or not;
    `=>` marks the one this config runs."""
    budget = schedule_plan.budget
    mine = schedule_plan.chosen
    print(
        f"pipeline schedules (same tokens per update; bubble: ideal-machine simulation of the action lists with "
        f"the cost model's F/B/W times; peak: planned GiB per stage; fits: <= {budget / GiB:.1f} GiB of "
        f"--gpu-memory-gb {schedule_plan.gpu_memory_gb:g}):",
        file=out,
    )
    head = ["run", "schedule", "vpp", "micro-batches", "tokens each", "bubble", "fits", "peak GiB per stage"]
    body = []
    for opt in schedule_plan.options:
        peaks = " ".join(f"{x / GiB:.1f}" for x in opt.peaks)
        body.append(
            [
                "=>" if opt is mine else "",
                opt.schedule,
                str(opt.vpp),
                str(opt.m),
                str(opt.max_tokens),
                f"{opt.bubble * 100:.1f}%",
                "yes" if opt.peak <= budget else "no",
                peaks,
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for cells in [head, ["-" * w for w in widths]] + body:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |", file=out)
