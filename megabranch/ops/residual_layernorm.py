"""Fused residual-scale LayerNorm (issue 4).

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

The extensions are loaded lazily on first use: a prebuilt module installed by setup.py
(``megabranch._C_residual_ln_cpu`` / ``megabranch._C_residual_ln_cuda``) if present, otherwise a
JIT build of the sources in the top-level ``kernels/`` folder with torch.utils.cpp_extension.load
(cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions; ``MEGABRANCH_NO_JIT=1``
forbids the JIT build, ``MEGABRANCH_EXT_VERBOSE=1`` shows the compiler's output).

Under torch.compile the fused path is the pair of torch custom ops
``megabranch::residual_layernorm_fwd`` / ``_bwd`` (with fake/meta implementations and an autograd
formula); eager calls reach the same kernels through a plain autograd.Function, because the custom
op's Python dispatch costs more than the kernels themselves at small widths (docs/benchmarks.md).
``r`` and ``s`` are passed to the kernels as 0-dim float32 tensors and read on the device, so
changing them (e.g. a scheduled alpha) needs no recompile, no host sync and no CUDA graph
re-capture.  Python floats are accepted too, but then torch.compile specialises on their value.

Dropout (``training=True`` and ``dropout_p > 0``): a 64-bit seed is drawn with
``torch.randint`` from the default generator of x's device, so results follow torch.manual_seed
and checkpointed RNG states.  The keep mask is a counter-based Philox4x32-10 function of
(seed, row, column) (see kernels/residual_ln_common.h); the backward pass regenerates it from the
saved seed, no mask is stored.  The CPU and CUDA kernels give the same mask for the same seed.
The eager fallback uses F.dropout instead (a different, equally valid mask).

Saved for backward: x, f, weight, r, s, the seed, and the per-row mean and rstd (float32; float64
for float64 inputs).  The normalised input is recomputed from x and f.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["residual_layernorm", "eager_residual_layernorm", "backend", "fallback_reason"]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../megabranch
_KERNELS_DIR = _PACKAGE_DIR.parent / "kernels"  # repo layout: megabranch/ and kernels/ are siblings
_ABI_VERSION = 1  # must equal RLN_ABI_VERSION in kernels/residual_ln_common.h
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_exts: dict[str, object] = {}  # device type -> loaded extension module
_available: dict[str, bool] = {}  # device type -> whether _exts holds a module for it
_reasons: dict[str, str] = {}  # device type -> why the eager path is used
_cuda_max_hidden: dict[torch.dtype, int] = {}  # largest H the CUDA kernels take, per dtype
_warned: set[str] = set()
_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def eager_residual_layernorm(x: Tensor, f: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                             r, s, eps: float = 1e-5, dropout_p: float = 0.0,
                             training: bool = False) -> Tensor:
    """The plain PyTorch composition ``F.layer_norm(r * x + s * F.dropout(f))``: the fallback and
    the reference the fused kernels are tested against."""
    z = r * x + s * F.dropout(f, p=dropout_p, training=training)
    return F.layer_norm(z, (x.shape[-1],), weight, bias, eps)


def residual_layernorm(x: Tensor, f: Tensor, weight: Tensor, bias: Tensor, r, s,
                       eps: float = 1e-5, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """``LayerNorm(r * x + s * dropout(f))`` with affine ``weight``/``bias``, fused.

    x, f: same shape (..., H), float32, bfloat16 or float16 (float64 for checks; mixed dtypes
    are promoted like r * x + s * f would be; the op does not take part in autocast);
    weight, bias: shape (H,) (cast to x's dtype; gradients flow back in their own dtype);
    r, s: 0-dim float32 tensors on x's device (floats accepted); statistics in float32.
    Differentiable w.r.t. x, f, weight and bias.
    """
    if (isinstance(x, Tensor) and isinstance(f, Tensor) and x.dtype != f.dtype
            and x.dtype in _FUSED_DTYPES and f.dtype in _FUSED_DTYPES):
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
    args = (x.contiguous(), f.contiguous(), weight.contiguous(), bias.contiguous(),
            _scalar_tensor(r, x), _scalar_tensor(s, x), seed, float(eps), p)
    if torch.compiler.is_compiling():  # the custom op: traceable, with fake implementations
        return torch.ops.megabranch.residual_layernorm_fwd(*args)[0]
    # Eager: the same kernels behind a plain autograd.Function. The custom op's Python dispatch costs
    # about 100 us per forward+backward, more than the kernels themselves at d_model 64-512 x 1k rows.
    return _EagerFused.apply(*args)


def backend(device=None) -> str:
    """The implementation used for tensors on `device` (default: "cuda" when available, else
    "cpu"): "cpu-ext", "cuda-ext" or "eager".  Loads (or JIT-builds) the extension if needed."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    return f"{dev_type}-ext" if _ext_available(dev_type) else "eager"


def fallback_reason(device=None) -> Optional[str]:
    """Why `backend(device)` is "eager" (None when an extension is in use)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    if _ext_available(dev_type):
        return None
    return _reasons.get(dev_type, f"no extension for device type {dev_type!r}")


# --------------------------------------------------------------------------------------------
# Dispatch helpers
# --------------------------------------------------------------------------------------------


def _fused_applies(x, f, weight, bias) -> bool:
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
    if not _ext_available(x.device.type):
        return False
    if x.device.type == "cuda" and x.shape[-1] > _cuda_max_hidden.get(x.dtype, 0):
        return False
    return True


def _scalar_tensor(v, x: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        if v.dtype != torch.float32 or v.device != x.device:
            v = v.to(device=x.device, dtype=torch.float32)
        return v.detach().reshape(())
    return torch.tensor(float(v), dtype=torch.float32, device=x.device)


def _ext_available(device_type: str) -> bool:
    if device_type in _available:
        return _available[device_type]
    return _load(device_type)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    compiler_errors = [ln for ln in lines[1:] if "error:" in ln.lower()]
    if compiler_errors:  # a failed build: name the first compiler error too
        line = f"{line} {compiler_errors[0]}"
    msg = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


@torch.compiler.disable
def _load(device_type: str) -> bool:
    with _lock:
        if device_type in _available:
            return _available[device_type]
        module, reason = None, None
        if device_type not in ("cpu", "cuda"):
            reason = f"no extension for device type {device_type!r}"
        elif os.environ.get("MEGABRANCH_NO_EXT", "") not in ("", "0"):
            reason = "disabled by MEGABRANCH_NO_EXT"
        else:
            try:
                module = _build_or_import(device_type)
            except Exception as exc:  # noqa: BLE001 - any failure means: use the eager path
                reason = _one_line(exc)
                if device_type not in _warned:
                    _warned.add(device_type)
                    warnings.warn(
                        f"megabranch: fused residual LayerNorm {device_type} extension unavailable "
                        f"({reason}); using the eager PyTorch composition", RuntimeWarning,
                        stacklevel=_user_stacklevel())
        if module is not None:
            _exts[device_type] = module
            if device_type == "cuda":
                codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
                _cuda_max_hidden.update({dt: module.max_hidden(c) for dt, c in codes.items()})
        else:
            _reasons[device_type] = reason
        _available[device_type] = module is not None
        return module is not None


def _user_stacklevel() -> int:
    """warnings.warn stacklevel of the first caller outside this module and torch (the call
    that triggered loading), counted from the function calling this helper."""
    skip = (os.path.abspath(__file__), os.path.dirname(os.path.abspath(torch.__file__)))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_back is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name != skip[0] and not name.startswith(skip[1] + os.sep):
            break
        frame, level = frame.f_back, level + 1
    return level


def _load_build_helpers():
    path = _KERNELS_DIR / "build.py"
    if not path.is_file():
        raise FileNotFoundError("no prebuilt extension installed and no kernels/ sources next to "
                                "the megabranch package to JIT-build one")
    name = "megabranch_kernels_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _build_or_import(device_type: str):
    """The extension module for `device_type`: the prebuilt one, else a JIT build."""
    prebuilt = f"megabranch._C_residual_ln_{device_type}"
    try:
        module = importlib.import_module(prebuilt)
    except ImportError as exc:
        prebuilt_error = f"{prebuilt} not importable ({exc})"
    else:
        if getattr(module, "abi_version", lambda: -1)() != _ABI_VERSION:
            prebuilt_error = f"{prebuilt} has another ABI version"
        elif not (_KERNELS_DIR / "build.py").is_file():
            return module  # an installed package: the prebuilt module is all there is
        elif getattr(module, "source_hash", lambda: -1)() == _load_build_helpers().source_hash(
                device_type):
            return module
        else:
            prebuilt_error = f"{prebuilt} is older than the sources in kernels/"
    if os.environ.get("MEGABRANCH_NO_JIT", "") not in ("", "0"):
        raise RuntimeError(f"{prebuilt_error} and MEGABRANCH_NO_JIT forbids a JIT build")
    helpers = _load_build_helpers()
    from torch.utils import cpp_extension

    if helpers.find_cxx() is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    if device_type == "cpu":
        kwargs = helpers.jit_cpu_kwargs()
    else:
        if not torch.version.cuda:
            raise RuntimeError("this torch build has no CUDA support")
        if helpers.find_nvcc() is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME)")
        helpers._point_torch_at_cuda_home(cpp_extension)
        kwargs = helpers.jit_cuda_kwargs()
    verbose = os.environ.get("MEGABRANCH_EXT_VERBOSE", "") not in ("", "0")
    module = cpp_extension.load(verbose=verbose, **kwargs)
    if module.abi_version() != _ABI_VERSION:
        raise RuntimeError(f"JIT-built extension has ABI {module.abi_version()}, "
                           f"expected {_ABI_VERSION}")
    return module


def _reset_for_tests() -> None:
    """Forget loaded extensions, reasons and warnings (tests only)."""
    with _lock:
        _exts.clear()
        _available.clear()
        _reasons.clear()
        _warned.clear()
        _cuda_max_hidden.clear()


# --------------------------------------------------------------------------------------------
# Pure-PyTorch version of the kernels' math, including the Philox dropout mask.  Used by the
# custom ops on devices without an extension, and by the tests as the dropout reference.
# --------------------------------------------------------------------------------------------

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


def _philox_keep_multiplier(seed: int, rows: int, H: int, p: float, device=None) -> Tensor:
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


def _acc_dtype(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_residual(x, f, r, s, seed, p):
    acc = _acc_dtype(x.dtype)
    fa = f.to(acc)
    if seed is not None and p > 0.0:
        H = x.shape[-1]
        keep = _philox_keep_multiplier(int(seed), x.numel() // H, H, p, x.device)
        fa = fa * keep.to(acc).view(x.shape)
    return r.to(acc) * x.to(acc) + s.to(acc) * fa


def _torch_forward(x, f, weight, bias, r, s, seed, eps, p):
    acc = _acc_dtype(x.dtype)
    z = _torch_residual(x, f, r, s, seed, p)
    var, mean = torch.var_mean(z, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (z - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * weight.to(acc) + bias.to(acc)
    return y.to(x.dtype), mean, rstd


def _torch_backward(dy, x, f, weight, r, s, seed, mean, rstd, p):
    acc = _acc_dtype(x.dtype)
    H = x.shape[-1]
    z = _torch_residual(x, f, r, s, seed, p)
    xhat = (z - mean.to(acc).unsqueeze(-1)) * rstd.to(acc).unsqueeze(-1)
    dya = dy.to(acc)
    g = dya * weight.to(acc)
    dz = rstd.to(acc).unsqueeze(-1) * (g - g.mean(-1, keepdim=True)
                                       - xhat * (g * xhat).mean(-1, keepdim=True))
    ds = dz
    if seed is not None and p > 0.0:
        keep = _philox_keep_multiplier(int(seed), x.numel() // H, H, p, x.device)
        ds = dz * keep.to(acc).view(x.shape)
    dx = (r.to(acc) * dz).to(x.dtype)
    df = (s.to(acc) * ds).to(x.dtype)
    dgamma = (dya * xhat).reshape(-1, H).sum(0).to(weight.dtype)
    dbeta = dya.reshape(-1, H).sum(0).to(weight.dtype)
    return dx, df, dgamma, dbeta


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("megabranch::residual_layernorm_fwd", mutates_args=())
def _fwd_op(x: Tensor, f: Tensor, weight: Tensor, bias: Tensor, r: Tensor, s: Tensor,
            seed: Optional[Tensor], eps: float, p: float) -> tuple[Tensor, Tensor, Tensor]:
    ext = _exts.get(x.device.type)
    if ext is None:
        return _torch_forward(x, f, weight, bias, r, s, seed, eps, p)
    y, mean, rstd = ext.forward(x, f, weight, bias, r, s, seed, eps, p)
    return y, mean, rstd


@_fwd_op.register_fake
def _fwd_fake(x, f, weight, bias, r, s, seed, eps, p):
    acc = _acc_dtype(x.dtype)
    stats = x.shape[:-1]
    return x.new_empty(x.shape), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)


@torch.library.custom_op("megabranch::residual_layernorm_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, f: Tensor, weight: Tensor, r: Tensor, s: Tensor,
            seed: Optional[Tensor], mean: Tensor, rstd: Tensor,
            p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ext = _exts.get(x.device.type)
    if ext is None:
        return _torch_backward(dy, x, f, weight, r, s, seed, mean, rstd, p)
    dx, df, dgamma, dbeta = ext.backward(dy, x, f, weight, r, s, seed, mean, rstd, p)
    return dx, df, dgamma, dbeta


@_bwd_op.register_fake
def _bwd_fake(dy, x, f, weight, r, s, seed, mean, rstd, p):
    return (x.new_empty(x.shape), x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape))


def _setup_context(ctx, inputs, output):
    x, f, weight, _bias, r, s, seed, _eps, p = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, f, weight, r, s, seed, mean, rstd)
    ctx.p = p


def _backward(ctx, dy, _dmean, _drstd):
    x, f, weight, r, s, seed, mean, rstd = ctx.saved_tensors
    dx, df, dgamma, dbeta = torch.ops.megabranch.residual_layernorm_bwd(
        dy.contiguous(), x, f, weight, r, s, seed, mean, rstd, ctx.p)
    return dx, df, dgamma, dbeta, None, None, None, None, None


torch.library.register_autograd("megabranch::residual_layernorm_fwd", _backward,
                                setup_context=_setup_context)


class _EagerFused(torch.autograd.Function):
    """The extension kernels called directly (eager mode only; same math as the custom ops)."""

    @staticmethod
    def forward(ctx, x, f, weight, bias, r, s, seed, eps, p):
        y, mean, rstd = _exts[x.device.type].forward(x, f, weight, bias, r, s, seed, eps, p)
        ctx.save_for_backward(x, f, weight, r, s, seed, mean, rstd)
        ctx.p = p
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, f, weight, r, s, seed, mean, rstd = ctx.saved_tensors
        dx, df, dgamma, dbeta = _exts[x.device.type].backward(dy.contiguous(), x, f, weight, r, s, seed, mean,
                                                              rstd, ctx.p)
        return dx, df, dgamma, dbeta, None, None, None, None, None


def _residual_layernorm_with_seed(x, f, weight, bias, r, s, seed: Optional[Tensor],
                                  eps: float = 1e-5, p: float = 0.0, via: str = "op") -> Tensor:
    """The fused op with an explicit seed tensor (tests: deterministic dropout, gradcheck), through the
    custom op (`via="op"`, what torch.compile traces) or the eager autograd.Function (`via="function"`)."""
    args = (x.contiguous(), f.contiguous(), weight, bias, _scalar_tensor(r, x), _scalar_tensor(s, x), seed,
            float(eps), float(p))
    if via == "function":
        return _EagerFused.apply(*args)
    return torch.ops.megabranch.residual_layernorm_fwd(*args)[0]
