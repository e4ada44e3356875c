"""Encoder and decoder layers built from one residual sub-layer wrapper.

`Residual` applies the scheme of megabranch.residual (its `shape`) around any block F:
    post:  y = LN(r * x + s * dropout(F(x)))      post_ln, deepnorm, branchnorm, ds_init
           y = LN(omega * x + dropout(F(x)))       admin (omega: this sub-layer's learned vector)
    pre:   y = x + dropout(F(LN(x)))               pre_ln, dlcl, normformer, subln
    none:  y = x + s * dropout(F(x))               rezero (s: the layer's learned scalar), t_fixup (s = 1)
           y = x + m * dropout(F(x + b))           r_fixup (scalars b, m of this sub-layer)
(r, s) are 0-dim tensors handed in by the stack, so the step-dependent alpha is read at run time. What a scheme
changes inside F (NormFormer's and Sub-LN's extra LayerNorms, R-Fixup's FFN biases) is an option of the block.

Under DLCL a layer also holds its row of the dense combination (`combine`: its input is the learned weighted sum
of the embedding and the normalised outputs of every earlier layer) and the LayerNorm of its own output as the
later layers read it (`history_norm`); the stack runs them (transformer.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import residual_layernorm
from ..residual import SCHEMES, fused_applies
from .attention import MultiheadAttention
from .ffn import FeedForward
from .norm import LayerNorm


class AdminProfile:
    """Admin's profiling pass (Liu et al. 2020b, Sec. 4.2) over one stack, carried from sub-layer to sub-layer in
    the model's order (and from pipeline stage to stage): each sub-layer sets omega to `ratio`, then
    ratio = sqrt(Var[omega * x] + Var[F(x)]) for the next (variances over every element, as the authors' code
    computes them). Starts at 1."""

    def __init__(self, ratio: float = 1.0):
        self.ratio = ratio

    def visit(self, omega: nn.Parameter, x: torch.Tensor, f: torch.Tensor) -> None:
        with torch.no_grad():
            omega.fill_(self.ratio)
            shortcut = (x.float() * omega.float()).var(unbiased=False)
            self.ratio = math.sqrt(float(shortcut) + float(f.float().var(unbiased=False)))


class DenseCombination(nn.Module):
    """DLCL's weighted sum sum_k w_k h_k of `n` history entries (Wang et al. 2019, Eq. 6): one row of the
    lower-triangular combination matrix, initialised to the mean (1 / n each, the authors' default)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((n,), 1.0 / n))

    def forward(self, history: list[torch.Tensor]) -> torch.Tensor:
        w = self.weight.to(history[0].dtype)
        out = history[0] * w[0]
        for k in range(1, len(history)):
            out = torch.addcmul(out, history[k], w[k])
        return out


class Residual(nn.Module):
    def __init__(self, block: nn.Module, d_model: int, residual: str, dropout: float, eps: float, fused: bool = False):
        super().__init__()
        self.block = block
        self.residual = residual
        self.shape = SCHEMES[residual].shape
        self.norm = LayerNorm(d_model, eps) if SCHEMES[residual].has_norm else None
        self.dropout_p = dropout
        self.fused = fused and fused_applies(residual)
        self.omega = nn.Parameter(torch.ones(d_model)) if residual == "admin" else None
        self.fixup_bias = nn.Parameter(torch.zeros(1)) if residual == "r_fixup" else None
        self.fixup_scale = nn.Parameter(torch.ones(1)) if residual == "r_fixup" else None
        self.admin_profile: AdminProfile | None = None  # set only during Admin's profiling pass

    def forward(self, x: torch.Tensor, r: torch.Tensor, s: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.shape == "pre":
            return x + F.dropout(self.block(self.norm(x), **kwargs), self.dropout_p, self.training)
        if self.shape == "none":
            if self.fixup_bias is not None:  # r_fixup
                f = F.dropout(self.block(x + self.fixup_bias, **kwargs), self.dropout_p, self.training)
                return torch.addcmul(x, self.fixup_scale, f)
            f = F.dropout(self.block(x, **kwargs), self.dropout_p, self.training)
            return x + f if self.residual == "t_fixup" else torch.addcmul(x, s, f)  # rezero: s is the layer's a_l
        f = self.block(x, **kwargs)
        if self.omega is not None:  # admin
            if self.admin_profile is not None:
                self.admin_profile.visit(self.omega, x, f)
            return self.norm(torch.addcmul(F.dropout(f, self.dropout_p, self.training), self.omega, x))
        if self.fused:
            return residual_layernorm(
                x,
                f,
                self.norm.weight,
                self.norm.bias,
                r,
                s,
                self.norm.eps,
                dropout_p=self.dropout_p,
                training=self.training,
            )
        f = F.dropout(f, self.dropout_p, self.training)
        # The scale that is 1 by construction is skipped, so post_ln costs one add and branchnorm with
        # alpha = 1 is bit-identical to post_ln (1.0 * f == f exactly).
        if self.residual == "deepnorm":
            h = torch.addcmul(f, r, x)
        elif self.residual == "branchnorm":
            h = torch.addcmul(x, s, f)
        else:  # post_ln, ds_init
            h = x + f
        return self.norm(h)


def _attention(cfg, cross: bool = False) -> MultiheadAttention:
    res = cfg.residual
    return MultiheadAttention(
        cfg.d_model,
        cfg.n_heads,
        cfg.attention_dropout,
        cross=cross,
        eps=cfg.ln_eps,
        head_scale=res == "normformer" and not cross,
        output_norm=res == "normformer" and not cross,
        inner_norm=res == "subln" and not cross,
    )


def _ffn(cfg) -> FeedForward:
    return FeedForward(
        cfg.d_model,
        cfg.ffn_dim,
        cfg.activation,
        cfg.activation_dropout,
        eps=cfg.ln_eps,
        hidden_norm=cfg.residual in ("normformer", "subln"),
        scalar_biases=cfg.residual == "r_fixup",
    )


class _Layer(nn.Module):
    """What both layer kinds hold besides their sub-layers: ReZero's a_l, DLCL's combination row and output norm."""

    def __init__(self, cfg, index: int):
        super().__init__()
        self.residual_weight = nn.Parameter(torch.zeros(1)) if cfg.residual == "rezero" else None
        self.combine = DenseCombination(index + 1) if cfg.residual == "dlcl" else None

    def add_history_norm(self, cfg) -> None:
        # registered after the sub-layers: a layer's parameters in the order it uses them
        self.history_norm = LayerNorm(cfg.d_model, cfg.ln_eps) if cfg.residual == "dlcl" else None

    def branch_scale(self, s: torch.Tensor) -> torch.Tensor:
        """The s of its sub-layers: the stack's, or under ReZero the layer's own a_l."""
        return s if self.residual_weight is None else self.residual_weight


class EncoderLayer(_Layer):
    def __init__(self, cfg, fused: bool = False, index: int = 0):
        super().__init__(cfg, index)
        d, res = cfg.d_model, cfg.residual
        self.self_attn = Residual(_attention(cfg), d, res, cfg.dropout, cfg.ln_eps, fused)
        self.ffn = Residual(_ffn(cfg), d, res, cfg.dropout, cfg.ln_eps, fused)
        self.add_history_norm(cfg)

    def forward(self, x, r, s, key_mask=None):
        s = self.branch_scale(s)
        x = self.self_attn(x, r, s, key_mask=key_mask)
        return self.ffn(x, r, s)


class DecoderLayer(_Layer):
    def __init__(self, cfg, fused: bool = False, index: int = 0):
        super().__init__(cfg, index)
        d, res = cfg.d_model, cfg.residual
        self.self_attn = Residual(_attention(cfg), d, res, cfg.dropout, cfg.ln_eps, fused)
        self.cross_attn = Residual(_attention(cfg, cross=True), d, res, cfg.dropout, cfg.ln_eps, fused)
        self.ffn = Residual(_ffn(cfg), d, res, cfg.dropout, cfg.ln_eps, fused)
        self.add_history_norm(cfg)

    def forward(self, x, r, s, memory, memory_mask=None, cache: dict | None = None):
        s = self.branch_scale(s)
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x = self.self_attn(x, r, s, causal=True, cache=self_cache)
        x = self.cross_attn(x, r, s, memory=memory, key_mask=memory_mask, cache=cross_cache)
        return self.ffn(x, r, s)
