"""The residual schemes (what each sub-layer computes around its block F, and each scheme's initialisation
constants), DeepNorm's constants and BranchNorm's alpha schedules.

Every attention and FFN sub-layer has one of three shapes (`Scheme.shape`):

    post   y = LN(r * x + s * dropout(F(x)))   post_ln (1, 1), deepnorm (alpha, 1), branchnorm (1, alpha_t),
                                               ds_init (1, 1); admin: LN(omega * x + dropout(F(x))), omega a
                                               learned vector per sub-layer set by a profiling pass
    pre    y = x + dropout(F(LN(x)))           pre_ln; dlcl (each layer's input a learned combination of all
                                               earlier layers' normalised outputs); normformer and subln (extra
                                               LayerNorms inside F); a final LN ends each stack
    none   y = x + s * dropout(F(x))           rezero (s a learned scalar per layer, from 0); t_fixup (s = 1);
                                               r_fixup: x + m * dropout(F(x + b)), scalar b, m per sub-layer

SCHEMES holds each scheme's shape and its equation (README's table, docs/design.md cite the papers). The
step-dependent alpha_t lives in exactly one place per process: the 0-dim `branch_scale` buffer of each stack's
`ResidualCoefficients`, updated in place by `set_step`. Modules read the tensor, never a Python float, so a
compiled graph, a CUDA graph or a later pipeline stage sees the new value without recompiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import RESIDUALS, RESIDUALS_WITH_OWN_INIT


@dataclass(frozen=True)
class Scheme:
    name: str
    shape: str  # post | pre | none (module docstring)
    equation: str  # one sub-layer (and what else the scheme changes), as README's table shows it

    @property
    def own_init(self) -> bool:
        """Its paper prescribes the initialisation (model.deepnorm_init does not apply)."""
        return self.name in RESIDUALS_WITH_OWN_INIT

    @property
    def has_norm(self) -> bool:
        """Every sub-layer holds a LayerNorm (all but the normalisation-free schemes)."""
        return self.shape != "none"

    @property
    def final_norm(self) -> bool:
        """A LayerNorm after each stack's last layer (the Pre-LN family)."""
        return self.shape == "pre"


SCHEMES: dict[str, Scheme] = {
    "post_ln": Scheme("post_ln", "post", "LN(x + F(x))"),
    "pre_ln": Scheme("pre_ln", "pre", "x + F(LN(x)); final LN"),
    "deepnorm": Scheme("deepnorm", "post", "LN(alpha x + F(x)); v, out, fc1, fc2 init x beta"),
    "branchnorm": Scheme("branchnorm", "post", "LN(x + alpha_t F(x)), alpha_t = min(1, t / T)"),
    "ds_init": Scheme("ds_init", "post", "LN(x + F(x)); layer l's weights init x 1 / sqrt(l)"),
    "admin": Scheme(
        "admin", "post", "LN(omega_i * x + F(x)); omega_i = sqrt(Var[omega_{i-1} x] + Var[F_{i-1}]) profiled"
    ),
    "rezero": Scheme("rezero", "none", "x + a_l F(x), a_l learned from 0; no LN"),
    "r_fixup": Scheme(
        "r_fixup",
        "none",
        "x + m F(x + b), scalar b (also inside the FFN) and m; no LN; branch outputs init 0, "
        "q/k/v x L^(-1/6), fc1 x L^(-1/2)",
    ),
    "t_fixup": Scheme(
        "t_fixup",
        "none",
        "x + F(x); no LN; v, out, fc1, fc2 init x 0.67 N^(-1/4) (encoder), (9M)^(-1/4) (decoder, embeddings)",
    ),
    "dlcl": Scheme(
        "dlcl", "pre", "layer input sum_k W_lk LN_k(y_k) over the embedding and all earlier outputs; x + F(LN(x))"
    ),
    "normformer": Scheme(
        "normformer",
        "pre",
        "x + F(LN(x)) with LN after self-attention, per-head scales, LN after the FFN activation; final LN",
    ),
    "subln": Scheme(
        "subln",
        "pre",
        "x + F(LN(x)) with LN before out_proj (self-attention) and fc2; v, out, fc1, fc2 init x gamma; final LN",
    ),
}
assert tuple(SCHEMES) == RESIDUALS, "config.RESIDUALS and residual.SCHEMES must name the same schemes"


def fused_applies(residual: str) -> bool:
    """Whether the fused LN(r * x + s * dropout(f)) kernel computes this scheme's sub-layers (scalar r and s)."""
    return SCHEMES[residual].shape == "post" and residual != "admin"


# --- DeepNet (arXiv 2203.00555) constants -------------------------------------------------------------------

# the encoder beta's c in c * (N^4 M)^(-1/16): the paper's Table 1 (0.87), torchscale 0.3.0's encoder.py, which
# divides by (N^4 M)^(1/16) / 1.15 (config.DEEPNORM_BETAS names them)
ENCODER_BETA_FACTOR = {"paper": 0.87, "torchscale": 1.15}


