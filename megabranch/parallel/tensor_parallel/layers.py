"""Tensor-parallel layers (each holds 1/tp of a full layer; `tp_size`/`tp_rank` default to the group's):

    ColumnParallelLinear   weight rows split: y_local = x @ W_r^T + b_r (outputs split; e.g. heads, fc1)
    RowParallelLinear      weight columns split: y = all_reduce(x_r @ W_r^T) + b (inputs split; out_proj, fc2)
    VocabParallelEmbedding table rows split; out-of-shard ids masked to 0, then all-reduce
    VocabParallelOutput    logits for my vocabulary shard; optionally tied to a VocabParallelEmbedding's weight

Sharded parameters carry `tp_split_dim`, `tp_size`, `tp_rank` and `tp_full_shape`, so a checkpoint converter or
initialiser can map a shard to its slice of the full tensor (see parallelize.shard_of). Parameters every
tensor-parallel rank holds in full (RowParallelLinear's bias, and LayerNorms, marked by apply_tensor_parallel)
carry `tp_replicated = True`; their gradients are identical on every tensor-parallel rank, so they are not
all-reduced, and the global grad norm counts them once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .mappings import (
    all_gather_along,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_along,
    reduce_scatter_to_sequence,
    scatter_to_tp,
)


def _resolve(group, tp_size, tp_rank) -> tuple[int, int]:
    if tp_size is None:
        tp_size = 1 if group is None else dist.get_world_size(group)
    if tp_rank is None:
        tp_rank = 0 if group is None else dist.get_rank(group)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside a tensor-parallel group of {tp_size}")
    return tp_size, tp_rank


def _divide(n: int, k: int, what: str) -> int:
    if n % k:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {k}")
    return n // k


def mark_shard(p: nn.Parameter, dim: int, tp_size: int, tp_rank: int, full_shape: tuple) -> nn.Parameter:
    """Record on `p` that it is slice tp_rank of tp_size along `dim` of a parameter shaped `full_shape`."""
    p.tp_split_dim, p.tp_size, p.tp_rank, p.tp_full_shape = dim, tp_size, tp_rank, tuple(full_shape)
    return p


def autocast_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(x, weight, bias) cast as autocast casts a linear's operands (unchanged when autocast is off), for an
    autograd Function that computes F.linear with autocast disabled inside."""
    dev = x.device.type
    if not (torch.is_autocast_enabled(dev) and x.is_floating_point()):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(dev)
    return x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


def weight_grads(x: torch.Tensor, g: torch.Tensor, need_w: bool, need_b: bool):
    """A linear's weight and bias gradients from its input and output gradient: (g^T x, sum g)."""
    g2 = g.reshape(-1, g.shape[-1])
    gw = g2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
    return gw, g2.sum(0) if need_b else None


class _SequenceGatheredLinear(torch.autograd.Function):
    """F.linear(all-gather of x along the sequence, weight, bias) that saves x, this rank's sequence slice, not the
    gathered input: the backward gathers it again for the weight gradient (Korthikanti et al. 2022, Sec. 4.2.2;
    Megatron's ColumnParallelLinear under --sequence-parallel), and reduce-scatters the input gradient.

    `store`: a zero-bubble schedule's weight-gradient store (parallel/weight_grad.py): while it collects, the
    weight and bias gradients are left to its W, which gathers the slice again then (so from B to W a linear
    keeps 1/tp of its input, as from F to B)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, dim, store):
        full, w, b = autocast_operands(all_gather_along(x, group, dim), weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(full, w, b)
        ctx.save_for_backward(x)
        # the parameters themselves (as DeferredLinear keeps them): W accumulates into them by identity
        ctx.weight, ctx.bias, ctx.group, ctx.dim, ctx.store = weight, bias, group, dim, store
        return y

    @staticmethod
    def backward(ctx, g):
        (x,), weight = ctx.saved_tensors, ctx.weight
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = None
        if need_x:
            gx = reduce_scatter_along(g.matmul(weight.to(g.dtype)).to(x.dtype), ctx.group, ctx.dim)
        if not (need_w or need_b):
            return gx, None, None, None, None, None
        bias, group, dim = ctx.bias, ctx.group, ctx.dim

        @torch.no_grad()
        def grads():
            return weight_grads(all_gather_along(x, group, dim).to(g.dtype), g, need_w, need_b)

        store = ctx.store
        if store is None or store.collecting is None:
            gw, gb = grads()
            return gx, gw, gb, None, None, None
        # W keeps the slice and gathers it when it runs (every tp rank runs the same W's in the same order)
        params = [q for q, need in ((weight, need_w), (bias, need_b)) if need]
        store.defer(params, lambda: [(q, gr) for q, gr in zip((weight, bias), grads()) if gr is not None])
        return gx, None, None, None, None, None


def sequence_gathered_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group, dim: int = 1, store=None
) -> torch.Tensor:
    """A column-parallel linear whose input is split along the sequence (dimension `dim`): all-gather, linear;
    backward: reduce-scatter the input gradient, the weight gradient from the input gathered again."""
    return _SequenceGatheredLinear.apply(x, weight, bias, group, dim % x.dim(), store)


class ColumnParallelLinear(nn.Module):
    """Linear layer whose output features are split over the tensor-parallel group (weight rows, bias split).

    in_features/out_features are the local shapes (weight.shape == (out_features, in_features)), as for the
    nn.Linear it replaces; full_out_features is the unsplit width. The input is replicated: its gradient is
    all-reduced (copy_to_tp). gather_output=True all-gathers the output (rarely wanted: it defeats the split).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group=None,
        tp_size=None,
        tp_rank=None,
        gather_output: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.group = group
        self.tp_size, self.tp_rank = _resolve(group, tp_size, tp_rank)
        self.in_features, self.full_out_features = in_features, out_features
        self.out_features = _divide(out_features, self.tp_size, "out_features")
        self.gather_output = gather_output
        self.sequence_parallel = False  # input split along the sequence (parallel/sequence_parallel.py)
        self.weight_grad_store = None  # a zero-bubble schedule's (parallel/weight_grad.py)
        kw = dict(device=device, dtype=dtype)
        self.weight = mark_shard(
            nn.Parameter(torch.empty(self.out_features, in_features, **kw)),
            0,
            self.tp_size,
            self.tp_rank,
            (out_features, in_features),
        )
        self.bias = None
        if bias:
            self.bias = mark_shard(
                nn.Parameter(torch.empty(self.out_features, **kw)), 0, self.tp_size, self.tp_rank, (out_features,)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            y = sequence_gathered_linear(x, self.weight, self.bias, self.group, store=self.weight_grad_store)
        else:
            y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (of {self.full_out_features}), "
            f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}"
        )


