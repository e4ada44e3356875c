"""Pure-PyTorch version of the fused residual LayerNorm kernels' maths, the Philox dropout mask included.

The custom ops (residual_ln_op.py) run these on devices without an extension; the tests use them as the
reference for the kernels' dropout mask. Statistics are accumulated in float32 (float64 for float64 inputs),
as in the kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Philox4x32-10 constants, as in kernels/residual_ln_common.h
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_PHILOX_SALT = 0x524C4E31
_U32 = 0xFFFFFFFF


def _mul_hi_lo(m: int, c: Tensor) -> tuple[Tensor, Tensor]:
    # Exact 32x32 -> 64-bit product in int64 arithmetic without overflow: split c in 16-bit halves.
    t_lo = c & 0xFFFF
    t_lo = t_lo * m  # < 2^48
    t_hi = (c >> 16) * m  # < 2^48
    low_sum = t_lo + ((t_hi & 0xFFFF) << 16)  # < 2^49
    return (t_hi >> 16) + (low_sum >> 32), low_sum & _U32


def philox_keep_multiplier(seed: int, rows: int, H: int, p: float, device=None) -> Tensor:
    """float32 (rows, H): 0 for dropped elements, 1 / (1 - p) for kept ones, exactly as the
    kernels compute it (kernels/residual_ln_common.h)."""
    seed &= (1 << 64) - 1
    groups = (H + 3) // 4
    row = torch.arange(rows, dtype=torch.int64, device=device).view(-1, 1).expand(rows, groups)
    c0 = torch.arange(groups, dtype=torch.int64, device=device).view(1, -1).expand(rows, groups)
    c1 = row & _U32
    c2 = (row >> 32) & _U32
    c3 = torch.full_like(c0, _PHILOX_SALT)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(_PHILOX_M0, c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _U32, (k1 + _PHILOX_W1) & _U32
    words = torch.stack([c0, c1, c2, c3], dim=-1).reshape(rows, groups * 4)[:, :H]
    if p >= 1.0:
        return torch.zeros(rows, H, device=device)
    threshold = int(p * 4294967296.0) if p > 0.0 else 0
    scale = float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))
    return torch.where(words >= threshold, scale, 0.0).to(torch.float32)


def acc_dtype(dtype) -> torch.dtype:
    """The dtype the kernels accumulate in (and store mean / rstd in) for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _residual(x, f, r, s, seed, p):
    acc = acc_dtype(x.dtype)
    fa = f.to(acc)
    if seed is not None and p > 0.0:
        H = x.shape[-1]
        keep = philox_keep_multiplier(int(seed), x.numel() // H, H, p, x.device)
        fa = fa * keep.to(acc).view(x.shape)
    return r.to(acc) * x.to(acc) + s.to(acc) * fa


def torch_forward(x, f, weight, bias, r, s, seed, eps, p):
    """The kernels' forward: -> (y in x's dtype, per-row mean, per-row rstd)."""
    acc = acc_dtype(x.dtype)
    z = _residual(x, f, r, s, seed, p)
    var, mean = torch.var_mean(z, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (z - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * weight.to(acc) + bias.to(acc)
    return y.to(x.dtype), mean, rstd


def torch_backward(dy, x, f, weight, r, s, seed, mean, rstd, p):
    """The kernels' backward from the saved statistics: -> (dx, df, dweight, dbias)."""
    acc = acc_dtype(x.dtype)
    H = x.shape[-1]
    z = _residual(x, f, r, s, seed, p)
    xhat = (z - mean.to(acc).unsqueeze(-1)) * rstd.to(acc).unsqueeze(-1)
    dya = dy.to(acc)
    g = dya * weight.to(acc)
    dz = rstd.to(acc).unsqueeze(-1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    ds = dz
    if seed is not None and p > 0.0:
        keep = philox_keep_multiplier(int(seed), x.numel() // H, H, p, x.device)
        ds = dz * keep.to(acc).view(x.shape)
    dx = (r.to(acc) * dz).to(x.dtype)
    df = (s.to(acc) * ds).to(x.dtype)
    dgamma = (dya * xhat).reshape(-1, H).sum(0).to(weight.dtype)
    dbeta = dya.reshape(-1, H).sum(0).to(weight.dtype)
    return dx, df, dgamma, dbeta
