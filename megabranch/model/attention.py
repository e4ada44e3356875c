"""Multi-head attention with a key/value cache for incremental decoding.

The number of heads is derived from the projection widths (`q_proj.out_features // head_dim`), so tensor
parallelism can swap the projections for column/row-parallel ones holding a slice of the heads.

Options some residual schemes add (megabranch.residual), all off by default:
    head_scale    NormFormer's per-head scale of each head's output before out_proj (a parameter of n_heads)
    inner_norm    Sub-LN's LayerNorm over the concatenated heads before out_proj
    output_norm   NormFormer's LayerNorm after out_proj
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import LayerNorm
from .shards import UNSHARDED


class MultiheadAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float,
        cross: bool = False,
        *,
        head_scale: bool = False,
        inner_norm: bool = False,
        output_norm: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.cross = cross
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.head_scale = nn.Parameter(torch.ones(n_heads)) if head_scale else None
        self.inner_norm = LayerNorm(d_model, eps) if inner_norm else None
        self.output_norm = LayerNorm(d_model, eps) if output_norm else None
        self.shards = UNSHARDED  # the heads are split over tensor-parallel ranks (parallel.parallelize)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, h*dh) -> (B, h, L, dh)
        b, length, _ = x.shape
        return x.view(b, length, -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """query (B, Lq, d); memory: the encoder output for cross-attention (else self-attention).

        key_mask (B, Lk) is True where a key may be attended (False on padding). `cache` (a dict owned by the
        caller, one per layer) makes it one step of incremental decoding (see `step`).
        """
        if cache is not None:
            return self.project_out(self.step(query, memory, key_mask, cache))
        q = self._heads(self.q_proj(query))
        source = memory if self.cross else query
        k, v = self._heads(self.k_proj(source)), self._heads(self.v_proj(source))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal and mask is None
        )
        return self.project_out(out)

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (B, h, L, dh) -> (B, L, d): head scale, concatenation, inner norm, out_proj."""
        if self.head_scale is not None:
            out = out * self.head_scale[:, None, None].to(out.dtype)
        b, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(b, length, -1)
        if self.inner_norm is not None:
            out = self.shards.scatter(self.inner_norm(self.shards.gather(out)))
        out = self.out_proj(out)
        return out if self.output_norm is None else self.output_norm(out)

    def step(self, query: torch.Tensor, memory, key_mask, cache: dict) -> torch.Tensor:
        """One step of incremental decoding: one new query per row, query (B, 1, d) -> the heads' outputs
        (B, h, 1, dh). Self-attention appends the step's key/value to `cache` and attends to all of them.
        Cross-attention projects the encoder's keys/values once, on the first step; `memory` and `key_mask` may
        hold each sentence once for a group of consecutive rows (its beams): (B / group, S, d), (B / group, S).
        The rows of a group then attend as one block of queries to their sentence's keys, held once."""
        b = query.shape[0]
        if query.shape[1] != 1:
            raise ValueError(f"incremental decoding runs one new token per row, not {query.shape[1]}")
        q = self._heads(self.q_proj(query))
        if self.cross:
            if "k" not in cache:
                cache["k"], cache["v"] = self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))
            k, v = cache["k"], cache["v"]
            q = q.view(k.shape[0], -1, q.shape[1], self.head_dim).transpose(1, 2)  # (B / group, h, group, dh)
        else:
            k, v = self._heads(self.k_proj(query)), self._heads(self.v_proj(query))
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # a few queries per (row, head): two batched matrix products, without scaled_dot_product_attention's
        # per-call overhead (fairseq's incremental path does the same)
        scores = torch.matmul(q * self.head_dim**-0.5, k.transpose(2, 3))
        if self.cross and key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], -float("inf"))
        # the softmax in float32 also for bf16/fp16 weights, as scaled_dot_product_attention's kernels do (a no-op
        # for float32)
        out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)
        return out.transpose(1, 2).reshape(b, -1, 1, self.head_dim) if self.cross else out