class RowParallelLinear(nn.Module):
    """Linear layer whose input features are split (weight columns); partial products are all-reduced, then the
    full, replicated bias is added once (so it is not counted tp times).

    input_is_parallel=False splits a replicated input first (scatter_to_tp).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group=None,
        tp_size=None,
        tp_rank=None,
        input_is_parallel: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.group = group
        self.tp_size, self.tp_rank = _resolve(group, tp_size, tp_rank)
        self.full_in_features, self.out_features = in_features, out_features
        self.in_features = _divide(in_features, self.tp_size, "in_features")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = False  # output reduce-scattered along the sequence (parallel/sequence_parallel.py)
        kw = dict(device=device, dtype=dtype)
        self.weight = mark_shard(
            nn.Parameter(torch.empty(out_features, self.in_features, **kw)),
            1,
            self.tp_size,
            self.tp_rank,
            (out_features, in_features),
        )
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
            self.bias.tp_replicated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (of {self.full_in_features}), out_features={self.out_features}, "
            f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding table with its rows (the vocabulary) split in contiguous blocks over the tensor-parallel group.

    Rank r holds ids [vocab_start, vocab_end); ids outside produce zeros there, and the all-reduce assembles the
    full lookup. num_embeddings is the FULL vocabulary (as nn.Embedding's, which Embedder reads); padding_idx
    keeps its nn.Embedding meaning (that row gets no gradient from the lookup) on the rank that owns it.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        group=None,
        tp_size=None,
        tp_rank=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.group = group
        self.tp_size, self.tp_rank = _resolve(group, tp_size, tp_rank)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        per = _divide(num_embeddings, self.tp_size, "num_embeddings")
        self.vocab_start, self.vocab_end = self.tp_rank * per, (self.tp_rank + 1) * per
        self.local_padding_idx = None
        if padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_end:
            self.local_padding_idx = padding_idx - self.vocab_start
        self.weight = mark_shard(
            nn.Parameter(torch.empty(per, embedding_dim, device=device, dtype=dtype)),
            0,
            self.tp_size,
            self.tp_rank,
            (num_embeddings, embedding_dim),
        )
        self.sequence_parallel = False  # reduce-scatter the lookup along the sequence (parallel/sequence_parallel)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight, self.local_padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self.local_padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.group)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}), "
            f"padding_idx={self.padding_idx}, tp={self.tp_rank}/{self.tp_size}"
        )


class VocabParallelOutput(nn.Module):
    """hidden (replicated) -> logits of my vocabulary shard (..., V / tp).

    Tied: uses `tied_to.weight` (a VocabParallelEmbedding of the same vocabulary split), held in a list so the
    table stays registered only where it belongs, like model.transformer.OutputProjection. Feed the shard to
    vocab_parallel_label_smoothed_nll_loss; set gather_output=True (e.g. for decoding) to get full logits.
    """

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        *,
        group=None,
        tp_size=None,
        tp_rank=None,
        tied_to: VocabParallelEmbedding | None = None,
        gather_output: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.group = group
        self.tp_size, self.tp_rank = _resolve(group, tp_size, tp_rank)
        self.d_model, self.vocab_size = d_model, vocab_size
        per = _divide(vocab_size, self.tp_size, "vocab_size")
        self.gather_output = gather_output
        self.sequence_parallel = False  # input split along the sequence (parallel/sequence_parallel.py)
        self.weight_grad_store = None  # a zero-bubble schedule's (parallel/weight_grad.py)
        self._tied_table = []
        self.weight = None
        if tied_to is not None:
            if tuple(tied_to.weight.shape) != (per, d_model) or tied_to.tp_rank != self.tp_rank:
                raise ValueError(
                    f"cannot tie a ({per}, {d_model}) output shard of rank {self.tp_rank} to "
                    f"{tuple(tied_to.weight.shape)} of rank {tied_to.tp_rank}"
                )
            self._tied_table = [tied_to]
        else:
            self.weight = mark_shard(
                nn.Parameter(torch.empty(per, d_model, device=device, dtype=dtype)),
                0,
                self.tp_size,
                self.tp_rank,
                (vocab_size, d_model),
            )

    @property
    def tied_to(self) -> VocabParallelEmbedding | None:
        return self._tied_table[0] if self._tied_table else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.tied_to is None else self.tied_to.weight
        if self.sequence_parallel:
            logits = sequence_gathered_linear(x, w, None, self.group, store=self.weight_grad_store)
        else:
            logits = F.linear(copy_to_tp(x, self.group), w)
        return gather_from_tp(logits, self.group) if self.gather_output else logits

    def extra_repr(self) -> str:
        return f"{self.d_model} -> {self.vocab_size} / {self.tp_size}, tied={self.tied_to is not None}"
