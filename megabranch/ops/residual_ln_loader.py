"""Finding the fused residual LayerNorm extensions: a prebuilt module or a JIT build, once per device type.

The extensions are loaded lazily on first use: a prebuilt module installed by setup.py
(``megabranch._C_residual_ln_cpu`` / ``megabranch._C_residual_ln_cuda``) if present and built from the current
sources, otherwise a JIT build of the sources in the top-level ``kernels/`` folder with
torch.utils.cpp_extension.load (cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions;
``MEGABRANCH_NO_JIT=1`` forbids the JIT build, ``MEGABRANCH_EXT_VERBOSE=1`` shows the compiler's output).
``MEGABRANCH_NO_EXT=1`` disables the extensions altogether.

A device type whose extension cannot be imported or built gets one RuntimeWarning of one line (why, with the
first compiler error of a failed build) and the eager path from then on; a deliberate opt-out does not warn.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

_OPS_DIR = Path(__file__).resolve().parent  # .../megabranch/ops
_KERNELS_DIR = _OPS_DIR.parents[1] / "kernels"  # repo layout: megabranch/ and kernels/ are siblings
_ABI_VERSION = 1  # must equal RLN_ABI_VERSION in kernels/residual_ln_common.h

_exts: dict[str, object] = {}  # device type -> loaded extension module
_available: dict[str, bool] = {}  # device type -> whether _exts holds a module for it
_reasons: dict[str, str] = {}  # device type -> why the eager path is used
_cuda_max_hidden: dict[torch.dtype, int] = {}  # largest H the CUDA kernels take, per dtype
_warned: set[str] = set()
_lock = threading.Lock()


def is_available(device_type: str) -> bool:
    """Whether the extension for `device_type` is in use; loads (or JIT-builds) it on the first call."""
    if device_type in _available:
        return _available[device_type]
    # never traced: loading or building cannot be part of a graph. Wrapped here, not by a decorator at import
    # time, because torch.compiler.disable imports Dynamo (about a second of every process's start-up)
    return torch.compiler.disable(_load)(device_type)


def loaded(device_type: str):
    """The extension module already loaded for `device_type`, or None (never loads)."""
    return _exts.get(device_type)


def reason(device_type: str) -> str | None:
    """Why the extension for `device_type` is not in use, once loading was tried (None otherwise)."""
    return _reasons.get(device_type)


def cuda_max_hidden(dtype: torch.dtype) -> int:
    """The largest hidden size the loaded CUDA kernels take for `dtype` (0 before they are loaded)."""
    return _cuda_max_hidden.get(dtype, 0)


def reset() -> None:
    """Forget loaded extensions, reasons and warnings, so the next use loads again (for tests)."""
    with _lock:
        _exts.clear()
        _available.clear()
        _reasons.clear()
        _warned.clear()
        _cuda_max_hidden.clear()


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`exc` as one line: its type and first line, plus the first compiler error of a failed build."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    compiler_errors = [ln for ln in lines[1:] if "error:" in ln.lower()]
    if compiler_errors:  # a failed build: name the first compiler error too
        line = f"{line} {compiler_errors[0]}"
    msg = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _load(device_type: str) -> bool:
    with _lock:
        if device_type in _available:
            return _available[device_type]
        module, why = None, None
        if device_type not in ("cpu", "cuda"):
            why = f"no extension for device type {device_type!r}"
        elif os.environ.get("MEGABRANCH_NO_EXT", "") not in ("", "0"):
            why = "disabled by MEGABRANCH_NO_EXT"
        else:
            try:
                module = build_or_import(device_type)
            except Exception as exc:  # any failure means: use the eager path
                why = one_line(exc)
                if device_type not in _warned:
                    _warned.add(device_type)
                    warnings.warn(
                        f"megabranch: fused residual LayerNorm {device_type} extension unavailable "
                        f"({why}); using the eager PyTorch composition",
                        RuntimeWarning,
                        stacklevel=_user_stacklevel(),
                    )
        if module is not None:
            _exts[device_type] = module
            if device_type == "cuda":
                codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
                _cuda_max_hidden.update({dt: module.max_hidden(c) for dt, c in codes.items()})
        else:
            _reasons[device_type] = why
        _available[device_type] = module is not None
        return module is not None


def _user_stacklevel() -> int:
    """warnings.warn stacklevel of the first caller outside megabranch/ops and torch (the call that
    triggered loading), counted from the function calling this helper."""
    skip = (str(_OPS_DIR) + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_back is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(skip):
            break
        frame, level = frame.f_back, level + 1
    return level


def _load_build_helpers():
    path = _KERNELS_DIR / "build.py"
    if not path.is_file():
        raise FileNotFoundError(
            "no prebuilt extension installed and no kernels/ sources next to the megabranch package to JIT-build one"
        )
    name = "megabranch_kernels_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_or_import(device_type: str):
    """The extension module for `device_type`: the prebuilt one, else a JIT build; raises why neither works."""
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
        elif getattr(module, "source_hash", lambda: -1)() == _load_build_helpers().source_hash(device_type):
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
        helpers.point_torch_at_cuda_home(cpp_extension)
        kwargs = helpers.jit_cuda_kwargs()
    verbose = os.environ.get("MEGABRANCH_EXT_VERBOSE", "") not in ("", "0")
    module = cpp_extension.load(verbose=verbose, **kwargs)
    if module.abi_version() != _ABI_VERSION:
        raise RuntimeError(f"JIT-built extension has ABI {module.abi_version()}, expected {_ABI_VERSION}")
    return module
