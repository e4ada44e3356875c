"""DeepSpeed's layer list: one entry per LayerSpec index, each a slice of the one model (megabranch.model).

    index 0            source embedding          (src, prev)          -> (x, src, prev)
    1 .. N             encoder layers 0..N-1     (x, src, prev)       -> (x, src, prev)   (E(N-1): memory)
    N+1                target embedding          (memory, src, prev)  -> (memory, y, src)
    N+2 .. N+M+1       decoder layers 0..M-1     (memory, y, src)     -> (memory, y, src)
                       the last decoder layer                        -> y   (drops memory)
    N+M+2              output projection         y                    -> logits;  loss_fn(logits, target)

Each entry is `PipeUnit`: `Transformer(cfg, ..., span=...)` (model/span.py) with a forward that speaks DeepSpeed's
tuple protocol and runs the model's own code; its state_dict keys are the single-process parameter names.

What travels follows DeepSpeed's rules for tuples (deepspeed/runtime/pipe/engine.py): every floating tensor a
stage sends is given requires_grad on the receiver, and a gradient is sent back for each; so a floating tensor
that the receiver does not use (its .grad stays None) would fail the gradient send. Hence masks are never sent
(the source tokens travel as int64 and each unit rebuilds its key mask), the decoder input tokens stay int64
until the target embedding consumes them, the encoder output rides with the decoder hidden through every decoder
unit (its gradient accumulated unit by unit), and the last decoder layer drops it, so the output unit receives y
alone. Shapes change from micro-batch to micro-batch (token batching): the module is built with
dynamic_shape=True.

With parallel.tp > 1 every unit is tensor-parallel (parallel.parallelize.apply_tensor_parallel over the megabranch
grid built on the same three-dimensional rank order as DeepSpeed's PipeModelDataParallelTopology): the same
column / row-parallel linears and vocabulary-parallel tables as the native engine, inside DeepSpeed's layers; the
output unit returns vocabulary-sharded logits (trainer.TokenLoss takes the vocabulary-parallel loss).

Tied tables (share_all_embeddings / share_decoder_input_output_embed) are one `TiedLayerSpec` key whose unit holds
every role of the table (its span is their union) and takes the role from what it receives: (src, prev) -> the
source embedding, a 3-tuple -> the target embedding, a tensor -> the output projection. No forward_fn is used, so
every layer index that uses the table saves and loads it in DeepSpeed checkpoints (a forward_fn partial has no
state_dict, and DeepSpeed would skip it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ...config import ModelConfig
from ...errors import UserError
from ...model import Span, Transformer
from ...model.span import Carried
from ...parallel.grid import Grid
from ...parallel.parallelize import apply_tensor_parallel

# schemes DeepSpeed's pipeline cannot run as this layer list, and why (one line each, refused before building)
UNSUPPORTED_SCHEMES = {
    "dlcl": "every DLCL layer reads all earlier layers' outputs, which DeepSpeed's fixed tuple of one hidden "
    "per layer does not carry (the native pipeline carries the history: --backend native)",
    "admin": "Admin's profiling pass runs stage by stage before the first step in the native pipeline only "
    "(--backend native)",
}


def check_scheme(cfg: ModelConfig) -> None:
    """A UserError naming the scheme when --backend deepspeed cannot run it."""
    if cfg.residual in UNSUPPORTED_SCHEMES:
        raise UserError(
            f"model.residual={cfg.residual} is not supported by --backend deepspeed: "
            f"{UNSUPPORTED_SCHEMES[cfg.residual]}"
        )


def check_layout(cfg, world: int) -> int:
    """-> dp for --backend deepspeed: a UserError naming what it does not run (vpp, sequence parallelism) or a
    world size that parallel.tp * parallel.pp does not divide."""
    p = cfg.parallel
    if p.vpp != 1:
        raise UserError(
            f"--backend deepspeed runs one pipeline chunk per stage (DeepSpeed's own 1F1B): set "
            f"parallel.vpp=1 (got {p.vpp})"
        )
    if p.sequence_parallel:
        raise UserError(
            "parallel.sequence_parallel is the native engine's (--backend native): DeepSpeed's pipeline "
            "sends each stage's output whole; set it false for --backend deepspeed"
        )
    if world % (p.tp * p.pp):
        raise UserError(
            f"--backend deepspeed: world size {world} is not a multiple of parallel.tp * parallel.pp = "
            f"{p.tp} * {p.pp} = {p.tp * p.pp} (tp x pp x dp processes)"
        )
    return world // (p.tp * p.pp)


@dataclass(frozen=True)
class Entry:
    """One DeepSpeed layer index: what it runs (`role`), the unit that runs it (`unit`: the role itself, or the
    union of a tied table's roles), and its TiedLayerSpec key (None: an ordinary LayerSpec)."""

    kind: str  # src_embed | encoder | tgt_embed | decoder | output
    role: Span
    unit: tuple  # the roles of the module at this index (one, or a tied table's several)
    tie: str | None = None


def _union(roles: tuple) -> Span:
    first = roles[0]
    return replace(
        first,
        src_embed=any(r.src_embed for r in roles),
        tgt_embed=any(r.tgt_embed for r in roles),
        output=any(r.output for r in roles),
    )


class PipeUnit(Transformer):
    """A slice of the model on DeepSpeed's tuple protocol (see the module docstring); with a `grid` of tp > 1 its
    tensor-parallel shard for grid.tp_rank."""

    def __init__(self, cfg: ModelConfig, vocab: int, tgt_vocab: int, roles: tuple, grid=None):
        super().__init__(cfg, vocab, tgt_vocab, span=_union(roles), init=False)
        if grid is not None and grid.tp > 1:
            apply_tensor_parallel(self, grid)
        self.roles = roles
        self.holds_layers = self.span.has_encoder or self.span.has_decoder
        self.drops_memory = self.span.ends_decoder  # the output unit only needs y

    def _role(self, inputs) -> Span:
        if len(self.roles) == 1:
            return self.roles[0]
        if torch.is_tensor(inputs):
            return next(r for r in self.roles if r.output)
        if len(inputs) == 2:
            return next(r for r in self.roles if r.src_embed)
        return next(r for r in self.roles if r.tgt_embed)

    def forward(self, inputs):
        role = self._role(inputs)
        src = prev = None
        if torch.is_tensor(inputs):  # the output projection after the last decoder layer
            carry = (None, inputs)
        elif not role.receives:
            src, prev = inputs
            carry = ()
        elif len(role.receives) == 1:  # the encoder hidden, or the finished encoder output
            h, src, prev = inputs
            carry = (h,)
        else:
            memory, y, src = inputs
            carry = (memory, y)
        out = super().forward(src, prev, *carry, span=role)
        if role.output:
            return out
        # DeepSpeed's bf16 / fp16 engines cast the parameters, not the fp32 position table: keep their dtype
        dtype = next(self.parameters()).dtype
        out = tuple(t.to(dtype) for t in out)
        if role.sends == (Carried.MEMORY, Carried.DECODER_HIDDEN):
            memory, y = out
            return y if self.drops_memory else (memory, y, src)
        (h,) = out
        return h, src, prev


def layer_plan(cfg: ModelConfig) -> list[Entry]:
    """The DeepSpeed layer list for a model config (pure Python: converters and --dry-run use it without
    DeepSpeed)."""
    n, m = cfg.encoder_layers, cfg.decoder_layers
    roles = [("src_embed", Span(n, m, src_embed=True))]
    roles += [("encoder", Span(n, m, enc_lo=i, enc_hi=i + 1)) for i in range(n)]
    roles += [("tgt_embed", Span(n, m, tgt_embed=True))]
    roles += [("decoder", Span(n, m, dec_lo=j, dec_hi=j + 1)) for j in range(m)]
    roles += [("output", Span(n, m, output=True))]
    keys = {
        "src_embed": "src_table",
        "tgt_embed": "tgt_table",
        "output": "tgt_table" if cfg.share_decoder_input_output_embed else None,
    }
    if cfg.share_all_embeddings:
        keys = {k: "src_table" if v else None for k, v in keys.items()}
    members: dict = {}
    for kind, role in roles:
        if keys.get(kind):
            members.setdefault(keys[kind], []).append(role)
    plan = []
    for kind, role in roles:
        key = keys.get(kind)
        tied = key is not None and len(members[key]) > 1  # a table used at one index only is an ordinary layer
        plan.append(Entry(kind, role, tuple(members[key]) if tied else (role,), key if tied else None))
    return plan


def unit_module(cfg: ModelConfig, entry: Entry, vocab: int, tgt_vocab: int, grid=None) -> PipeUnit:
    return PipeUnit(cfg, vocab, tgt_vocab, entry.unit, grid)


def unit_shards(cfg: ModelConfig, entry: Entry, vocab: int, tgt_vocab: int, tp: int = 1) -> list[dict]:
    """Per tensor-parallel rank, the unit at `entry` built on the meta device for that rank (nothing is
    allocated): state_dict key (a single-process parameter name) -> its tensor there (a parameter carries
    parallelize's split attributes, so parallelize.shard_of cuts a full tensor to it)."""
    out = []
    for rank in range(tp):
        with torch.device("meta"):
            unit = unit_module(cfg, entry, vocab, tgt_vocab, Grid(tp=tp, tp_rank=rank) if tp > 1 else None)
        out.append(dict(unit.state_dict(keep_vars=True)))
    return out
