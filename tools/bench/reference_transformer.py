"""A plain-PyTorch Post-LN encoder-decoder Transformer written the way fairseq writes `transformer` (v0.12):
time-first (T, B, C) activations, a MultiheadAttention with separate q/k/v projections that calls
F.multi_head_attention_forward, sub-layers `x = LN(residual + dropout(F(x)))`, embeddings scaled by sqrt(d) plus
sinusoidal positions, the output projection tied to the shared embedding table, and fairseq's label-smoothed
cross-entropy. Independent of megabranch's model code: tools.bench.train's baseline, with the same sizes (and so
the same FLOPs) as megabranch's post_ln model. Written for this project, not copied from fairseq.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PAD = 0


class FairseqStyleMHA(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.d, self.heads, self.dropout = d, heads, dropout
        self.k_proj, self.v_proj, self.q_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        gain = 1 / math.sqrt(2)
        for lin in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(lin.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        # fairseq's fast path: torch's fused multi-head attention with separate projection weights
        out, _ = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.d,
            self.heads,
            in_proj_weight=torch.empty([0], device=query.device),
            in_proj_bias=torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=self.dropout,
            out_proj_weight=self.out_proj.weight,
            out_proj_bias=self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            attn_mask=attn_mask,
            use_separate_proj_weight=True,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
        )
        return out


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ffn, dropout):
        super().__init__()
        self.self_attn = FairseqStyleMHA(d, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = dropout

    def forward(self, x, pad_mask):
        residual = x
        x = self.self_attn(x, x, x, key_padding_mask=pad_mask)
        x = F.dropout(x, self.dropout, self.training)
        x = self.self_attn_layer_norm(residual + x)
        residual = x
        x = self.fc2(F.relu(self.fc1(x)))
        x = F.dropout(x, self.dropout, self.training)
        return self.final_layer_norm(residual + x)


class DecoderLayer(nn.Module):
    def __init__(self, d, heads, ffn, dropout):
        super().__init__()
        self.self_attn = FairseqStyleMHA(d, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = FairseqStyleMHA(d, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = dropout

    def forward(self, x, enc, enc_pad_mask, self_attn_mask):
        residual = x
        x = self.self_attn(x, x, x, attn_mask=self_attn_mask)
        x = self.self_attn_layer_norm(residual + F.dropout(x, self.dropout, self.training))
        residual = x
        x = self.encoder_attn(x, enc, enc, key_padding_mask=enc_pad_mask)
        x = self.encoder_attn_layer_norm(residual + F.dropout(x, self.dropout, self.training))
        residual = x
        x = self.fc2(F.relu(self.fc1(x)))
        return self.final_layer_norm(residual + F.dropout(x, self.dropout, self.training))


def sinusoidal(num: int, dim: int) -> torch.Tensor:
    half = dim // 2
    emb = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    emb = torch.arange(num, dtype=torch.float)[:, None] * emb[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


class ReferenceTransformer(nn.Module):
    """fairseq `transformer` (Post-LN) with share_all_embeddings, sized like megabranch's model."""

    def __init__(
        self,
        vocab: int,
        d: int,
        heads: int,
        ffn: int,
        enc_layers: int,
        dec_layers: int,
        dropout: float = 0.1,
        max_positions: int = 1024,
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d, padding_idx=PAD)
        nn.init.normal_(self.embed_tokens.weight, 0, d**-0.5)
        nn.init.zeros_(self.embed_tokens.weight[PAD])
        self.register_buffer("positions", sinusoidal(max_positions, d), persistent=False)
        self.scale, self.dropout = math.sqrt(d), dropout
        self.encoder_layers = nn.ModuleList(EncoderLayer(d, heads, ffn, dropout) for _ in range(enc_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(d, heads, ffn, dropout) for _ in range(dec_layers))

    def _embed(self, tokens):  # (B, T) -> (T, B, C)
        x = self.embed_tokens(tokens) * self.scale + self.positions[: tokens.shape[1]]
        return F.dropout(x, self.dropout, self.training).transpose(0, 1)

    def forward(self, src_tokens, prev_output_tokens):
        src_pad = src_tokens.eq(PAD)
        x = self._embed(src_tokens)
        for layer in self.encoder_layers:
            x = layer(x, src_pad)
        enc = x
        y = self._embed(prev_output_tokens)
        t = prev_output_tokens.shape[1]
        causal = torch.triu(torch.full((t, t), float("-inf"), device=y.device), 1)  # fairseq's buffered_future_mask
        for layer in self.decoder_layers:
            y = layer(y, enc, src_pad, causal)
        return F.linear(y.transpose(0, 1), self.embed_tokens.weight)  # (B, T, V)


def label_smoothed_loss(logits, target, eps: float):
    """fairseq's label_smoothed_nll_loss (reduce=True), padding ignored."""
    lprobs = F.log_softmax(logits.float(), dim=-1)
    target = target.unsqueeze(-1)
    nll = -lprobs.gather(-1, target)
    smooth = -lprobs.sum(-1, keepdim=True)
    pad = target.eq(PAD)
    nll, smooth = nll.masked_fill(pad, 0.0).sum(), smooth.masked_fill(pad, 0.0).sum()
    eps_i = eps / (lprobs.size(-1) - 1)
    return (1.0 - eps - eps_i) * nll + eps_i * smooth
