"""Every residual scheme megabranch trains, rewritten as the plain Transformer other packages run.

A sub-layer computes y = LN(r * x + s * F(x)) (megabranch.residual). LayerNorm is scale invariant:
LN(c * z; eps) = LN(z; eps / c^2) for c > 0, so with c = r

    LN(r * x + s * F(x); eps) = LN(x + (s / r) * F(x); eps / r^2)

and s / r folds into the last linear map of the branch (attention's out_proj, the FFN's fc2: weight and bias),
which F is linear in. post_ln (1, 1) and pre_ln are unchanged; BranchNorm (1, alpha_t) at any step, mid-ramp
too, keeps its eps; DeepNorm (alpha, 1) divides by its alpha and its norms' eps becomes eps / alpha^2, one value
per stack (the encoder's and the decoder's alphas differ). What a target can hold of that eps is the exporter's
question (`Folded.eps`); the folded weights are exact.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..residual import ResidualCoefficients

FOLDABLE = ("post_ln", "pre_ln", "deepnorm", "branchnorm", "ds_init")  # ds_init: post_ln with another init
STACKS = ("encoder", "decoder")
BRANCH_OUTPUTS = ("self_attn.block.out_proj.", "cross_attn.block.out_proj.", "ffn.block.fc2.")


@dataclasses.dataclass
class Folded:
    """Plain-Transformer weights (megabranch's names) and, per stack, the (r, s) folded in and the eps its
    sub-layer norms need. The final norms of a pre_ln model keep model.ln_eps."""

    params: dict
    scale: dict  # stack -> s / r, what each branch's out_proj / fc2 was multiplied by
    eps: dict  # stack -> eps of its sub-layer norms

    def one_eps(self) -> float:
        """The eps of a target that has one for the whole model: the decoder's, so a DeepNorm encoder runs with
        the decoder's eps / alpha_dec^2 instead of its own eps / alpha_enc^2. The decoder's error reaches the
        logits directly, the encoder's through cross-attention: measured on an 18L-18L DeepNorm model, logits
        within 2.5e-7 relative this way, 5.0e-7 with the encoder's (docs/checkpoints.md, "Serving")."""
        return self.eps["decoder"]


def coefficients(mc: ModelConfig, step: int) -> dict:
    """stack -> (r, s) at global step `step`, as the model itself computes them (float32 buffers)."""
    out = {}
    for stack in STACKS:
        c = ResidualCoefficients.for_stack(mc, stack)
        c.set_step(step)
        out[stack] = (float(c.shortcut_scale), float(c.branch_scale))
    return out


def check_foldable(mc: ModelConfig) -> None:
    if mc.residual not in FOLDABLE:
        raise UserError(
            f"model.residual={mc.residual}: the export rewrites {', '.join(FOLDABLE)} into a plain "
            "Transformer; this scheme has no such form"
        )


def fold(params: dict, mc: ModelConfig, step: int) -> Folded:
    """The plain Transformer that computes what `params` compute at `step` (copies in float32 or wider; params
    untouched)."""
    check_foldable(mc)
    out = {k: v.detach().to(torch.promote_types(v.dtype, torch.float32), copy=True) for k, v in params.items()}
    scale, eps = {}, {}
    for stack, (r, s) in coefficients(mc, step).items():
        if mc.residual == "pre_ln":
            r = s = 1.0  # x + F(LN(x)): no coefficient to fold
        scale[stack], eps[stack] = s / r, mc.ln_eps / r**2
        if s == r:
            continue
        prefix = f"{stack}.layers."
        for name, t in out.items():
            if name.startswith(prefix) and name.split(".", 3)[3].startswith(BRANCH_OUTPUTS):
                t.mul_(s / r)
    return Folded(out, scale, eps)


def sublayer_norms(name: str) -> str | None:
    """The stack whose sub-layer norm `name` is (encoder.layers.3.ffn.norm.weight -> "encoder"), else None."""
    parts = name.split(".")
    if len(parts) == 6 and parts[1] == "layers" and parts[4] == "norm":
        return parts[0]
    return None


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
