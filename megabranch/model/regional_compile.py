"""Regional compilation (`model.compile=true`): torch.compile each encoder and decoder layer, torchtitan's
per-block pattern, instead of the whole model.

A stack is hundreds of layers of two kinds, so compiling the layer (not the model) keeps compile time independent
of depth: Dynamo traces a kind's forward once and every layer of that kind reuses the graph, because the layers'
parameters are graph inputs (inlined nn.Modules), not constants baked into the graph. The residual coefficients
(r, s; BranchNorm's alpha_t) reach each layer as 0-dim tensors (megabranch.residual), so a changing alpha is a new
input value, never a recompilation. The batch and sequence dimensions are symbolic from the first step
(`model.compile_dynamic`, on by default), so token batches of any shape reuse a kind's one graph; with it off, a
batch of a new shape compiles a kind once more with the changed dimensions made symbolic (Dynamo's automatic
dynamic shapes), after which any shape reuses that.
`fullgraph=True`: a graph break is an error, not a silent eager fallback.
Embeddings, the output projection, the loss and the optimizer stay eager. The compiled module is the same
nn.Module (nn.Module.compile), so parameter names, state dicts and checkpoints do not change.

Incremental decoding (a key/value cache that grows every step) runs the layers eagerly: see `eager()`.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ..errors import UserError
from ..ops import backend as fused_backend
from .layers import DecoderLayer, EncoderLayer

LAYER_KINDS = (EncoderLayer, DecoderLayer)


def check_backend(name: str) -> None:
    """A one-line UserError naming model.compile_backend when torch has no such backend."""
    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise UserError(f"model.compile_backend={name!r} is invalid: must be one of {', '.join(sorted(known))}")


def compile_layers(modules, backend: str = "inductor", device=None, fused: bool = False, dynamic: bool = True) -> int:
    """torch.compile (in place) every EncoderLayer / DecoderLayer of `modules` (a module or a list of them, e.g. a
    pipeline rank's chunks) -> how many layers were wrapped. fused: the layers call the fused residual LayerNorm,
    whose extension is loaded here, before tracing (loading or building it cannot be traced). dynamic: symbolic
    shapes from the first graph (False: torch's automatic dynamic shapes, static until a second shape)."""
    check_backend(backend)
    if dynamic:
        # no "duck sizing": a first batch whose size equals its length would otherwise guard on that equality and
        # compile the kind again at the first batch where they differ (the message torch logs suggests this switch)
        torch.fx.experimental._config.use_duck_shape = False
    if fused:
        fused_backend(device)
    count = 0
    for module in modules if isinstance(modules, (list, tuple, nn.ModuleList)) else [modules]:
        for m in module.modules():
            if isinstance(m, LAYER_KINDS):
                m.compile(backend=backend, fullgraph=True, dynamic=True if dynamic else None)
                count += 1
    return count


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (each layer kind's forward, per mode)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def eager():
    """A context in which compiled layers run eagerly (decoding: its shapes change every step)."""
    return torch.compiler.set_stance("force_eager")


class FirstStepTimer:
    """Times an engine's first step, where compilation happens, and counts what it compiled: wrap the step in
    `with timer.first_step():`, then `timer.take()` -> {"compile_s": seconds, "graphs": graphs compiled} after
    that first step, {} after any other (and always when compilation is off)."""

    def __init__(self, enabled: bool):
        self.enabled, self.report = enabled, None

    @contextlib.contextmanager
    def first_step(self):
        if not self.enabled:
            yield
            return
        graphs, t0 = compiled_graphs(), time.perf_counter()
        yield
        self.enabled = False
        self.report = {"compile_s": round(time.perf_counter() - t0, 3), "graphs": compiled_graphs() - graphs}

    def take(self) -> dict:
        out, self.report = self.report or {}, None
        return out
