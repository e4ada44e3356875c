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
from ..residual import SCHEMES, ResidualCoefficients, set_step
from ..vocab import PAD
from .embeddings import Embedder
from .init import fill_initial_values
from .layers import AdminProfile, DecoderLayer, DenseCombination, EncoderLayer, Residual
from .norm import LayerNorm
from .span import Carried, Span

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
    """What the encoder and the decoder share: coefficients, held layers, what ends the stack (the final norm of
    the Pre-LN family, DLCL's last combination, R-Fixup's scalar bias and scale), recomputation, and how the
    hidden state travels (under DLCL: the history list of every entry later layers combine)."""

    def __init__(self, cfg: ModelConfig, stack: str, layer_cls, lo: int, hi: int, ends: bool, embed: nn.Module | None):
        super().__init__()
        self.embed = embed  # registered first: the parameter order (optimizer, ZeRO, buckets) is the checkpoints'
        self.coeffs = ResidualCoefficients.for_stack(cfg, stack)
        self.layers = LayerStack({i: layer_cls(cfg, cfg.fused_kernels, i) for i in range(lo, hi)})
        self.dense = cfg.residual == "dlcl"
        n_layers = cfg.encoder_layers if stack == "encoder" else cfg.decoder_layers
        # DLCL: the stack's output is one more combination, of the embedding and every layer's normalised output
        self.output_combine = DenseCombination(n_layers + 1) if ends and self.dense else None
        self.final_norm = LayerNorm(cfg.d_model, cfg.ln_eps) if ends and SCHEMES[cfg.residual].final_norm else None
        fixup_end = ends and cfg.residual == "r_fixup"  # Fixup's reference code: encoder (x + b) * m, decoder x + b
        self.final_bias = nn.Parameter(torch.zeros(1)) if fixup_end else None
        self.final_scale = nn.Parameter(torch.ones(1)) if fixup_end and stack == "encoder" else None
        # activation recomputation: every `recompute` layers form one checkpointed segment (0: off). The engine
        # may swap `checkpoint` for one that also replays tensor-parallel dropout streams.
        self.recompute = 0
        self.checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def start(self, embedded: torch.Tensor):
        """The state after the embedding: the hidden, or DLCL's history [embedding] (not normalised)."""
        return [embedded] if self.dense else embedded

    def received(self, carried: torch.Tensor):
        """The state a previous slice sent: the hidden, or DLCL's stacked history as a list."""
        return list(carried.unbind(0)) if self.dense else carried

    def finish(self, state, ends: bool) -> torch.Tensor:
        """The stack's output (the final combination, norm or Fixup scalars applied) when the slice ends it, else
        what travels on (DLCL: the history stacked into one tensor)."""
        if not ends:
            return torch.stack(state) if self.dense else state
        h = self.output_combine(state) if self.dense else state
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.final_bias is not None:
            h = h + self.final_bias
            if self.final_scale is not None:
                h = h * self.final_scale
        return h

    def run_layers(self, state, call, *extra):
        """The state through every held layer, `call(layer, h, *extra)` each; `extra` tensors are passed
        explicitly so a recomputed segment's graph sees them."""
        layers = list(self.layers)
        k = self.recompute
        recompute = k > 0 and torch.is_grad_enabled()
        if self.dense:
            if not recompute:
                return state + list(_dense_segment(layers, call, len(state), *state, *extra))
            for start in range(0, len(layers), k):
                state = state + list(
                    self.checkpoint(_dense_segment, layers[start : start + k], call, len(state), *state, *extra)
                )
            return state
        if not recompute:
            return _segment(layers, call, state, *extra)
        for start in range(0, len(layers), k):
            state = self.checkpoint(_segment, layers[start : start + k], call, state, *extra)
        return state

    def set_admin_profile(self, profile: AdminProfile | None) -> None:
        """Admin: every sub-layer of the stack visits `profile` in its next forward (None: back to training)."""
        for m in self.layers.modules():
            if isinstance(m, Residual):
                m.admin_profile = profile


