"""The encoder-decoder Transformer, defined once for every engine.

`Transformer(cfg, vocab)` is the whole model. `Transformer(cfg, vocab, span=...)` is the same model restricted to
a contiguous run of its pieces (a pipeline stage, native or DeepSpeed; see span.py): it builds only the layers it
owns, keeps their single-process parameter names (`encoder.layers.7.ffn.block.fc1.weight`), and its forward runs
the model's own stack code over what the previous slice returned. Model code knows nothing of process groups:
tensor parallelism swaps modules from outside (megabranch.parallel.parallelize), recomputation is a stack
attribute the engine sets.
"""

from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from ..residual import ResidualCoefficients, set_step
from ..vocab import PAD
from .embeddings import Embedder
from .init import fill_initial_values
from .layers import DecoderLayer, EncoderLayer
from .norm import LayerNorm
from .span import Span

# the single-process name of a table shared by both stacks (model.share_all_embeddings) is the encoder's
SHARED_TABLE = "encoder.embed.table.weight"
DECODER_TABLE = "decoder.embed.table.weight"


class LayerStack(nn.ModuleDict):
    """A stack's layers keyed by their index in the whole stack ("7"), so a slice holding layers 6-9 keeps the
    single-process names. Indexes by int and iterates over layers, like an nn.ModuleList of the held layers."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__({str(i): m for i, m in layers.items()})

    def __getitem__(self, i) -> nn.Module:
        return super().__getitem__(str(i))

    def __iter__(self):
        return iter(self._modules.values())


class _Stack(nn.Module):
    """What the encoder and the decoder share: coefficients, held layers, optional final norm, recomputation."""

    def __init__(self, cfg: ModelConfig, stack: str, layer_cls, lo: int, hi: int, ends: bool, embed: nn.Module | None):
        super().__init__()
        self.embed = embed  # registered first: the parameter order (optimizer, ZeRO, buckets) is the checkpoints'
        self.coeffs = ResidualCoefficients.for_stack(cfg, stack)
        self.layers = LayerStack({i: layer_cls(cfg, cfg.fused_kernels) for i in range(lo, hi)})
        self.final_norm = LayerNorm(cfg.d_model, cfg.ln_eps) if ends and cfg.residual == "pre_ln" else None
        # activation recomputation: every `recompute` layers form one checkpointed segment (0: off). The engine
        # may swap `checkpoint` for one that also replays tensor-parallel dropout streams.
        self.recompute = 0
        self.checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def run_layers(self, h: torch.Tensor, call, *extra) -> torch.Tensor:
        """h through every held layer, `call(layer, h, *extra)` each; `extra` tensors are passed explicitly so a
        recomputed segment's graph sees them."""
        layers = list(self.layers)
        k = self.recompute
        if k <= 0 or not torch.is_grad_enabled():
            for layer in layers:
                h = call(layer, h, *extra)
            return h
        for start in range(0, len(layers), k):
            h = self.checkpoint(_segment, layers[start : start + k], call, h, *extra)
        return h


def _segment(layers, call, h, *extra):
    for layer in layers:
        h = call(layer, h, *extra)
    return h


class Encoder(_Stack):
    def __init__(self, cfg: ModelConfig, table: nn.Embedding | None, span: Span):
        embed = Embedder(table, cfg) if span.src_embed else None
        super().__init__(cfg, "encoder", EncoderLayer, span.enc_lo, span.enc_hi, span.ends_encoder, embed)

    def forward(self, src_tokens: torch.Tensor, x: torch.Tensor | None = None, key_mask: torch.Tensor | None = None):
        """-> (hidden (B, S, d), key mask (B, S) True on real tokens). x=None: embed src_tokens first, else
        continue from hidden x (a later slice of the encoder)."""
        key_mask = src_tokens.ne(PAD) if key_mask is None else key_mask
        if x is None:
            x = self.embed(src_tokens)
        co = self.coeffs
        x = self.run_layers(x, lambda layer, h: layer(h, co.r, co.s, key_mask=key_mask))
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, key_mask


class Decoder(_Stack):
    def __init__(self, cfg: ModelConfig, table: nn.Embedding | None, span: Span, vocab_size: int):
        embed = Embedder(table, cfg) if span.tgt_embed else None
        super().__init__(cfg, "decoder", DecoderLayer, span.dec_lo, span.dec_hi, span.ends_decoder, embed)
        tied = cfg.share_decoder_input_output_embed
        self.output = OutputProjection(cfg.d_model, vocab_size, table if tied else None) if span.output else None
        if span.output and tied and embed is None:
            # a slice that projects with a tied table it does not embed with: the table is held (registered
            # last, where the parameter order of older checkpoints has it) under its single-process name
            self.embed = Embedder(table, cfg, with_positions=False)

    def forward(self, prev_tokens, memory, memory_mask, y=None, cache: list | None = None, offset: int = 0,
                project: bool = True):
        """-> logits (B, T, V), or the hidden (B, T, d) on a slice without the output projection (or with
        project=False). y=None: embed prev_tokens first, else continue from hidden y. With `cache` (a list of
        per-layer dicts), only the new tokens are run (incremental decoding, `offset` = tokens already done)."""
        if y is None:
            y = self.embed(prev_tokens, offset)
        co = self.coeffs
        if cache is not None:
            for layer, c in zip(self.layers, cache):
                y = layer(y, co.r, co.s, memory, memory_mask, cache=c)
        else:
            y = self.run_layers(y, lambda layer, h, mem: layer(h, co.r, co.s, mem, memory_mask), memory)
        if self.final_norm is not None:
            y = self.final_norm(y)
        if project and self.output is not None:
            return self.output(y)
        return y


