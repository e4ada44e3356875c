"""Initialisation: every parameter's initial value is a pure function of (seed, its single-process name, shape).

So any parallel layout can build just its own layers or tensor-parallel shards (on the meta device, then
materialised) and still hold exactly the single-process model's weights for a seed.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..config import ModelConfig
from ..residual import deepnorm_constants, ds_init_scale, fixup_branches, subln_gains, t_fixup_scales
from ..vocab import PAD


def draw_init_seed(seed: int) -> int:
    """The model's init seed for a config seed: the first draw after torch.manual_seed(seed). Every engine calls
    it, so every layout (one process, tp x pp x dp, DeepSpeed) starts from the same weights."""
    torch.manual_seed(seed)
    return int(torch.randint(0, 2**62, ()))


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _layer_number(name: str) -> int:
    """1 + the layer index in 'encoder.layers.7.ffn...' (the depth l of DS-Init's 1/sqrt(l))."""
    return int(name.split(".")[2]) + 1


def _scheme_gain(name: str, cfg: ModelConfig) -> float:
    """What the scheme multiplies linear weight `name`'s xavier initialisation by (docs/design.md, the papers)."""
    res, stack = cfg.residual, "encoder" if name.startswith("encoder.") else "decoder"
    n, m = cfg.encoder_layers, cfg.decoder_layers
    branch_output = name.endswith(("out_proj.weight", "fc2.weight"))
    scaled = branch_output or name.endswith(("v_proj.weight", "fc1.weight"))  # DeepNet's / T-Fixup's / Sub-LN's set
    if res == "ds_init":
        return ds_init_scale(_layer_number(name))
    if res == "r_fixup":  # each branch's last layer 0; the others x L^(-1/(2m-2)): attention m = 4, FFN m = 2
        if branch_output:
            return 0.0
        return fixup_branches(n, m) ** (-0.5 if name.endswith("fc1.weight") else -1 / 6)
    if res == "t_fixup":
        return t_fixup_scales(n, m)[stack] if scaled else 1.0
    if res == "subln":  # torchscale leaves the decoder's cross-attention at its plain initialisation
        return subln_gains(n, m)[stack] if scaled and ".cross_attn." not in name else 1.0
    use_beta = cfg.deepnorm_init if cfg.deepnorm_init is not None else res in ("deepnorm", "branchnorm")
    return deepnorm_constants(n, m, cfg.deepnorm_beta)[stack][1] if use_beta and scaled else 1.0


def initial_value(name: str, shape: tuple, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of the full (unsharded) parameter `name` of the single-process model.

    The DeepNet paper's init: xavier on every linear weight (drawn uniform; q/k/v with fairseq's gain 1/sqrt(2)),
    zero biases, unit LayerNorm, N(0, d^-1/2) embeddings with a zero pad row (learned positions: N(0, d^-1/2)
    too); with DeepNorm init (default for deepnorm and branchnorm) v/out/fc1/fc2 are scaled by the stack's beta
    (model.deepnorm_beta: the paper's encoder beta or torchscale's). It is not fairseq 0.12's (nor torchscale's):
    they leave fc1/fc2 at nn.Linear's default and every bias but out_proj's non-zero (docs/design.md). The schemes
    with their own init
    scale the linear weights as their papers say (`_scheme_gain`); T-Fixup also scales the token tables, R-Fixup
    zeroes an untied output projection. The schemes' scalars: ReZero's a_l 0, R-Fixup's biases 0 and scales 1,
    Admin's omega 1 (its profiling pass sets it), NormFormer's head scales 1, DLCL's combination rows their mean.
    """
    g = torch.Generator().manual_seed(_name_seed(seed, name))
    t = torch.empty(shape)
    if "embed.table" in name or name.endswith(("output.weight", "embed.learned_positions.weight")):
        if name.endswith("output.weight") and cfg.residual == "r_fixup":
            return t.zero_()
        std = cfg.d_model**-0.5
        if "embed.table" in name and cfg.residual == "t_fixup":
            std *= t_fixup_scales(cfg.encoder_layers, cfg.decoder_layers)["decoder"]
        t.normal_(0.0, std, generator=g)
        if "embed.table" in name:
            t[PAD] = 0.0
        return t
    if name.endswith(("bias", "residual_weight")):  # every bias (R-Fixup's scalars too), ReZero's a_l
        return t.zero_()
    if "norm." in name or name.endswith(("omega", "head_scale", "fixup_scale", "final_scale")):
        return t.fill_(1.0)
    if name.endswith("combine.weight"):
        return t.fill_(1.0 / shape[0])
    gain = _scheme_gain(name, cfg)
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        gain /= math.sqrt(2)
    fan_out, fan_in = shape
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return t.uniform_(-bound, bound, generator=g)


def _whole(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return full


@torch.no_grad()
def fill_initial_values(named: dict, cfg: ModelConfig, seed: int, full_shape=None, shard=_whole) -> None:
    """Fill parameters {single-process name: parameter} from `initial_value`. A parameter that holds a slice of
    the single-process one (tensor parallelism) says so through `full_shape(p)` and `shard(full, p)`, which the
    caller supplies; the model itself knows nothing of how it is split."""
    for name, p in named.items():
        shape = tuple(p.shape) if full_shape is None else full_shape(p)
        p.copy_(shard(initial_value(name, shape, cfg, seed), p))