def _segment(layers, call, h, *extra):
    for layer in layers:
        h = call(layer, h, *extra)
    return h


def _dense_segment(layers, call, n_history, *tensors):
    """DLCL: each layer's input is its combination of the history so far; its normalised output joins the
    history. -> the new entries."""
    history, extra = list(tensors[:n_history]), tensors[n_history:]
    new = []
    for layer in layers:
        y = call(layer, layer.combine(history), *extra)
        entry = layer.history_norm(y)
        history.append(entry)
        new.append(entry)
    return tuple(new)


class Encoder(_Stack):
    def __init__(self, cfg: ModelConfig, table: nn.Embedding | None, span: Span):
        embed = Embedder(table, cfg) if span.src_embed else None
        super().__init__(cfg, "encoder", EncoderLayer, span.enc_lo, span.enc_hi, span.ends_encoder, embed)
        self.ends = span.ends_encoder

    def forward(self, src_tokens: torch.Tensor, x: torch.Tensor | None = None, key_mask: torch.Tensor | None = None):
        """-> (hidden (B, S, d), key mask (B, S) True on real tokens). x=None: embed src_tokens first, else
        continue from what the previous slice sent (the hidden; DLCL: its stacked history)."""
        key_mask = src_tokens.ne(PAD) if key_mask is None else key_mask
        state = self.start(self.embed(src_tokens)) if x is None else self.received(x)
        r, s = self.coeffs.shortcut_scale, self.coeffs.branch_scale
        state = self.run_layers(state, lambda layer, h: layer(h, r, s, key_mask=key_mask))
        return self.finish(state, self.ends), key_mask


class Decoder(_Stack):
    def __init__(self, cfg: ModelConfig, table: nn.Embedding | None, span: Span, vocab_size: int):
        embed = Embedder(table, cfg) if span.tgt_embed else None
        super().__init__(cfg, "decoder", DecoderLayer, span.dec_lo, span.dec_hi, span.ends_decoder, embed)
        self.ends = span.ends_decoder
        tied = cfg.share_decoder_input_output_embed
        self.output = OutputProjection(cfg.d_model, vocab_size, table if tied else None) if span.output else None
        if span.output and tied and embed is None:
            # a slice that projects with a tied table it does not embed with: the table is held (registered
            # last, where the parameter order of older checkpoints has it) under its single-process name
            self.embed = Embedder(table, cfg, with_positions=False)

    def forward(
        self, prev_tokens, memory, memory_mask, y=None, cache: list | None = None, offset: int = 0, project: bool = True
    ):
        """-> logits (B, T, V), or what travels on (the hidden (B, T, d); DLCL: the stacked history) on a slice
        that does not end the decoder, or the final hidden with project=False. y=None: embed prev_tokens first,
        else continue from what the previous slice sent. With `cache` (a list of per-layer dicts), only the one
        new token of each row is run (incremental decoding, `offset` = tokens already done), and memory /
        memory_mask may hold each sentence once for a group of consecutive rows, its beams
        (attention.MultiheadAttention.step)."""
        state = self.start(self.embed(prev_tokens, offset)) if y is None else self.received(y)
        r, s = self.coeffs.shortcut_scale, self.coeffs.branch_scale
        if cache is not None:
            caches = {id(layer): per_layer for layer, per_layer in zip(self.layers, cache)}
            state = self.run_layers(
                state, lambda layer, h, mem: layer(h, r, s, mem, memory_mask, cache=caches[id(layer)]), memory
            )
        else:
            state = self.run_layers(state, lambda layer, h, mem: layer(h, r, s, mem, memory_mask), memory)
        y = self.finish(state, self.ends)
        if project and self.output is not None:
            return self.output(y)
        return y


