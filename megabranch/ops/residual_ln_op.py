"""The fused residual LayerNorm as torch operators: the custom ops for torch.compile and an autograd.Function.

Under torch.compile the fused path is the pair of torch custom ops ``megabranch::residual_layernorm_fwd`` /
``_bwd`` (with fake/meta implementations and an autograd formula); on a device without a loaded extension they
run the pure-PyTorch maths of residual_ln_reference.py. Eager calls reach the same kernels through a plain
autograd.Function (:class:`EagerFused`), because the custom op's Python dispatch costs more than the kernels
themselves at small widths (docs/benchmarks.md).

Saved for backward: x, f, weight, r, s, the seed, and the per-row mean and rstd (float32; float64 for float64
inputs). The normalised input is recomputed from x and f; the dropout mask is regenerated from the seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import residual_ln_loader as loader
from .residual_ln_reference import acc_dtype, torch_backward, torch_forward


def scalar_tensor(v, x: Tensor) -> Tensor:
    """`v` (a float or a tensor) as the 0-dim float32 tensor on x's device that the kernels read r and s from."""
    if isinstance(v, Tensor):
        if v.dtype != torch.float32 or v.device != x.device:
            v = v.to(device=x.device, dtype=torch.float32)
        return v.detach().reshape(())
    return torch.tensor(float(v), dtype=torch.float32, device=x.device)


@torch.library.custom_op("megabranch::residual_layernorm_fwd", mutates_args=())
def _fwd_op(
    x: Tensor,
    f: Tensor,
    weight: Tensor,
    bias: Tensor,
    r: Tensor,
    s: Tensor,
    seed: Tensor | None,
    eps: float,
    p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    ext = loader.loaded(x.device.type)
    if ext is None:
        return torch_forward(x, f, weight, bias, r, s, seed, eps, p)
    y, mean, rstd = ext.forward(x, f, weight, bias, r, s, seed, eps, p)
    return y, mean, rstd


@_fwd_op.register_fake
def _fwd_fake(x, f, weight, bias, r, s, seed, eps, p):
    acc = acc_dtype(x.dtype)
    stats = x.shape[:-1]
    return x.new_empty(x.shape), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)


@torch.library.custom_op("megabranch::residual_layernorm_bwd", mutates_args=())
def _bwd_op(
    dy: Tensor,
    x: Tensor,
    f: Tensor,
    weight: Tensor,
    r: Tensor,
    s: Tensor,
    seed: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ext = loader.loaded(x.device.type)
    if ext is None:
        return torch_backward(dy, x, f, weight, r, s, seed, mean, rstd, p)
    dx, df, dgamma, dbeta = ext.backward(dy, x, f, weight, r, s, seed, mean, rstd, p)
    return dx, df, dgamma, dbeta


@_bwd_op.register_fake
def _bwd_fake(dy, x, f, weight, r, s, seed, mean, rstd, p):
    return (x.new_empty(x.shape), x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape))


def _setup_context(ctx, inputs, output):
    x, f, weight, _bias, r, s, seed, _eps, p = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, f, weight, r, s, seed, mean, rstd)
    ctx.p = p


def _backward(ctx, dy, _dmean, _drstd):
    x, f, weight, r, s, seed, mean, rstd = ctx.saved_tensors
    dx, df, dgamma, dbeta = torch.ops.megabranch.residual_layernorm_bwd(
        dy.contiguous(), x, f, weight, r, s, seed, mean, rstd, ctx.p
    )
    return dx, df, dgamma, dbeta, None, None, None, None, None


torch.library.register_autograd("megabranch::residual_layernorm_fwd", _backward, setup_context=_setup_context)


class EagerFused(torch.autograd.Function):
    """The extension kernels called directly (eager mode only; same maths as the custom ops). Arguments as
    for the custom op: contiguous x, f, weight, bias; 0-dim float32 r, s; seed tensor or None; eps; p."""

    @staticmethod
    def forward(ctx, x, f, weight, bias, r, s, seed, eps, p):
        y, mean, rstd = loader.loaded(x.device.type).forward(x, f, weight, bias, r, s, seed, eps, p)
        ctx.save_for_backward(x, f, weight, r, s, seed, mean, rstd)
        ctx.p = p
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, f, weight, r, s, seed, mean, rstd = ctx.saved_tensors
        dx, df, dgamma, dbeta = loader.loaded(x.device.type).backward(
            dy.contiguous(), x, f, weight, r, s, seed, mean, rstd, ctx.p
        )
        return dx, df, dgamma, dbeta, None, None, None, None, None


def residual_layernorm_with_seed(
    x, f, weight, bias, r, s, seed: Tensor | None, eps: float = 1e-5, p: float = 0.0, via: str = "op"
) -> Tensor:
    """The fused op with an explicit int64 seed tensor (deterministic dropout, gradcheck), through the custom
    op (`via="op"`, what torch.compile traces) or the eager autograd.Function (`via="function"`, which needs
    the extension loaded for x's device)."""
    args = (
        x.contiguous(),
        f.contiguous(),
        weight,
        bias,
        scalar_tensor(r, x),
        scalar_tensor(s, x),
        seed,
        float(eps),
        float(p),
    )
    if via == "function":
        return EagerFused.apply(*args)
    return torch.ops.megabranch.residual_layernorm_fwd(*args)[0]
