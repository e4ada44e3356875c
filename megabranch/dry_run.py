"""`megabranch-train --dry-run`: the stage layout, parameters per stage, the memory plan and the effective batch of
a config, without training or a process group (what the launch scripts print before they start a job)."""

from __future__ import annotations

import copy
import json
import os
import sys

from .backends.deepspeed.partition import ds_parts
from .errors import UserError
from .model import count_parameters, meta_model
from .parallel.memory import plan, print_table
from .parallel.partition import plan_layout
from .parallel.schedules import check_schedule


def data_vocab(data_dir: str, default: int = 32000) -> tuple[int, int, str]:
    """(source vocab, target vocab, where it came from): data_dir/meta.json when it exists, else `default`."""
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
        raise UserError(f"world size {world_size} does not fit parallel.tp * parallel.pp = {p.tp} * {p.pp} = {mp}: "
                        f"it must be a positive multiple of {mp} (nodes x GPUs per node = tp * pp * dp)")
    return world_size, world_size // mp


def dry_run(cfg, world_size: int | None = None, backend: str = "native", ds_config: dict | None = None,
            vocab: int | None = None, out=None) -> dict:
    """Print the stage layout, parameters per stage, the memory plan and the effective batch for `cfg`, without
    training or a process group. Raises UserError for what the trainer would refuse. Returns the numbers."""
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
