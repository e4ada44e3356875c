"""A float64 transcription of every residual scheme's equations (megabranch.residual's table, the papers cited in
docs/design.md), written from the equations and the parameter names only: no megabranch module runs here.

    logits = reference_logits(params, cfg, src, prev)

`params` are the single-process model's parameters by name (a tied table once, under the encoder's name);
dropout is off (eval).
"""

from __future__ import annotations

import math

import torch

PAD = 0


def _ln(x, p, name, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _lin(x, p, name):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def _positions(length: int, d: int):
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / max(half - 1, 1)))
    ang = torch.arange(length, dtype=torch.float64)[:, None] * freq[None, :]
    return torch.cat([torch.sin(ang), torch.cos(ang)], 1)


def _attention(x, kv, p, name, heads, key_mask, causal, cfg, self_attn):
    b, lq, d = x.shape
    lk, dh = kv.shape[1], d // heads
    q = _lin(x, p, f"{name}.q_proj").view(b, lq, heads, dh).transpose(1, 2)
    k = _lin(kv, p, f"{name}.k_proj").view(b, lk, heads, dh).transpose(1, 2)
    v = _lin(kv, p, f"{name}.v_proj").view(b, lk, heads, dh).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
    heads_out = scores.softmax(-1) @ v  # (b, h, lq, dh)
    if cfg.residual == "normformer" and self_attn:  # HeadScale: gamma_i * head_i, before W^O
        heads_out = heads_out * p[f"{name}.head_scale"][None, :, None, None]
    out = heads_out.transpose(1, 2).reshape(b, lq, d)
    if cfg.residual == "subln" and self_attn:  # Sub-LN: LN before the output projection
        out = _ln(out, p, f"{name}.inner_norm", cfg.ln_eps)
    out = _lin(out, p, f"{name}.out_proj")
    if cfg.residual == "normformer" and self_attn:  # NormFormer: LN after the attention
        out = _ln(out, p, f"{name}.output_norm", cfg.ln_eps)
    return out


def _ffn(x, p, name, cfg):
    h = _lin(x, p, f"{name}.fc1")
    if cfg.residual == "r_fixup":
        h = h + p[f"{name}.pre_act_bias"]
    h = torch.relu(h) if cfg.activation == "relu" else torch.nn.functional.gelu(h)
    if cfg.residual == "r_fixup":
        h = h + p[f"{name}.pre_fc2_bias"]
    if cfg.residual in ("normformer", "subln"):
        h = _ln(h, p, f"{name}.hidden_norm", cfg.ln_eps)
    return _lin(h, p, f"{name}.fc2")


def _deepnorm_alpha(cfg, stack):
    n, m = cfg.encoder_layers, cfg.decoder_layers
    return 0.81 * (n**4 * m) ** (1 / 16) if stack == "encoder" else (3 * m) ** 0.25


def _sublayer(x, f, p, name, cfg, stack, layer, alpha_t):
    """One sub-layer of the scheme: f computes the block on its input."""
    res, norm = cfg.residual, f"{name}.norm"
    if res in ("post_ln", "ds_init"):
        return _ln(x + f(x), p, norm, cfg.ln_eps)
    if res == "deepnorm":
        return _ln(_deepnorm_alpha(cfg, stack) * x + f(x), p, norm, cfg.ln_eps)
    if res == "branchnorm":
        return _ln(x + alpha_t * f(x), p, norm, cfg.ln_eps)
    if res == "admin":
        return _ln(p[f"{name}.omega"] * x + f(x), p, norm, cfg.ln_eps)
    if res in ("pre_ln", "dlcl", "normformer", "subln"):
        return x + f(_ln(x, p, norm, cfg.ln_eps))
    if res == "rezero":
        return x + p[f"{layer}.residual_weight"] * f(x)
    if res == "t_fixup":
        return x + f(x)
    if res == "r_fixup":
        return x + p[f"{name}.fixup_scale"] * f(x + p[f"{name}.fixup_bias"])
    raise AssertionError(res)


def _stack(h, p, cfg, stack, layer_fn):
    """The layers of one stack; DLCL's dense combination around them; what ends the stack."""
    n = cfg.encoder_layers if stack == "encoder" else cfg.decoder_layers
    history = [h]
    for i in range(n):
        layer = f"{stack}.layers.{i}"
        if cfg.residual == "dlcl":
            w = p[f"{layer}.combine.weight"]
            h = sum(w[k] * history[k] for k in range(i + 1))
        h = layer_fn(h, layer)
        if cfg.residual == "dlcl":
            history.append(_ln(h, p, f"{layer}.history_norm", cfg.ln_eps))
    if cfg.residual == "dlcl":
        w = p[f"{stack}.output_combine.weight"]
        h = sum(w[k] * history[k] for k in range(n + 1))
    if cfg.residual in ("pre_ln", "dlcl", "normformer", "subln"):
        h = _ln(h, p, f"{stack}.final_norm", cfg.ln_eps)
    if cfg.residual == "r_fixup":
        h = h + p[f"{stack}.final_bias"]
        if stack == "encoder":
            h = h * p[f"{stack}.final_scale"]
    return h


