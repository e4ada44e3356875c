"""The encoder-decoder Transformer: stacks, shared embeddings, initialisation.

Model code knows nothing of process groups; parallelism is applied from outside (megabranch.parallel).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from ..residual import ResidualCoefficients, deepnorm_constants, set_step
from .embeddings import Embedder
from .layers import DecoderLayer, EncoderLayer
from .norm import LayerNorm

PAD = 0  # the data layer fixes pad=0, unk=1, bos=2, eos=3


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed: nn.Embedding, coeffs: ResidualCoefficients):
        super().__init__()
        self.embed = Embedder(embed, cfg.max_positions, cfg.dropout)
        self.coeffs = coeffs
        self.layers = nn.ModuleList(EncoderLayer(cfg, cfg.fused_kernels) for _ in range(cfg.encoder_layers))
        self.final_norm = LayerNorm(cfg.d_model, cfg.ln_eps) if cfg.residual == "pre_ln" else None

    def forward(self, src_tokens: torch.Tensor):
        """-> (encoder output (B, S, d), key mask (B, S) True on real tokens)."""
        key_mask = src_tokens.ne(PAD)
        x = self.embed(src_tokens)
        r, s = self.coeffs.r, self.coeffs.s
        for layer in self.layers:
            x = layer(x, r, s, key_mask=key_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, key_mask


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed: nn.Embedding, coeffs: ResidualCoefficients, vocab_size: int):
        super().__init__()
        self.embed = Embedder(embed, cfg.max_positions, cfg.dropout)
        self.coeffs = coeffs
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.fused_kernels) for _ in range(cfg.decoder_layers))
        self.final_norm = LayerNorm(cfg.d_model, cfg.ln_eps) if cfg.residual == "pre_ln" else None
        self.output = OutputProjection(cfg.d_model, vocab_size, embed if cfg.share_decoder_input_output_embed else None)

    def forward(self, prev_tokens, memory, memory_mask, cache: list | None = None, offset: int = 0):
        """-> logits (B, T, V). With `cache` (a list of per-layer dicts), only the new tokens are run."""
        x = self.embed(prev_tokens, offset)
        r, s = self.coeffs.r, self.coeffs.s
        for i, layer in enumerate(self.layers):
            x = layer(x, r, s, memory, memory_mask, cache=None if cache is None else cache[i])
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.output(x)


class OutputProjection(nn.Module):
    """hidden -> vocabulary logits, with the embedding table's weight when tied (fairseq's default for MT)."""

    def __init__(self, d_model: int, vocab_size: int, tied_to: nn.Embedding | None = None):
        super().__init__()
        # a list, so the tied table is not registered twice (it belongs to the embedding)
        self._tied = [tied_to] if tied_to is not None else None
        self.weight = None if tied_to is not None else nn.Parameter(torch.empty(vocab_size, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self._tied[0].weight if self._tied else self.weight)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None = None, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        tgt_vocab_size = tgt_vocab_size or vocab_size
        if cfg.share_all_embeddings and tgt_vocab_size != vocab_size:
            raise ValueError("model.share_all_embeddings needs one joint vocabulary")
        src_embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD)
        tgt_embed = src_embed if cfg.share_all_embeddings else nn.Embedding(tgt_vocab_size, cfg.d_model, padding_idx=PAD)
        consts = deepnorm_constants(cfg.encoder_layers, cfg.decoder_layers)
        coeff = lambda stack: ResidualCoefficients(  # noqa: E731
            cfg.residual, consts[stack][0], cfg.alpha_schedule, cfg.alpha_warmup_steps
        )
        self.encoder = Encoder(cfg, src_embed, coeff("encoder"))
        self.decoder = Decoder(cfg, tgt_embed, coeff("decoder"), tgt_vocab_size)
        self.reset_parameters(seed)

    def forward(self, src_tokens, prev_output_tokens):
        memory, mask = self.encoder(src_tokens)
        return self.decoder(prev_output_tokens, memory, mask)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise every parameter from (seed, its name) alone; see `initial_value`."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        for name, p in self.named_parameters():
            p.copy_(initial_value(name, tuple(p.shape), self.cfg, seed))


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_value(name: str, shape: tuple, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of the full (unsharded) parameter `name` of the single-process model.

    A pure function of (seed, name, shape, cfg): any parallel layout can materialise just its own layers or
    shards and still hold exactly the weights of the single-process model. fairseq's init: xavier_uniform
    (q/k/v with gain 1/sqrt(2)), zero biases, unit LayerNorm, N(0, d^-1/2) embeddings with a zero pad row;
    with DeepNorm init (default for deepnorm and branchnorm) v/out/fc1/fc2 are scaled by the stack's beta.
    """
    g = torch.Generator().manual_seed(_name_seed(seed, name))
    t = torch.empty(shape)
    if "embed.table" in name or name.endswith("output.weight"):
        t.normal_(0.0, cfg.d_model**-0.5, generator=g)
        if "embed.table" in name:
            t[PAD] = 0.0
        return t
    if name.endswith("bias"):
        return t.zero_()
    if "norm." in name:
        return t.fill_(1.0)
    use_beta = cfg.deepnorm_init if cfg.deepnorm_init is not None else cfg.residual in ("deepnorm", "branchnorm")
    stack = "encoder" if name.startswith("encoder.") else "decoder"
    beta = deepnorm_constants(cfg.encoder_layers, cfg.decoder_layers)[stack][1] if use_beta else 1.0
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        gain = 1 / math.sqrt(2)
    elif name.endswith("v_proj.weight"):
        gain = beta / math.sqrt(2)
    else:  # out_proj, fc1, fc2
        gain = beta
    fan_out, fan_in = shape
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return t.uniform_(-bound, bound, generator=g)


def build_model(cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None = None, seed: int | None = None) -> Transformer:
    """seed=None draws the init seed from torch's RNG, so torch.manual_seed still makes runs reproducible."""
    return Transformer(cfg, vocab_size, tgt_vocab_size, seed)


class _Skeleton(Transformer):
    def reset_parameters(self, seed=None):
        pass  # no initial values: the tensors hold no data


def meta_model(cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None = None) -> Transformer:
    """The model's structure on the meta device (parameter names, shapes and counts), allocating and
    initialising nothing: what planners and converters read for a 1000-layer model."""
    with torch.device("meta"):
        return _Skeleton(cfg, vocab_size, tgt_vocab_size)


def build_model_from(cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None, params: dict, step: int,
                     where: str) -> Transformer:
    """The single-process model holding `params` (single-process names, e.g. a consolidated checkpoint) at the
    alpha of `step`. A table shared by encoder and decoder may come under its encoder name only; any other missing
    or unexpected name is a UserError naming `where`."""
    model = build_model(cfg, vocab_size, tgt_vocab_size, seed=0)
    missing, unexpected = model.load_state_dict(params, strict=False)
    if cfg.share_all_embeddings:
        missing = [k for k in missing if k != "decoder.embed.table.weight"]
    if missing or unexpected:
        raise UserError(f"{where} does not match its model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    set_step(model, step)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
