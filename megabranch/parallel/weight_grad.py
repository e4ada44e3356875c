"""The backward split of the zero-bubble schedules (zb-h1, zb-v): B computes what the previous chunk waits for (the
input gradient), W the weight gradients, later, in the pipeline's bubbles.

    store = WeightGradStore()
    defer_weight_grads(chunk, store)          # once: the chunk's linear layers run as DeferredLinear
    out = chunk(...)                          # F
    with store.collect(key):                  # B: one ordinary backward; every linear hands its weight-gradient
        torch.autograd.backward(out, grad)    #    work (input, output gradient) to the store instead of doing it
    store.run(key)                            # W: dW = g^T x, db = sum(g), accumulated into .grad

What is split, and why here: every matrix product with a trained weight in the model (nn.Linear, the
tensor-parallel linears, the output projection) is an F.linear call; `defer_weight_grads` routes those calls of
the chunk's linear modules through `DeferredLinear`, an autograd Function whose backward returns the input
gradient at once and, while a store collects, leaves the weight (and bias) gradient to the store, keeping
references to the two tensors that product needs. So B is one autograd pass with the weight-gradient GEMMs
taken out (about a third of the backward's FLOPs), and W is exactly those GEMMs: nothing is computed twice.
Everything else (LayerNorm and embedding gradients, attention, the tensor-parallel all-reduces, the encoder
output's gradient through every cross-attention) stays in B, so W needs no communication, except under sequence
parallelism: a column-parallel linear keeps its input's sequence slice until W and W gathers it again over the
tp group (parallel/sequence_parallel.py; every tp rank runs the same W's in the same order). Under recomputation
(parallel.recompute) the segment is recomputed once, in B; the recomputed linear inputs then live until W.

W adds its sums through autograd's own AccumulateGrad (torch.autograd.backward on the parameters), so a .grad that
is a data-parallel bucket view is added to in place and post-accumulate-grad hooks fire as in any backward.

torch.distributed.pipelining splits at the autograd-graph level instead (stage_backward_input /
stage_backward_weight: capture the gradients at the nodes where the weight paths leave the input path, re-enter
the graph from there once per parameter group). That needs no model hook, but every re-entry walks the graph
below it, so its W grows with the square of a chunk's depth (tools/bench/backward_split.py: 3.2 s for a
99-layer chunk whose plain backward takes 0.06 s), and with recomputation every segment is recomputed a second
time in W. docs/design.md ("Zero-bubble schedules") has the rest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..model.transformer import OutputProjection
from .tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelOutput
from .tensor_parallel.layers import autocast_operands, weight_grads

# the modules whose forward applies a trained weight with F.linear
LINEAR_MODULES = (nn.Linear, ColumnParallelLinear, RowParallelLinear, OutputProjection, VocabParallelOutput)


class WeightGradStore:
    """Weight-gradient work left by the B of each (chunk, micro-batch) key, until its W runs."""

    def __init__(self):
        self.collecting = None  # the key of the B running now (None: linears compute their weight gradients)
        self._pending: dict = {}  # key -> [(input, output gradient, weight or None, bias or None)]

    @contextlib.contextmanager
    def collect(self, key):
        """Run a backward (B) whose weight-gradient work is kept for `key`'s W."""
        if key in self._pending:
            raise RuntimeError(f"a second B for {key} before its W")
        self._pending[key] = []
        self.collecting = key
        try:
            yield
        finally:
            self.collecting = None

    def put(self, x: torch.Tensor, g: torch.Tensor, weight, bias) -> None:
        self._pending[self.collecting].append((x, g, weight, bias))

    def defer(self, params, work) -> None:
        """Other weight-gradient work for the running B's W (an op with a split of its own: a sequence-parallel
        column linear, tensor_parallel.layers.sequence_gathered_linear, or tools/bench/pipeline.py's stand-in
        chunks): `work()` -> [(parameter, gradient)], parameters among `params`."""
        self._pending[self.collecting].append(_Work(tuple(params), work))

    def param_ids(self, key) -> set[int]:
        """ids of the parameters `key`'s W will add gradients to."""
        ids = set()
        for entry in self._pending.get(key, ()):
            ids |= {id(p) for p in (entry.params if isinstance(entry, _Work) else entry[2:]) if p is not None}
        return ids

    def pending(self) -> list:
        return sorted(self._pending)

    def run(self, key) -> None:
        """W: compute and accumulate the weight gradients `key`'s B left."""
        if key not in self._pending:
            raise RuntimeError(f"W of {key} before its B (or twice)")
        sums: dict = {}  # id -> (parameter, gradient), each parameter's contributions summed first
        for entry in self._pending.pop(key):
            if isinstance(entry, _Work):
                for p, grad in entry.work():
                    _add(sums, p, grad)
                continue
            x, g, weight, bias = entry
            gw, gb = weight_grads(x, g, weight is not None, bias is not None)
            if weight is not None:
                _add(sums, weight, gw)
            if bias is not None:
                _add(sums, bias, gb)
        if sums:
            params = [p for p, _ in sums.values()]
            torch.autograd.backward(params, [s.to(p.dtype) for p, s in sums.values()])


@dataclass
class _Work:
    params: tuple
    work: object


def _add(sums: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
    if id(p) in sums:
        sums[id(p)] = (p, sums[id(p)][1] + grad)
    else:
        sums[id(p)] = (p, grad)


class DeferredLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) whose backward leaves the weight and bias gradients to `store` while it collects
    (otherwise a plain linear). Under autocast it computes in the autocast dtype, as F.linear would."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        x, w, b = autocast_operands(x, weight, bias)  # autocast's own casts for linear
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, w, b)
        ctx.save_for_backward(x)
        # the parameters themselves, not saved copies: W accumulates into them and the reducer knows them by id (a
        # tensor saved inside a recomputed segment comes back as another object)
        ctx.weight, ctx.bias, ctx.store = weight, bias, store
        return y

    @staticmethod
    def backward(ctx, g):
        (x,), weight = ctx.saved_tensors, ctx.weight
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight if weight.dtype == g.dtype else weight.to(g.dtype)
        gx = g.matmul(w) if need_x else None
        store = ctx.store
        if store is not None and store.collecting is not None:
            store.put(x, g, weight if need_w else None, ctx.bias if need_b else None)
            return gx, None, None, None
        gw, gb = weight_grads(x, g, need_w, need_b)
        return gx, gw, gb, None


class _RouteLinear(TorchFunctionMode):
    """Inside one linear module's forward: F.linear with a trained weight -> DeferredLinear."""

    def __init__(self, store: WeightGradStore):
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if weight.requires_grad or (bias is not None and bias.requires_grad):
                return DeferredLinear.apply(x, weight, bias, self.store)
        return func(*args, **kwargs)


def defer_weight_grads(module: nn.Module, store: WeightGradStore) -> int:
    """Route the F.linear of every linear module in `module` (LINEAR_MODULES) through DeferredLinear with `store`;
    -> how many modules. The interception is entered around each such module's own forward only (also when a
    recomputed segment runs it again inside B), so no other op pays for it."""
    count = 0
    for m in module.modules():
        if isinstance(m, LINEAR_MODULES) and not getattr(m, "_megabranch_deferred", False):
            m.forward = _routed(m.forward, store)
            m._megabranch_deferred = True
            if hasattr(m, "weight_grad_store"):  # its sequence-parallel form defers through its own Function
                m.weight_grad_store = store
            count += 1
    return count


def _routed(forward, store: WeightGradStore):
    def routed(*args, **kwargs):
        with _RouteLinear(store):
            return forward(*args, **kwargs)

    return routed