class OutputProjection(nn.Module):
    """hidden -> vocabulary logits, with the embedding table's weight when tied (fairseq's default for MT)."""

    def __init__(self, d_model: int, vocab_size: int, tied_to: nn.Embedding | None = None):
        super().__init__()
        # in a list, so the tied table is not registered twice (it belongs to the embedding)
        self._tied_table = [tied_to] if tied_to is not None else []
        self.weight = None if tied_to is not None else nn.Parameter(torch.empty(vocab_size, d_model))

    @property
    def tied_to(self) -> nn.Embedding | None:
        """The embedding table whose weight projects (None: untied, `weight` is the projection's own)."""
        return self._tied_table[0] if self._tied_table else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.tied_to
        return nn.functional.linear(x, self.weight if table is None else table.weight)


class Transformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        tgt_vocab_size: int | None = None,
        seed: int | None = None,
        span: Span | None = None,
        init: bool = True,
        tables: dict | None = None,
    ):
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
        # Admin's omegas come from a profiling pass before the first step (a checkpoint holds them afterwards)
        self.admin_profiled = False
        if init:
            self.reset_parameters(seed)

    def forward(self, src_tokens, prev_output_tokens, *carry, span: Span | None = None):
        """The whole model: logits (B, T, V). A slice: runs the pieces it holds over `carry` (what the previous
        slice returned: span.receives) and returns what the next one needs (span.sends): (encoder hidden,),
        (memory,), (memory, decoder hidden), or the logits. `span` runs only that part of what this module holds
        (DeepSpeed's tied embedding module serves several roles). Admin's profiling pass runs first when a whole
        model trains its first step unprofiled (a pipeline's executor runs it stage by stage instead)."""
        sp = span or self.span
        if sp == Span.full(sp.n_enc, sp.n_dec) and self.needs_admin_profile():
            self.profile_admin(src_tokens, prev_output_tokens)
        received = dict(zip(sp.receives, carry))
        x, memory = received.get(Carried.ENCODER_HIDDEN), received.get(Carried.MEMORY)
        y = received.get(Carried.DECODER_HIDDEN)
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

    # --- Admin's profiling pass (model.residual=admin) ----------------------------------------------------------
    def needs_admin_profile(self) -> bool:
        """Admin, training, about to take step 0, and not profiled yet in this process."""
        return (
            self.cfg.residual == "admin"
            and self.training
            and torch.is_grad_enabled()
            and not self.admin_profiled
            and self.encoder.coeffs.step == 0
        )

    @torch.no_grad()
    def profile_admin(self, src_tokens, prev_output_tokens, *carry, ratios: tuple = (1.0, 1.0)) -> tuple:
        """Admin's profiling (Liu et al. 2020b): one forward (eval mode, no dropout) in which every sub-layer, in
        order, sets its omega from the running ratio of its stack (layers.AdminProfile). `carry` and `ratios`
        (encoder, decoder) are what the previous pipeline stage's pass returned. -> (what this slice returns,
        the ratios after it), for the next stage."""
        profiles = (AdminProfile(ratios[0]), AdminProfile(ratios[1]))
        was_training = self.training
        self.eval()
        self.encoder.set_admin_profile(profiles[0])
        self.decoder.set_admin_profile(profiles[1])
        try:
            self.admin_profiled = True  # the forward below must not start another pass
            out = self.forward(src_tokens, prev_output_tokens, *carry)
        finally:
            self.encoder.set_admin_profile(None)
            self.decoder.set_admin_profile(None)
            self.train(was_training)
        return out, (profiles[0].ratio, profiles[1].ratio)

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


def build_model(
    cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None = None, seed: int | None = None
) -> Transformer:
    """seed=None draws the init seed from torch's RNG, so torch.manual_seed still makes runs reproducible."""
    return Transformer(cfg, vocab_size, tgt_vocab_size, seed)


def meta_model(
    cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None = None, span: Span | None = None
) -> Transformer:
    """The model's (or a slice's) structure on the meta device (parameter names, shapes and counts), allocating
    and initialising nothing: what planners and converters read for a 1000-layer model."""
    with torch.device("meta"):
        return Transformer(cfg, vocab_size, tgt_vocab_size, span=span, init=False)


def build_model_from(
    cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None, params: dict, step: int, where: str
) -> Transformer:
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