def deepnorm_constants(encoder_layers: int, decoder_layers: int, beta: str = "paper") -> dict[str, tuple[float, float]]:
    """(alpha, beta) per stack. Pass 0 layers for the missing stack of an encoder-only / decoder-only model;
    `beta` picks the encoder-decoder's encoder beta (ENCODER_BETA_FACTOR)."""
    n, m = encoder_layers, decoder_layers
    if n > 0 and m > 0:
        return {
            "encoder": (0.81 * (n**4 * m) ** (1 / 16), ENCODER_BETA_FACTOR[beta] * (n**4 * m) ** (-1 / 16)),
            "decoder": ((3 * m) ** (1 / 4), (12 * m) ** (-1 / 4)),
        }
    if n > 0:
        return {"encoder": ((2 * n) ** (1 / 4), (8 * n) ** (-1 / 4))}
    if m > 0:
        return {"decoder": ((2 * m) ** (1 / 4), (8 * m) ** (-1 / 4))}
    raise ValueError("a model needs at least one layer")


# --- the other schemes' initialisation constants (docs/design.md cites the equations) -------------------------


def ds_init_scale(layer: int) -> float:
    """DS-Init (Zhang et al. 2019a, Eq. 9): layer l's (1-based, within its stack) weights times 1 / sqrt(l)."""
    return 1.0 / math.sqrt(layer)


def fixup_branches(encoder_layers: int, decoder_layers: int) -> int:
    """Fixup's L: the residual branches of the model (2 per encoder layer, 3 per decoder layer)."""
    return 2 * encoder_layers + 3 * decoder_layers


def t_fixup_scales(encoder_layers: int, decoder_layers: int) -> dict[str, float]:
    """T-Fixup (Huang et al. 2020, Sec. 3.3): v, out_proj, fc1, fc2 of the encoder times 0.67 N^(-1/4), of the
    decoder (and both token embeddings) times (9 M)^(-1/4)."""
    return {"encoder": 0.67 * encoder_layers**-0.25, "decoder": (9 * decoder_layers) ** -0.25}


def subln_gains(encoder_layers: int, decoder_layers: int) -> dict[str, float]:
    """Sub-LN (Wang et al. 2022b, Magneto, Sec. 2.2) for an encoder-decoder, as torchscale 0.3.0 applies it: v, out,
    fc1, fc2 of the encoder times sqrt(log(3M) log(2N) / 3), of the decoder (not its cross-attention) times
    sqrt(log 3M)."""
    n, m = encoder_layers, decoder_layers
    return {"encoder": math.sqrt(math.log(3 * m) * math.log(2 * n) / 3), "decoder": math.sqrt(math.log(3 * m))}


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
        sig = lambda z: 1.0 / (1.0 + math.exp(-z))
        lo, hi = sig(-_SIG_K / 2), sig(_SIG_K / 2)
        return (sig(_SIG_K * (u - 0.5)) - lo) / (hi - lo)
    raise ValueError(f"unknown alpha schedule {schedule!r}")


class ResidualCoefficients(nn.Module):
    """The scales (r, s) of LN(r * x + s * F(x)) shared by every sub-layer of one stack, as 0-dim buffers:
    `shortcut_scale` r (DeepNorm's alpha) and `branch_scale` s (BranchNorm's alpha_t).

    Buffers are non-persistent: they are derived from the global step (which the checkpoint stores), so a
    state dict never carries a stale alpha.
    """

    def __init__(self, residual: str, deepnorm_alpha: float = 1.0, schedule: str = "linear", warmup: int = 4000):
        super().__init__()
        self.residual, self.schedule, self.warmup = residual, schedule, warmup
        self.shortcut_value = deepnorm_alpha if residual == "deepnorm" else 1.0
        self.register_buffer("shortcut_scale", torch.tensor(self.shortcut_value, dtype=torch.float32), persistent=False)
        self.register_buffer("branch_scale", torch.tensor(1.0, dtype=torch.float32), persistent=False)
        self.step = 0
        self.set_step(0)

    @classmethod
    def for_stack(cls, cfg, stack: str) -> ResidualCoefficients:
        """The coefficients of the "encoder" or "decoder" stack of the model `cfg` (a ModelConfig) describes."""
        alpha = deepnorm_constants(cfg.encoder_layers, cfg.decoder_layers)[stack][0]
        return cls(cfg.residual, alpha, cfg.alpha_schedule, cfg.alpha_warmup_steps)

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        self.step = step
        if self.residual == "branchnorm":
            self.branch_scale.fill_(alpha_at(step, self.warmup, self.schedule))

    @torch.no_grad()
    def reset(self) -> None:
        """Refill both buffers (after a meta-device build has been given real storage)."""
        self.shortcut_scale.fill_(self.shortcut_value)
        self.branch_scale.fill_(1.0)
        self.set_step(self.step)

    def extra_repr(self) -> str:
        return f"residual={self.residual}, r={float(self.shortcut_scale):.4g}, s={float(self.branch_scale):.4g}"


def set_step(model: nn.Module, step: int) -> None:
    """Point every stack of `model` (or of a pipeline stage) at global step `step`."""
    for m in model.modules():
        if isinstance(m, ResidualCoefficients):
            m.set_step(step)


def current_alpha(model: nn.Module) -> float:
    """The BranchNorm alpha the model is using now (1.0 for schemes without one); for logging only."""
    for m in model.modules():
        if isinstance(m, ResidualCoefficients) and m.residual == "branchnorm":
            return float(m.branch_scale)
    return 1.0