class OutputProjection(nn.Module):
    """hidden -> vocabulary logits, with the embedding table's weight when tied (fairseq's default for MT)."""

    def __init__(self, d_model: int, vocab_size: int, tied_to: nn.Embedding | None = None):
        super().__init__()
        # a list, so the tied table is not registered twice (it belongs to the embedding)
        self._tied = [tied_to] if tied_to is not None else None
        self.weight = None if tied_to is not None else nn.Parameter(torch.empty(vocab_size, d_model))

    @property
    def tied_to(self) -> nn.Embedding | None:
        return self._tied[0] if self._tied else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self._tied[0].weight if self._tied else self.weight)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None = None, seed: int | None = None,
                 span: Span | None = None, init: bool = True, tables: dict | None = None):
        """span: the slice to build (default: the whole model). init=False leaves the parameters uninitialised
        (a meta-device skeleton, or a slice its builder fills itself). tables: embedding tables by stack
        ("encoder" / "decoder"), reused and filled in, so several slices on one process share one copy."""
        super().__init__()
        self.cfg = cfg
        self.span = span or Span.full(cfg.encoder_layers, cfg.decoder_layers)
        tgt_vocab_size = tgt_vocab_size or vocab_size
        if cfg.share_all_embeddings and tgt_vocab_size != vocab_size:
            raise ValueError("model.share_all_embeddings needs one joint vocabulary")
        tables = {} if tables is None else tables

        def table(stack: str, size: int) -> nn.Embedding:
            key = "encoder" if cfg.share_all_embeddings else stack
            if key not in tables:
                tables[key] = nn.Embedding(size, cfg.d_model, padding_idx=PAD)
            return tables[key]

        sp = self.span
        src_table = table("encoder", vocab_size) if sp.src_embed else None
        needs_tgt = sp.tgt_embed or (sp.output and cfg.share_decoder_input_output_embed)
        tgt_table = table("decoder", tgt_vocab_size) if needs_tgt else None
        self.encoder = Encoder(cfg, src_table, sp)
        self.decoder = Decoder(cfg, tgt_table, sp, tgt_vocab_size)
        if init:
            self.reset_parameters(seed)

    def forward(self, src_tokens, prev_output_tokens, *carry, span: Span | None = None):
        """The whole model: logits (B, T, V). A slice: runs the pieces it holds over `carry` (what the previous
        slice returned: span.receives) and returns what the next one needs (span.sends): (x,), (memory,),
        (memory, y), or the logits. `span` runs only that part of what this module holds (DeepSpeed's tied
        embedding module serves several roles)."""
        sp = span or self.span
        x = memory = y = None
        if sp.receives == "x":
            (x,) = carry
        elif sp.receives == "memory":
            (memory,) = carry
        elif sp.receives == "memory+y":
            memory, y = carry
        key_mask = None if src_tokens is None else src_tokens.ne(PAD)  # None: a slice that only projects
        if sp.runs_encoder:
            x, _ = self.encoder(src_tokens, x, key_mask)
            if not sp.ends_encoder:
                return (x,)
            memory = x
            if not sp.runs_decoder:
                return (memory,)
        out = self.decoder(prev_output_tokens, memory, key_mask, y, project=sp.output)
        return out if sp.output else (memory, out)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise every parameter from (seed, its name) alone (model.init.initial_value)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        fill_initial_values(canonical_parameters(self, self.cfg), self.cfg, seed)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (positions, residual coefficients) after a meta-device build
        has been given real storage."""
        for m in self.modules():
            if isinstance(m, Embedder):
                m.reset_positions()
            elif isinstance(m, ResidualCoefficients):
                m.reset()


def canonical_name(name: str, cfg: ModelConfig) -> str:
    """The single-process model's name of a slice's parameter: a table shared by both stacks has the
    encoder's name, also on a slice that holds it only for the decoder."""
    if cfg.share_all_embeddings and name == DECODER_TABLE:
        return SHARED_TABLE
    return name


def canonical_parameters(modules, cfg: ModelConfig) -> dict:
    """canonical name -> parameter of a module or a list of modules (the chunks of a pipeline rank), each
    parameter object once."""
    out, seen = {}, set()
    for module in modules if isinstance(modules, (list, tuple, nn.ModuleList)) else [modules]:
        for name, p in module.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[canonical_name(name, cfg)] = p
    return out


def build_model(cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None = None, seed: int | None = None) -> Transformer:
    """seed=None draws the init seed from torch's RNG, so torch.manual_seed still makes runs reproducible."""
    return Transformer(cfg, vocab_size, tgt_vocab_size, seed)


def meta_model(cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None = None, span: Span | None = None) -> Transformer:
    """The model's (or a slice's) structure on the meta device (parameter names, shapes and counts), allocating
    and initialising nothing: what planners and converters read for a 1000-layer model."""
    with torch.device("meta"):
        return Transformer(cfg, vocab_size, tgt_vocab_size, span=span, init=False)


def build_model_from(cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None, params: dict, step: int,
                     where: str) -> Transformer:
    """The single-process model holding `params` (single-process names, e.g. a consolidated checkpoint) at the
    alpha of `step`. A table shared by encoder and decoder may come under its encoder name only; any other missing
    or unexpected name is a UserError naming `where`."""
    model = Transformer(cfg, vocab_size, tgt_vocab_size, init=False)
    missing, unexpected = model.load_state_dict(params, strict=False)
    if cfg.share_all_embeddings:
        missing = [k for k in missing if k != DECODER_TABLE]
    if missing or unexpected:
        raise UserError(f"{where} does not match its model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    set_step(model, step)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
