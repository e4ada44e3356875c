"""Residual schemes, DeepNorm constants and BranchNorm alpha schedules.

Every attention and FFN sub-layer computes

    y = LN(r * x + s * dropout(F(x)))      post_ln: (1, 1)   deepnorm: (alpha, 1)   branchnorm: (1, alpha_t)

except pre_ln, which computes x + dropout(F(LN(x))) and ends each stack with a final LN.

The step-dependent alpha_t lives in exactly one place per process: the 0-dim `s` buffer of each stack's
`ResidualCoefficients`, updated in place by `set_step`. Modules read the tensor, never a Python float, so a
compiled graph, a CUDA graph or a later pipeline stage sees the new value without recompiling.
"""

from __future__ import annotations

import math

import torch
from torch import nn


# --- DeepNet (arXiv 2203.00555) constants -------------------------------------------------------------------

def deepnorm_constants(encoder_layers: int, decoder_layers: int) -> dict[str, tuple[float, float]]:
    """(alpha, beta) per stack. Pass 0 layers for the missing stack of an encoder-only / decoder-only model."""
    n, m = encoder_layers, decoder_layers
    if n > 0 and m > 0:
        return {
            "encoder": (0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)),
            "decoder": ((3 * m) ** (1 / 4), (12 * m) ** (-1 / 4)),
        }
    if n > 0:
        return {"encoder": ((2 * n) ** (1 / 4), (8 * n) ** (-1 / 4))}
    if m > 0:
        return {"decoder": ((2 * m) ** (1 / 4), (8 * m) ** (-1 / 4))}
    raise ValueError("a model needs at least one layer")


# --- BranchNorm (arXiv 2305.02790) alpha schedules -----------------------------------------------------------
# All map u = t / T in [0, 1] onto [0, 1] with f(0) = 0 and f(1) = 1, and are 1 for t >= T.

_EXP_K = 5.0  # exp: 1 - e^{-k u} normalised; rises fast, then flattens
_SIG_K = 10.0  # sigmoid: logistic centred at u = 0.5, normalised to hit 0 and 1 exactly


def alpha_at(step: int, warmup: int, schedule: str = "linear") -> float:
    """BranchNorm's alpha_t for the global optimizer step t (0-based: the step about to be taken)."""
    if warmup <= 0 or step >= warmup:
        return 1.0
    u = max(step, 0) / warmup
    if schedule == "linear":
        return u
    if schedule == "exp":
        return (1.0 - math.exp(-_EXP_K * u)) / (1.0 - math.exp(-_EXP_K))
    if schedule == "sigmoid":
        sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
        lo, hi = sig(-_SIG_K / 2), sig(_SIG_K / 2)
        return (sig(_SIG_K * (u - 0.5)) - lo) / (hi - lo)
    raise ValueError(f"unknown alpha schedule {schedule!r}")


class ResidualCoefficients(nn.Module):
    """The (r, s) pair shared by every sub-layer of one stack, as 0-dim buffers.

    Buffers are non-persistent: they are derived from the global step (which the checkpoint stores), so a
    state dict never carries a stale alpha.
    """

    def __init__(self, residual: str, deepnorm_alpha: float = 1.0, schedule: str = "linear", warmup: int = 4000):
        super().__init__()
        self.residual, self.schedule, self.warmup = residual, schedule, warmup
        self.r_value = deepnorm_alpha if residual == "deepnorm" else 1.0
        self.register_buffer("r", torch.tensor(self.r_value, dtype=torch.float32), persistent=False)
        self.register_buffer("s", torch.tensor(1.0, dtype=torch.float32), persistent=False)
        self.step = 0
        self.set_step(0)

    @classmethod
    def for_stack(cls, cfg, stack: str) -> "ResidualCoefficients":
        """The coefficients of the "encoder" or "decoder" stack of the model `cfg` (a ModelConfig) describes."""
        alpha = deepnorm_constants(cfg.encoder_layers, cfg.decoder_layers)[stack][0]
        return cls(cfg.residual, alpha, cfg.alpha_schedule, cfg.alpha_warmup_steps)

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        self.step = step
        if self.residual == "branchnorm":
            self.s.fill_(alpha_at(step, self.warmup, self.schedule))

    @torch.no_grad()
    def reset(self) -> None:
        """Refill both buffers (after a meta-device build has been given real storage)."""
        self.r.fill_(self.r_value)
        self.s.fill_(1.0)
        self.set_step(self.step)

    def extra_repr(self) -> str:
        return f"residual={self.residual}, r={float(self.r):.4g}, s={float(self.s):.4g}"


def set_step(model: nn.Module, step: int) -> None:
    """Point every stack of `model` (or of a pipeline stage) at global step `step`."""
    for m in model.modules():
        if isinstance(m, ResidualCoefficients):
            m.set_step(step)


def current_alpha(model: nn.Module) -> float:
    """The BranchNorm alpha the model is using now (1.0 for schemes without one); for logging only."""
    for m in model.modules():
        if isinstance(m, ResidualCoefficients) and m.residual == "branchnorm":
            return float(m.s)
    return 1.0
