"""Fused operators (C++/CUDA extensions with pure-PyTorch fallbacks)."""

from megabranch.ops.residual_layernorm import (
    backend,
    eager_residual_layernorm,
    fallback_reason,
    residual_layernorm,
)

__all__ = ["residual_layernorm", "eager_residual_layernorm", "backend", "fallback_reason"]
