"""Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models";
Megatron's --sequence-parallel), applied from outside to a tensor-parallel model, as tensor parallelism is.

With tensor parallelism alone every tp rank holds the whole (B, L, d) activation wherever the model is not split:
the residual LayerNorm, the dropout and the residual add of every sub-layer (for the Post-LN family the fused
residual LayerNorm's input and statistics too), the embeddings' output and the final norms. Sequence parallelism
splits those regions along the sequence instead (L / tp positions per rank), and changes what enters and leaves
the tensor-parallel ones:

    split region (B, L/tp, d)  --all-gather-->  column-parallel linear (q, k, v, fc1, the output projection)
    row-parallel linear (out_proj, fc2)  --reduce-scatter-->  split region

(forward; each is the other in the backward), instead of the identity / all-reduce pair of plain tensor
parallelism: the same bytes on the wire, 1/tp of the activations. The column-parallel linears keep their input's
sequence slice for the backward and gather it again there (tensor_parallel.layers.sequence_gathered_linear).
What changes here, module by module (the model's code knows nothing of it):

    ColumnParallelLinear, VocabParallelOutput   .sequence_parallel: the input is gathered along the sequence
    RowParallelLinear                          .sequence_parallel: the output is reduce-scattered to it
    VocabParallelEmbedding                     .sequence_parallel: the lookup is reduce-scattered to it
    Embedder                                   places this rank's slice of the lookup at its positions (scale,
                                               positions, dropout on L / tp positions; Embedder.place)
    Residual, Embedder                         their dropout draws from the tensor-parallel RNG stream (each
                                               rank its own positions), as the split attention / FFN regions do

Every replicated parameter used on split activations (the LayerNorms of the sub-layers, the final norms,
row-parallel biases, NormFormer's norm after out_proj, learned positions, Admin's omegas, ReZero's / Fixup's scalars,
DLCL's
combination weights) then gets only this rank's positions' share of its gradient: it carries
`sequence_parallel = True`, and `reduce_sequence_parallel_grads` sums those over the tp group after the backward.
Parameters inside the tensor-parallel regions (Sub-LN's and NormFormer's norms over split features, R-Fixup's FFN
scalars) see the whole sequence there and keep complete gradients.

What crosses a pipeline stage, the encoder output every decoder stage reads included, is in its split form: 1/tp
of the bytes (the executor's MicroBatch.seq_split). Sequence lengths are padded to a multiple of tp with padding
tokens, which the key masks, causal attention and the loss ignore (MicroBatch.from_batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.attention import MultiheadAttention
from ..model.embeddings import Embedder
from ..model.ffn import FeedForward
from ..model.layers import Residual
from .tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelOutput,
    install_rng_fork,
)

# the hidden states are (B, L, d): the sequence is dimension 1
SEQUENCE_DIM = 1

# modules whose parameters see the whole sequence (inside a tensor-parallel region, or computed before the split)
_WHOLE_SEQUENCE = (MultiheadAttention, FeedForward, VocabParallelEmbedding, VocabParallelOutput)


def _residual_draws(m: Residual) -> bool:
    return m.dropout_p > 0


def _embedding_draws(m: Embedder) -> bool:
    return m.dropout.p > 0


def _split_embedding(embedder: Embedder, tp_rank: int):
    """Embedder.forward on this rank's slice of the sequence: the table's lookup arrives reduce-scattered (L / tp
    positions, VocabParallelEmbedding.sequence_parallel), placed at this slice's positions."""

    def forward(tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        embedder.check_length(offset + tokens.shape[1])
        looked_up = embedder.table(tokens)
        return embedder.place(looked_up, offset + tp_rank * looked_up.shape[SEQUENCE_DIM])

    return forward


def apply_sequence_parallel(module: nn.Module, grid) -> nn.Module:
    """Turn the tensor-parallel `module` (a model, a pipeline chunk, or a list of them; after
    parallelize.apply_tensor_parallel) sequence-parallel over grid.tp in place; returns it. Works on the meta
    device. grid.tp == 1: nothing to split, unchanged."""
    if grid.tp == 1:
        return module
    whole, partial = set(), []
    for m in module.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelOutput, VocabParallelEmbedding)):
            m.sequence_parallel = True
        if isinstance(m, RowParallelLinear) and m.bias is not None:
            partial.append(m.bias)  # added after the reduce-scatter
        if isinstance(m, MultiheadAttention) and m.output_norm is not None:
            partial += list(m.output_norm.parameters())  # NormFormer's norm after out_proj
        if isinstance(m, _WHOLE_SEQUENCE):
            whole |= {id(p) for p in m.parameters()}
        if isinstance(m, Embedder) and not getattr(m, "_megabranch_sequence_split", False):
            m.forward = _split_embedding(m, grid.tp_rank)
            install_rng_fork(m, _embedding_draws)
            m._megabranch_sequence_split = True
        if isinstance(m, Residual):
            install_rng_fork(m, _residual_draws)
    partial += [p for p in module.parameters() if id(p) not in whole]
    for p in partial:
        p.sequence_parallel = True
    return module


def sequence_parallel_params(params) -> list:
    """The parameters (each once, in the given order) whose gradients are partial sums over the sequence slices."""
    return list({id(p): p for p in params if getattr(p, "sequence_parallel", False)}.values())


@torch.no_grad()
def reduce_sequence_parallel_grads(params, group) -> None:
    """Sum the gradients of the sequence-parallel parameters among `params` over the tensor-parallel group: one
    all-reduce of their flattened gradients per dtype (a parameter without a gradient adds zeros). group None:
    nothing to do."""
    if group is None:
        return
    by_dtype: dict = {}
    for p in sequence_parallel_params(params):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
