"""Apply tensor parallelism from outside to a built model, or to any part of one (a pipeline stage).

    model = build_model(cfg, vocab, seed=seed)          # the same seed on every rank
    model = apply_tensor_parallel(model, grid)           # now holds this tp rank's shards

Replacements (the module tree and every parameter NAME stay the same, so checkpoints keep their keys):

    MultiheadAttention.q_proj/k_proj/v_proj  -> ColumnParallelLinear   (my n_heads/tp heads)
    MultiheadAttention.out_proj              -> RowParallelLinear
    FeedForward.fc1 / fc2                    -> ColumnParallelLinear / RowParallelLinear
    Embedder.table (nn.Embedding)            -> VocabParallelEmbedding (one object stays one object: a table
                                                shared by encoder and decoder is converted once)
    OutputProjection                         -> VocabParallelOutput, tied to the parallel version of the table
                                                it was tied to, untied with its own weight shard otherwise
    MultiheadAttention.head_scale            -> my heads' slice (NormFormer)
    MultiheadAttention / FeedForward.shards  -> TensorParallelShards: a LayerNorm over the split heads or hidden
                                                units (Sub-LN, NormFormer) gathers, normalises and scatters; a
                                                scalar used on split units (R-Fixup) sums its gradient over them

Each new parameter is the slice of the existing full one (so the single-process model, sharded) and keeps the
old parameter's attributes (e.g. pp_duplicate) and requires_grad. On a meta-device model nothing is allocated:
the slices are meta tensors. Every parameter that is not split (LayerNorms, row-parallel biases) gets
`tp_replicated = True`. The decoder then returns vocabulary-sharded logits: use
tensor_parallel.vocab_parallel_label_smoothed_nll_loss, or set `output.gather_output = True` for full logits.

A tied OutputProjection whose table lies outside `module` (e.g. the last pipeline stage of a model whose
embedding lives on the first) is tied to a parallel copy of that table, converted once and remembered on the
old table, so converting another part later reuses the same object; like the original tie, that table is not
registered in `module`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError
from ..model.attention import MultiheadAttention
from ..model.embeddings import Embedder
from ..model.ffn import FeedForward
from ..model.transformer import OutputProjection
from .tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelOutput,
    install_rng_fork,
    mark_shard,
)
from .tensor_parallel.mappings import copy_to_tp, gather_from_tp, scatter_to_tp

_REPLACEMENT = "_megabranch_tp_replacement"


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def _next_multiple(n: int, k: int) -> int:
    return -(-n // k) * k


def _tables_and_outputs(module: nn.Module):
    tables, outputs = {}, []
    for m in module.modules():
        if isinstance(m, Embedder) and isinstance(m.table, nn.Embedding):
            tables[id(m.table)] = m.table
        elif isinstance(m, nn.Embedding):
            tables[id(m)] = m
        elif isinstance(m, OutputProjection):
            outputs.append(m)
            if isinstance(m.tied_to, nn.Embedding):
                tables[id(m.tied_to)] = m.tied_to
    return list(tables.values()), outputs


def validate_tensor_parallel(module: nn.Module, tp: int) -> None:
    """One-line UserError naming the size that parallel.tp does not divide (checked before anything changes)."""
    if tp < 1:
        raise UserError(f"parallel.tp={tp}: must be >= 1")
    d_models, heads, ffns, vocabs = set(), set(), set(), set()
    for m in module.modules():
        if isinstance(m, MultiheadAttention) and isinstance(m.q_proj, nn.Linear):
            d_models.add(m.q_proj.in_features)
            heads.add(m.q_proj.out_features // m.head_dim)
        elif isinstance(m, FeedForward) and isinstance(m.fc1, nn.Linear):
            d_models.add(m.fc1.in_features)
            ffns.add(m.fc1.out_features)
    tables, outputs = _tables_and_outputs(module)
    for t in tables:
        d_models.add(t.embedding_dim)
        vocabs.add(t.num_embeddings)
    for o in outputs:
        if o.weight is not None:
            d_models.add(o.weight.shape[1])
            vocabs.add(o.weight.shape[0])
    for d in sorted(d_models):
        if d % tp:
            raise UserError(f"model.d_model={d} is not divisible by parallel.tp={tp}")
    for h in sorted(heads):
        if h % tp:
            raise UserError(
                f"model.n_heads={h} is not divisible by parallel.tp={tp} (heads are split across tensor-parallel "
                f"ranks; tp must be one of {_divisors(h)})"
            )
    for f in sorted(ffns):
        if f % tp:
            raise UserError(
                f"model.ffn_dim={f} is not divisible by parallel.tp={tp}: use a multiple of {tp}, "
                f"e.g. {_next_multiple(f, tp)}"
            )
    for v in sorted(vocabs):
        if v % tp:
            raise UserError(
                f"vocabulary size {v} is not divisible by parallel.tp={tp}: preprocess with --vocab-size "
                f"{_next_multiple(v, tp)} (a multiple of {tp})"
            )


# --- slicing helpers (also for checkpoint conversion and shard-only initialisation) ----------------------


def full_shape(p: torch.Tensor) -> tuple:
    """The shape of the single-process parameter that `p` is a shard of (p's own shape if not split)."""
    return tuple(getattr(p, "tp_full_shape", p.shape))


def split_info(params: dict) -> dict:
    """name -> [split dim (-1: not split), *full shape] for parameters that may carry tp_split_dim: the split
    table a checkpoint shard records and the gathered model is assembled by."""
    return {
        n: [
            getattr(p, "tp_split_dim", None) if getattr(p, "tp_split_dim", None) is not None else -1,
            *[int(s) for s in full_shape(p)],
        ]
        for n, p in params.items()
    }


def shard_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `full` (a tensor shaped like full_shape(p)) matching the layout of parameter `p`.

    E.g. initialise a meta-built, sharded model from the layout-independent init:
        p.data = shard_of(initial_value(name, full_shape(p), cfg, seed), p)
    """
    dim = getattr(p, "tp_split_dim", None)
    if dim is None:
        return full
    n = full.shape[dim] // p.tp_size
    return full.narrow(dim, p.tp_rank * n, n)


def _copy_attrs(old: nn.Parameter, new: nn.Parameter) -> None:
    for k, v in vars(old).items():
        if not k.startswith("tp_"):
            setattr(new, k, v)
    new.requires_grad_(old.requires_grad)


@torch.no_grad()
def _fill(new: nn.Parameter, old: torch.Tensor) -> None:
    new.copy_(shard_of(old.detach(), new))
    _copy_attrs(old, new)


def _column(lin: nn.Linear, grid) -> ColumnParallelLinear:
    w = lin.weight
    new = ColumnParallelLinear(
        lin.in_features,
        lin.out_features,
        lin.bias is not None,
        group=grid.tp_group,
        tp_size=grid.tp,
        tp_rank=grid.tp_rank,
        device=w.device,
        dtype=w.dtype,
    )
    _fill(new.weight, w)
    if lin.bias is not None:
        _fill(new.bias, lin.bias)
    return new


def _row(lin: nn.Linear, grid) -> RowParallelLinear:
    w = lin.weight
    new = RowParallelLinear(
        lin.in_features,
        lin.out_features,
        lin.bias is not None,
        group=grid.tp_group,
        tp_size=grid.tp,
        tp_rank=grid.tp_rank,
        device=w.device,
        dtype=w.dtype,
    )
    _fill(new.weight, w)
    if lin.bias is not None:
        _fill(new.bias, lin.bias)  # full bias, added after the all-reduce
    return new


def _table(emb: nn.Embedding, grid) -> VocabParallelEmbedding:
    done = getattr(emb, _REPLACEMENT, None)
    if done is not None:
        return done
    if emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
        raise UserError("tensor parallelism needs plain embedding tables (no max_norm / sparse / scale_grad_by_freq)")
    w = emb.weight
    new = VocabParallelEmbedding(
        emb.num_embeddings,
        emb.embedding_dim,
        emb.padding_idx,
        group=grid.tp_group,
        tp_size=grid.tp,
        tp_rank=grid.tp_rank,
        device=w.device,
        dtype=w.dtype,
    )
    _fill(new.weight, w)
    # remembered on the old table, so every tie to it (also one converted in a later call) gets this object
    object.__setattr__(emb, _REPLACEMENT, new)
    return new


def _output(out: OutputProjection, grid) -> VocabParallelOutput:
    if out.tied_to is not None:
        old = out.tied_to
        table = old if isinstance(old, VocabParallelEmbedding) else _table(old, grid)
        return VocabParallelOutput(
            table.embedding_dim,
            table.num_embeddings,
            group=grid.tp_group,
            tp_size=grid.tp,
            tp_rank=grid.tp_rank,
            tied_to=table,
        )
    w = out.weight
    new = VocabParallelOutput(
        w.shape[1],
        w.shape[0],
        group=grid.tp_group,
        tp_size=grid.tp,
        tp_rank=grid.tp_rank,
        device=w.device,
        dtype=w.dtype,
    )
    _fill(new.weight, w)
    return new


def _head_slice(scale: nn.Parameter, grid) -> nn.Parameter:
    """NormFormer's per-head scales: this rank's heads (the same contiguous block as its q/k/v rows)."""
    new = nn.Parameter(torch.empty(scale.shape[0] // grid.tp, device=scale.device, dtype=scale.dtype))
    mark_shard(new, 0, grid.tp, grid.tp_rank, tuple(scale.shape))
    _fill(new, scale)
    return new


class TensorParallelShards:
    """model.shards.Unsharded over the tensor-parallel group: the features a block holds a slice of."""

    def __init__(self, group):
        self.group = group

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_from_tp(x, self.group)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        return scatter_to_tp(x, self.group)

    def replicated(self, p: torch.Tensor) -> torch.Tensor:
        return copy_to_tp(p, self.group)


def _attention_draws(m: MultiheadAttention) -> bool:
    return m.dropout > 0


def _ffn_draws(m: FeedForward) -> bool:
    return m.activation_dropout.p > 0


def apply_tensor_parallel(module: nn.Module, grid, fork_rng: bool = True) -> nn.Module:
    """Shard `module` (a model or any part of it) over grid.tp ranks in place; returns it (use the return value:
    a bare OutputProjection or nn.Embedding passed in is replaced, not modified).

    Works on the meta device (no allocation). grid.tp == 1 only marks parameters tp_replicated. fork_rng
    installs the tracker fork (see tensor_parallel) around attention and FFN forwards with dropout.
    """
    tp = grid.tp
    validate_tensor_parallel(module, tp)
    if tp > 1:
        if isinstance(module, OutputProjection):
            module = _output(module, grid)
        elif isinstance(module, nn.Embedding):
            module = _table(module, grid)
        for m in list(module.modules()):
            if isinstance(m, MultiheadAttention):
                for name in ("q_proj", "k_proj", "v_proj"):
                    if isinstance(getattr(m, name), nn.Linear):
                        setattr(m, name, _column(getattr(m, name), grid))
                if isinstance(m.out_proj, nn.Linear):
                    m.out_proj = _row(m.out_proj, grid)
                if m.head_scale is not None and getattr(m.head_scale, "tp_split_dim", None) is None:
                    m.head_scale = _head_slice(m.head_scale, grid)
                m.shards = TensorParallelShards(grid.tp_group)
                if fork_rng:
                    install_rng_fork(m, _attention_draws)
            elif isinstance(m, FeedForward):
                if isinstance(m.fc1, nn.Linear):
                    m.fc1 = _column(m.fc1, grid)
                if isinstance(m.fc2, nn.Linear):
                    m.fc2 = _row(m.fc2, grid)
                m.shards = TensorParallelShards(grid.tp_group)
                if fork_rng:
                    install_rng_fork(m, _ffn_draws)
            elif isinstance(m, Embedder) and isinstance(m.table, nn.Embedding):
                m.table = _table(m.table, grid)
            for name, child in list(m.named_children()):
                if isinstance(child, OutputProjection):
                    setattr(m, name, _output(child, grid))
    for p in module.parameters():
        if getattr(p, "tp_split_dim", None) is None:
            p.tp_replicated = True
    return module


def natural_split_dims(modules) -> dict:
    """id(parameter) -> the dim apply_tensor_parallel splits it along (at any tp, also tp == 1 where nothing is
    split yet), for every parameter it would split, of a module or a list of modules. Checkpoints store each
    tensor with that dim leading, so that the slice of any tensor-parallel rank is one contiguous byte range."""
    dims = {}
    for module in modules if isinstance(modules, (list, tuple, nn.ModuleList)) else [modules]:
        for m in module.modules():
            if isinstance(m, (MultiheadAttention, FeedForward)):
                column = ("q_proj", "k_proj", "v_proj") if isinstance(m, MultiheadAttention) else ("fc1",)
                row = "out_proj" if isinstance(m, MultiheadAttention) else "fc2"
                for lin in [getattr(m, c) for c in column]:  # column-parallel: output rows (and their biases)
                    dims.update({id(lin.weight): 0, **({id(lin.bias): 0} if lin.bias is not None else {})})
                dims[id(getattr(m, row).weight)] = 1  # row-parallel: input columns
                if getattr(m, "head_scale", None) is not None:  # split with the heads
                    dims[id(m.head_scale)] = 0
            elif isinstance(m, nn.Embedding) or isinstance(m, OutputProjection) and m.weight is not None:
                dims[id(m.weight)] = 0
        for p in module.parameters():  # what is already split says so itself
            if getattr(p, "tp_split_dim", None) is not None:
                dims[id(p)] = p.tp_split_dim
    return dims


def tp_layout(module: nn.Module) -> dict:
    """name -> (split dim or None, full shape) for every parameter of `module`; for converters and logs."""
    return {n: (getattr(p, "tp_split_dim", None), full_shape(p)) for n, p in module.named_parameters()}


def sharded_numel(module: nn.Module) -> int:
    """Parameters this rank holds (shards + replicated), each object once; works on meta models."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def full_numel(module: nn.Module) -> int:
    """Parameters of the single-process equivalent of `module` (each object once)."""
    return sum(math.prod(full_shape(p)) for p in {id(p): p for p in module.parameters()}.values())
