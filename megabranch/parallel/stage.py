"""A pipeline rank's stage: the model (megabranch.model.Transformer) restricted to the chunks of the layout this
rank runs, tensor-parallel sharded, holding exactly the single-process model's weights.

Each chunk is `Transformer(cfg, ..., span=chunk.span)`, built on the meta device, sharded there by
`apply_tensor_parallel`, and only then given storage (this rank's shards only) and filled from the
layout-independent init (model.init.initial_value by single-process name). The chunks of one rank share one copy
of an embedding table they both use. Parameter names are the single-process model's (model.canonical_name gives
the one alias, a table shared by both stacks).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..model import Transformer, canonical_parameters
from ..model.init import fill_initial_values
from .layout import Layout
from .parallelize import apply_tensor_parallel, full_shape, shard_of
from .sequence_parallel import apply_sequence_parallel
from .tensor_parallel import checkpoint as tp_checkpoint


def _materialize(module: nn.Module, device) -> None:
    """meta -> real storage on `device`, keeping every Parameter's attributes and shared objects shared."""
    memo: dict = {}
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                # the attributes megabranch set (tp_full_shape, pp_duplicate, ...), not the ones a tensor
                # subclass keeps for itself (a fake tensor's device)
                new.__dict__.update({k: v for k, v in p.__dict__.items() if k not in new.__dict__})
                memo[id(p)] = new
            m._parameters[name] = memo[id(p)]
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)


def _mark_duplicate_tables(chunks: nn.ModuleList, cfg: ModelConfig, layout: Layout, pp_rank: int) -> None:
    """A table held by several pipeline ranks is owned by its first holder (the source / target embedding's
    stage); the copies elsewhere carry `pp_duplicate = True`, so the global gradient norm counts it once."""
    owners = {}
    for name, what in (("encoder.embed.table.weight", "src_embed"), ("decoder.embed.table.weight", "tgt_embed")):
        holders = layout.ranks_holding(what)
        if holders:
            owners[name] = holders[0]
    if cfg.share_all_embeddings:
        owners["decoder.embed.table.weight"] = owners.get("encoder.embed.table.weight", 0)
    for ch in chunks:
        for stack in (ch.encoder, ch.decoder):
            if stack.embed is not None:
                name = f"{'encoder' if stack is ch.encoder else 'decoder'}.embed.table.weight"
                if owners.get(name, pp_rank) != pp_rank:
                    stack.embed.table.weight.pp_duplicate = True


def build_stage(
    cfg: ModelConfig,
    layout: Layout,
    grid,
    vocab: int,
    tgt_vocab: int | None = None,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
    recompute: int = 0,
    sequence_parallel: bool = False,
) -> nn.ModuleList:
    """This rank's chunks (Transformer slices, in virtual order) as a ModuleList, tensor-parallel sharded for
    grid.tp (sequence-parallel too with `sequence_parallel`). device="meta" stops before allocating (memory
    planning, converters)."""
    tgt_vocab = tgt_vocab or vocab
    tables: dict = {}
    with torch.device("meta"):
        chunks = nn.ModuleList(
            Transformer(cfg, vocab, tgt_vocab, span=c.span, init=False, tables=tables)
            for c in layout.chunks_of_rank(grid.pp_rank)
        )
    _mark_duplicate_tables(chunks, cfg, layout, grid.pp_rank)
    chunks = apply_tensor_parallel(chunks, grid)
    if sequence_parallel:
        apply_sequence_parallel(chunks, grid)
    for ch in chunks:
        for stack in (ch.encoder, ch.decoder):
            stack.recompute = recompute
            stack.checkpoint = tp_checkpoint  # replays the tensor-parallel dropout streams too
    if str(device) != "meta":
        _materialize(chunks, device)
        fill_initial_values(
            canonical_parameters(chunks, cfg), cfg, 0 if seed is None else seed, full_shape=full_shape, shard=shard_of
        )
        for ch in chunks:
            ch.reset_buffers()
    return chunks
