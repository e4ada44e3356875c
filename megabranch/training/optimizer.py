"""The optimizer every engine steps with, built from the config in one place, and the learning rate of a step.

AdamW over the given parameters (each object once), or with parallel.zero its ZeRO-1 form (parallel/zero.py:
the Adam state sharded over the data-parallel group). The DeepSpeed engine takes the same AdamW unless its JSON
config brings its own optimizer.
"""

from __future__ import annotations

import torch

from ..config import OptimConfig
from ..parallel.zero import ShardedAdamW
from .lr_schedule import inverse_sqrt_lr


def build_optimizer(params, o: OptimConfig, dp_group=None, zero: bool = False) -> torch.optim.Optimizer:
    """AdamW with the config's hyper-parameters (the learning rate is set per step by set_lr); zero=True shards
    its state over dp_group."""
    params = list({id(p): p for p in params}.values())
    betas = (float(o.betas[0]), float(o.betas[1]))
    if zero:
        return ShardedAdamW(params, dp_group, lr=o.lr, betas=betas, eps=o.adam_eps, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=betas, eps=o.adam_eps, weight_decay=o.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, o: OptimConfig) -> float:
    """Point every parameter group at the inverse-sqrt learning rate of global step `step` -> that rate."""
    lr = inverse_sqrt_lr(step, o)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
