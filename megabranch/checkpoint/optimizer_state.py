"""Optimizer state in a layout-free "canonical" form, and back into an optimizer.

Canonical: per parameter name, AdamW's step / exp_avg / exp_avg_sq shaped like that rank's parameter slice,
plus the hyperparameters: {"step"|"exp_avg"|"exp_avg_sq": {name: tensor}, "hyper": {...}}. ZeRO-1 shards
(parallel/zero.py) keep their own flat form per data-parallel rank in the checkpoint; a reader in another
layout takes per-parameter slices out of them (slice_reader.py).
"""

from __future__ import annotations

import torch

from ..errors import UserError


def is_zero(optimizer) -> bool:
    """Whether `optimizer` is a ZeRO-1 ShardedAdamW (whose state is a flat per-rank shard)."""
    return hasattr(optimizer, "gather_full_state")


def optimizer_to_canonical(optimizer, names: list[str]) -> dict | None:
    """torch AdamW state -> {"step"|"exp_avg"|"exp_avg_sq": {name: tensor}, "hyper": {...}}; None for ZeRO-1
    (whose per-rank flat shards are saved as they are)."""
    if is_zero(optimizer):
        return None
    sd = optimizer.state_dict()
    (group,) = sd["param_groups"]
    out = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}, "hyper": {k: v for k, v in group.items() if k != "params"}}
    for i, name in zip(group["params"], names):
        st = sd["state"].get(i)
        if st:
            for k in ("step", "exp_avg", "exp_avg_sq"):
                out[k][name] = st[k].detach().clone()
    return out


@torch.no_grad()
def load_optimizer(optimizer, names: list[str], state: dict) -> bool:
    """Restore `optimizer` (torch AdamW or ZeRO-1) from load_for_rank's result. A checkpoint without optimizer
    state (averaged, imported, converted with --no-optimizer) leaves it fresh: -> False."""
    canon, zero = state.get("optimizer"), state.get("zero")
    if canon is None and zero is None:
        return False
    if is_zero(optimizer):
        if zero is not None and zero.get("shard") == optimizer.shard_layout():
            optimizer.load_state_dict(zero)
            return True
        if canon is None:
            raise UserError("checkpoint holds no optimizer state for this rank")
        step = int(float(next(iter(canon["step"].values())))) if canon["step"] else 0
        moments = {
            k: [canon[k][n].float() if n in canon[k] else None for n in names] for k in ("exp_avg", "exp_avg_sq")
        }
        optimizer.load_param_state(step, canon["hyper"], moments["exp_avg"], moments["exp_avg_sq"])
        return True
    if canon is None:
        raise UserError("checkpoint holds no optimizer state for this rank (a ZeRO-1 shard for another layout)")
    sd = optimizer.state_dict()
    group = sd["param_groups"][0]
    for k, v in canon["hyper"].items():
        if k in group:
            group[k] = tuple(v) if k == "betas" else v
    sd["state"] = {}
    for i, name in zip(group["params"], names):
        if name in canon["exp_avg"]:
            sd["state"][i] = {k: canon[k][name].clone() for k in ("step", "exp_avg", "exp_avg_sq")}
    optimizer.load_state_dict(sd)
    return True


@torch.no_grad()
def restore(params: dict, optimizer, state: dict) -> None:
    """Copy load_for_rank's parameters into a trainer's `params` (name -> parameter) and restore its optimizer."""
    for k, p in params.items():
        p.copy_(state["model"][k])
    load_optimizer(optimizer, list(params), state)
