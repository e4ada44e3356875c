"""Fused residual-scale LayerNorm (issue 4): the public API and the choice of implementation.

    y = LayerNorm(r * x + s * dropout(f)) * weight + bias        (over the last dimension H)

This is the residual update of Post-LN / DeepNorm / BranchNorm blocks: x is the residual stream,
f the branch output, r the residual scale (DeepNorm's alpha) and s the branch scale.

Implementations, picked per device of ``x``:

* ``"cpu-ext"``: kernels/residual_ln_cpu.cpp, for CPU tensors;
* ``"cuda-ext"``: kernels/residual_ln_cuda.cu, for CUDA tensors;
* ``"eager"``: :func:`eager_residual_layernorm`, the plain PyTorch composition, used when the
  extension for that device can't be imported or built (one warning says why), for devices
  without an extension, for inputs the kernels don't take (different shapes or dtypes of x and f,
  a missing weight/bias, H above the CUDA kernels' limit), and when ``MEGABRANCH_NO_EXT=1``.

The pieces: residual_ln_loader.py finds or JIT-builds the extensions (lazily, on first use);
residual_ln_op.py registers the custom ops (what torch.compile traces) and the eager autograd.Function
over the same kernels; residual_ln_reference.py is the kernels' maths in plain PyTorch, Philox mask included.
``r`` and ``s`` are passed to the kernels as 0-dim float32 tensors and read on the device, so
changing them (e.g. a scheduled alpha) needs no recompile, no host sync and no CUDA graph
re-capture.  Python floats are accepted too, but then torch.compile specialises on their value.

Dropout (``training=True`` and ``dropout_p > 0``): a 64-bit seed is drawn with
``torch.randint`` from the default generator of x's device, so results follow torch.manual_seed
and checkpointed RNG states.  The keep mask is a counter-based Philox4x32-10 function of
(seed, row, column) (see kernels/residual_ln_common.h); the backward pass regenerates it from the
saved seed, no mask is stored.  The CPU and CUDA kernels give the same mask for the same seed.
The eager fallback uses F.dropout instead (a different, equally valid mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import residual_ln_loader as loader
from .residual_ln_op import EagerFused, scalar_tensor

__all__ = ["residual_layernorm", "eager_residual_layernorm", "backend", "fallback_reason"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def eager_residual_layernorm(
    x: Tensor,
    f: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    r,
    s,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """The plain PyTorch composition ``F.layer_norm(r * x + s * F.dropout(f))``: the fallback and
    the reference the fused kernels are tested against."""
    z = r * x + s * F.dropout(f, p=dropout_p, training=training)
    return F.layer_norm(z, (x.shape[-1],), weight, bias, eps)


def residual_layernorm(
    x: Tensor,
    f: Tensor,
    weight: Tensor,
    bias: Tensor,
    r,
    s,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``LayerNorm(r * x + s * dropout(f))`` with affine ``weight``/``bias``, fused.

    x, f: same shape (..., H), float32, bfloat16 or float16 (float64 for checks; mixed dtypes
    are promoted like r * x + s * f would be; the op does not take part in autocast);
    weight, bias: shape (H,) (cast to x's dtype; gradients flow back in their own dtype);
    r, s: 0-dim float32 tensors on x's device (floats accepted); statistics in float32.
    Differentiable w.r.t. x, f, weight and bias.
    """
    if (
        isinstance(x, Tensor)
        and isinstance(f, Tensor)
        and x.dtype != f.dtype
        and x.dtype in _FUSED_DTYPES
        and f.dtype in _FUSED_DTYPES
    ):
        # e.g. an fp32 residual stream and a bf16 branch output: compute in the promoted dtype,
        # as r * x + s * f would.
        common = torch.promote_types(x.dtype, f.dtype)
        x, f = x.to(common), f.to(common)
    if not _fused_applies(x, f, weight, bias):
        return eager_residual_layernorm(x, f, weight, bias, r, s, eps, dropout_p, training)
    p = float(dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    seed = None
    if training and p > 0.0:
        seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=x.device)
    else:
        p = 0.0
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    args = (
        x.contiguous(),
        f.contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        scalar_tensor(r, x),
        scalar_tensor(s, x),
        seed,
        float(eps),
        p,
    )
    if torch.compiler.is_compiling() or type(x) is not Tensor:
        # the custom op: traceable, with fake implementations; also what a tensor without plain storage takes
        # (the fake tensors of megabranch-train --rehearse): it dispatches to that tensor's implementation
        return torch.ops.megabranch.residual_layernorm_fwd(*args)[0]
    # Eager: the same kernels behind a plain autograd.Function. The custom op's Python dispatch costs
    # about 100 us per forward+backward, more than the kernels themselves at d_model 64-512 x 1k rows.
    return EagerFused.apply(*args)


def backend(device=None) -> str:
    """The implementation used for tensors on `device` (default: "cuda" when available, else
    "cpu"): "cpu-ext", "cuda-ext" or "eager".  Loads (or JIT-builds) the extension if needed."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    return f"{dev_type}-ext" if loader.is_available(dev_type) else "eager"


def fallback_reason(device=None) -> str | None:
    """Why `backend(device)` is "eager" (None when an extension is in use)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    if loader.is_available(dev_type):
        return None
    return loader.reason(dev_type) or f"no extension for device type {dev_type!r}"


def _fused_applies(x, f, weight, bias) -> bool:
    """Whether the kernels take these inputs (else the eager composition runs)."""
    if not (isinstance(x, Tensor) and isinstance(f, Tensor)):
        return False
    if weight is None or bias is None or x.dim() == 0 or x.shape[-1] == 0:
        return False
    if x.shape != f.shape or x.dtype != f.dtype or x.dtype not in _FUSED_DTYPES:
        return False
    if f.device != x.device or weight.device != x.device or bias.device != x.device:
        return False
    if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        return False
    if not loader.is_available(x.device.type):
        return False
    if x.device.type == "cuda" and x.shape[-1] > loader.cuda_max_hidden(x.dtype):
        return False
    return True