@torch.no_grad()
def reference_logits(params: dict, cfg, src: torch.Tensor, prev: torch.Tensor, alpha_t: float = 1.0) -> torch.Tensor:
    p = {k: v.detach().double() for k, v in params.items()}
    d, heads = cfg.d_model, cfg.n_heads
    table = p["encoder.embed.table.weight"]
    tgt_table = p.get("decoder.embed.table.weight", table)
    key_mask = src.ne(PAD)

    def sub(x, name, stack, layer, block):
        return _sublayer(x, block, p, name, cfg, stack, layer, alpha_t)

    def enc_layer(x, layer):
        x = sub(
            x,
            f"{layer}.self_attn",
            "encoder",
            layer,
            lambda h: _attention(h, h, p, f"{layer}.self_attn.block", heads, key_mask, False, cfg, True),
        )
        return sub(x, f"{layer}.ffn", "encoder", layer, lambda h: _ffn(h, p, f"{layer}.ffn.block", cfg))

    x = table[src] * math.sqrt(d) + _positions(src.shape[1], d)
    memory = _stack(x, p, cfg, "encoder", enc_layer)

    def dec_layer(y, layer):
        y = sub(
            y,
            f"{layer}.self_attn",
            "decoder",
            layer,
            lambda h: _attention(h, h, p, f"{layer}.self_attn.block", heads, None, True, cfg, True),
        )
        y = sub(
            y,
            f"{layer}.cross_attn",
            "decoder",
            layer,
            lambda h: _attention(h, memory, p, f"{layer}.cross_attn.block", heads, key_mask, False, cfg, False),
        )
        return sub(y, f"{layer}.ffn", "decoder", layer, lambda h: _ffn(h, p, f"{layer}.ffn.block", cfg))

    y = tgt_table[prev] * math.sqrt(d) + _positions(prev.shape[1], d)
    y = _stack(y, p, cfg, "decoder", dec_layer)
    out = p.get("decoder.output.weight", tgt_table)
    return y @ out.T


@torch.no_grad()
def admin_omegas(params: dict, cfg, src: torch.Tensor, prev: torch.Tensor) -> dict:
    """Admin's profiling pass (Liu et al. 2020b; the authors' Transformer-Clinic recursion) in float64: per stack,
    in the model's order, omega_i = the running ratio (1 at the start), then ratio = sqrt(Var[omega_i x_i] +
    Var[F_i(x_i)]) over every element. -> {parameter name: omega value}."""
    p = {k: v.detach().double().clone() for k, v in params.items()}
    d, heads = cfg.d_model, cfg.n_heads
    key_mask = src.ne(PAD)
    found = {}

    def run_stack(h, stack, blocks):
        ratio = 1.0
        for i in range(cfg.encoder_layers if stack == "encoder" else cfg.decoder_layers):
            for sub, block in blocks:
                name = f"{stack}.layers.{i}.{sub}"
                found[f"{name}.omega"] = ratio
                f = block(h, f"{name}.block")
                shortcut = ratio * h
                ratio = math.sqrt(float(shortcut.var(unbiased=False)) + float(f.var(unbiased=False)))
                h = _ln(shortcut + f, p, f"{name}.norm", cfg.ln_eps)
        return h

    table = p["encoder.embed.table.weight"]
    x = table[src] * math.sqrt(d) + _positions(src.shape[1], d)
    memory = run_stack(
        x,
        "encoder",
        [
            ("self_attn", lambda h, n: _attention(h, h, p, n, heads, key_mask, False, cfg, True)),
            ("ffn", lambda h, n: _ffn(h, p, n, cfg)),
        ],
    )
    y = p.get("decoder.embed.table.weight", table)[prev] * math.sqrt(d) + _positions(prev.shape[1], d)
    run_stack(
        y,
        "decoder",
        [
            ("self_attn", lambda h, n: _attention(h, h, p, n, heads, None, True, cfg, True)),
            ("cross_attn", lambda h, n: _attention(h, memory, p, n, heads, key_mask, False, cfg, False)),
            ("ffn", lambda h, n: _ffn(h, p, n, cfg)),
        ],
    )
    return found
