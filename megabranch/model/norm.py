"""The plain LayerNorm of the model (Pre-LN's input norms, the final norms, and Post-LN-style blocks when the fused
residual kernel is off): torch's nn.LayerNorm, or NVIDIA apex's FusedLayerNorm when apex happens to be installed.

Both hold `weight` and `bias` of shape (d,) and an `eps`, so state dicts, initialisation by name and the fused
residual kernel (which reads norm.weight / norm.bias / norm.eps) are the same either way; apex itself falls back to
F.layer_norm for CPU tensors. apex is optional and never installed by megabranch (the PyPI package called `apex`
is an unrelated project: it has no apex.normalization and is ignored). MEGABRANCH_NO_APEX=1 forces torch's.
"""

from __future__ import annotations

import functools
import importlib
import os

from torch import nn


@functools.cache
def apex_fused_layer_norm():
    """apex.normalization.FusedLayerNorm when apex and its CUDA extension import, else None."""
    if os.environ.get("MEGABRANCH_NO_APEX", "") not in ("", "0"):
        return None
    try:
        cls = importlib.import_module("apex.normalization").FusedLayerNorm
        importlib.import_module("fused_layer_norm_cuda")  # apex built without its CUDA extensions fails here
    except Exception:  # not installed, the unrelated PyPI "apex", or a broken build: torch's LN
        return None
    return cls


def LayerNorm(d_model: int, eps: float) -> nn.Module:  # a drop-in for nn.LayerNorm
    return (apex_fused_layer_norm() or nn.LayerNorm)(d_model, eps=eps)
