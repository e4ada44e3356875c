"""Initialisation: every parameter's initial value is a pure function of (seed, its single-process name, shape).

So any parallel layout can build just its own layers or tensor-parallel shards (on the meta device, then
materialised) and still hold exactly the single-process model's weights for a seed.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..config import ModelConfig
from ..residual import deepnorm_constants
from ..vocab import PAD


def draw_init_seed(seed: int) -> int:
    """The model's init seed for a config seed: the first draw after torch.manual_seed(seed). Every engine calls
    it, so every layout (one process, tp x pp x dp, DeepSpeed) starts from the same weights."""
    torch.manual_seed(seed)
    return int(torch.randint(0, 2**62, ()))


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_value(name: str, shape: tuple, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of the full (unsharded) parameter `name` of the single-process model.

    fairseq's init: xavier_uniform (q/k/v with gain 1/sqrt(2)), zero biases, unit LayerNorm, N(0, d^-1/2)
    embeddings with a zero pad row (learned positions: N(0, d^-1/2) too); with DeepNorm init (default for
    deepnorm and branchnorm) v/out/fc1/fc2 are scaled by the stack's beta.
    """
    g = torch.Generator().manual_seed(_name_seed(seed, name))
    t = torch.empty(shape)
    if "embed.table" in name or name.endswith(("output.weight", "embed.learned_positions.weight")):
        t.normal_(0.0, cfg.d_model**-0.5, generator=g)
        if "embed.table" in name:
            t[PAD] = 0.0
        return t
    if name.endswith("bias"):
        return t.zero_()
    if "norm." in name:
        return t.fill_(1.0)
    use_beta = cfg.deepnorm_init if cfg.deepnorm_init is not None else cfg.residual in ("deepnorm", "branchnorm")
    stack = "encoder" if name.startswith("encoder.") else "decoder"
    beta = deepnorm_constants(cfg.encoder_layers, cfg.decoder_layers)[stack][1] if use_beta else 1.0
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        gain = 1 / math.sqrt(2)
    elif name.endswith("v_proj.weight"):
        gain = beta / math.sqrt(2)
    else:  # out_proj, fc1, fc2
        gain = beta
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
