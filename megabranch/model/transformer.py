"""The encoder-decoder Transformer: stacks, shared embeddings, initialisation.

Model code knows nothing of process groups; parallelism is applied from outside (megabranch.parallel).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..residual import ResidualCoefficients, deepnorm_constants
from .embeddings import Embedder
from .layers import DecoderLayer, EncoderLayer

PAD = 0  # the data layer fixes pad=0, unk=1, bos=2, eos=3


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed: nn.Embedding, coeffs: ResidualCoefficients):
        super().__init__()
        self.embed = Embedder(embed, cfg.max_positions, cfg.dropout)
        self.coeffs = coeffs
        self.layers = nn.ModuleList(EncoderLayer(cfg, cfg.fused_kernels) for _ in range(cfg.encoder_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps) if cfg.residual == "pre_ln" else None

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
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps) if cfg.residual == "pre_ln" else None
        if cfg.share_decoder_input_output_embed:
            self.output_weight = None  # uses embed.table.weight
        else:
            self.output_weight = nn.Parameter(torch.empty(vocab_size, cfg.d_model))
            nn.init.normal_(self.output_weight, std=cfg.d_model**-0.5)

    def forward(self, prev_tokens, memory, memory_mask, cache: list | None = None, offset: int = 0):
        """-> logits (B, T, V). With `cache` (a list of per-layer dicts), only the new tokens are run."""
        x = self.embed(prev_tokens, offset)
        r, s = self.coeffs.r, self.coeffs.s
        for i, layer in enumerate(self.layers):
            x = layer(x, r, s, memory, memory_mask, cache=None if cache is None else cache[i])
        if self.final_norm is not None:
            x = self.final_norm(x)
        weight = self.embed.table.weight if self.output_weight is None else self.output_weight
        return nn.functional.linear(x, weight)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None = None):
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
        self.reset_parameters()

    def forward(self, src_tokens, prev_output_tokens):
        memory, mask = self.encoder(src_tokens)
        return self.decoder(prev_output_tokens, memory, mask)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fairseq's init; with DeepNorm init, v/out/fc1/fc2 weights are scaled by the stack's beta."""
        cfg = self.cfg
        use_beta = cfg.deepnorm_init if cfg.deepnorm_init is not None else cfg.residual in ("deepnorm", "branchnorm")
        consts = deepnorm_constants(cfg.encoder_layers, cfg.decoder_layers)
        for stack_name, stack in (("encoder", self.encoder), ("decoder", self.decoder)):
            beta = consts[stack_name][1] if use_beta else 1.0
            for name, p in stack.layers.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif ".norm." in name:
                    nn.init.ones_(p)
                elif name.endswith(("q_proj.weight", "k_proj.weight")):
                    nn.init.xavier_uniform_(p, gain=1 / math.sqrt(2))
                elif name.endswith("v_proj.weight"):
                    nn.init.xavier_uniform_(p, gain=beta / math.sqrt(2))
                else:  # out_proj, fc1, fc2
                    nn.init.xavier_uniform_(p, gain=beta)
        for emb in {id(m): m for m in (self.encoder.embed.table, self.decoder.embed.table)}.values():
            nn.init.normal_(emb.weight, std=cfg.d_model**-0.5)
            emb.weight[PAD].zero_()


def build_model(cfg: ModelConfig, vocab_size: int, tgt_vocab_size: int | None = None) -> Transformer:
    return Transformer(cfg, vocab_size, tgt_vocab_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
