"""Fused operators (C++/CUDA extensions with pure-PyTorch fallbacks).

residual_layernorm.py is the API and the dispatch; residual_ln_loader.py finds or builds the extensions;
residual_ln_op.py holds the custom ops and the autograd.Function; residual_ln_reference.py the maths in PyTorch.
"""

from megabranch.ops.residual_layernorm import (
    backend,
    eager_residual_layernorm,
    fallback_reason,
    residual_layernorm,
)

__all__ = ["residual_layernorm", "eager_residual_layernorm", "backend", "fallback_reason"]
