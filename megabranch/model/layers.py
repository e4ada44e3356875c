"""Encoder and decoder layers built from one residual sub-layer wrapper.

`Residual` applies the scheme of megabranch.residual around any block F:
    post_ln / deepnorm / branchnorm:  y = LN(r * x + s * dropout(F(x)))
    pre_ln:                           y = x + dropout(F(LN(x)))
(r, s) are 0-dim tensors handed in by the stack, so the step-dependent alpha is read at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import residual_layernorm
from .attention import MultiheadAttention
from .ffn import FeedForward
from .norm import LayerNorm


class Residual(nn.Module):
    def __init__(self, block: nn.Module, d_model: int, residual: str, dropout: float, eps: float, fused: bool = False):
        super().__init__()
        self.block = block
        self.norm = LayerNorm(d_model, eps)
        self.residual = residual
        self.p = dropout
        self.fused = fused and residual != "pre_ln"

    def forward(self, x: torch.Tensor, r: torch.Tensor, s: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.residual == "pre_ln":
            return x + F.dropout(self.block(self.norm(x), **kwargs), self.p, self.training)
        f = self.block(x, **kwargs)
        if self.fused:
            return residual_layernorm(
                x, f, self.norm.weight, self.norm.bias, r, s, self.norm.eps, dropout_p=self.p, training=self.training
            )
        f = F.dropout(f, self.p, self.training)
        # The scale that is 1 by construction is skipped, so post_ln costs one add and branchnorm with
        # alpha = 1 is bit-identical to post_ln (1.0 * f == f exactly).
        if self.residual == "post_ln":
            h = x + f
        elif self.residual == "deepnorm":
            h = torch.addcmul(f, r, x)
        else:  # branchnorm
            h = torch.addcmul(x, s, f)
        return self.norm(h)


class EncoderLayer(nn.Module):
    def __init__(self, cfg, fused: bool = False):
        super().__init__()
        d, res = cfg.d_model, cfg.residual
        self.self_attn = Residual(MultiheadAttention(d, cfg.n_heads, cfg.attention_dropout), d, res, cfg.dropout, cfg.ln_eps, fused)
        self.ffn = Residual(FeedForward(d, cfg.ffn_dim, cfg.activation, cfg.activation_dropout), d, res, cfg.dropout, cfg.ln_eps, fused)

    def forward(self, x, r, s, key_mask=None):
        x = self.self_attn(x, r, s, key_mask=key_mask)
        return self.ffn(x, r, s)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, fused: bool = False):
        super().__init__()
        d, res = cfg.d_model, cfg.residual
        self.self_attn = Residual(MultiheadAttention(d, cfg.n_heads, cfg.attention_dropout), d, res, cfg.dropout, cfg.ln_eps, fused)
        self.cross_attn = Residual(
            MultiheadAttention(d, cfg.n_heads, cfg.attention_dropout, cross=True), d, res, cfg.dropout, cfg.ln_eps, fused
        )
        self.ffn = Residual(FeedForward(d, cfg.ffn_dim, cfg.activation, cfg.activation_dropout), d, res, cfg.dropout, cfg.ln_eps, fused)

    def forward(self, x, r, s, memory, memory_mask=None, cache: dict | None = None):
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x = self.self_attn(x, r, s, causal=True, cache=self_cache)
        x = self.cross_attn(x, r, s, memory=memory, key_mask=memory_mask, cache=cross_cache)
        return self.ffn(x, r, s)
