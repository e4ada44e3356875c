"""The global gradient norm over every rank of a tensor x pipeline x data-parallel grid, per parameter group and
in total, and clipping by it.

Each gradient element of the single-process model is counted exactly once:
  * split (tensor-parallel) parameters: every tp rank adds its own shard;
  * tp-replicated parameters (`p.tp_replicated`, identical on every tp rank): only tp_rank 0 adds them;
  * `p.pp_duplicate` (a tied embedding copy on a pipeline stage that does not own it): never added;
  * data parallelism: gradients are already identical across replicas after the reduction, so no dp reduce.
The squared norms (one fused reduction over the local gradients, fp32) are summed into groups (the training
health monitor's layers; one group when nobody asks) and the group vector is all-reduced over the tp and pp
groups: the same one collective as a scalar norm, so the per-layer norms cost nothing extra. A non-finite
gradient makes the norm inf/nan on EVERY rank, so the engine can skip the step consistently.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def counted(params, tp_rank: int = 0) -> list[int]:
    """Indexes into `params` of the gradients this rank counts (each object once, none a duplicate)."""
    seen, out = set(), []
    for i, p in enumerate(params):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if getattr(p, "pp_duplicate", False) or (tp_rank != 0 and getattr(p, "tp_replicated", False)):
            continue
        out.append(i)
    return out


def local_sums_of_squares(params, tp_rank: int = 0, group_of=None, groups: int = 1) -> torch.Tensor:
    """This rank's share of the squared global norm, summed per group (fp32, shape (groups,), on the
    gradients' device). group_of[i]: the group of params[i] (default: every parameter in group 0)."""
    params = list(params)
    idx = [i for i in counted(params, tp_rank) if params[i].grad is not None]
    device = params[idx[0]].grad.device if idx else torch.device("cpu")
    out = torch.zeros(groups, dtype=torch.float32, device=device)
    if not idx:
        return out
    norms = torch._foreach_norm([params[i].grad for i in idx])  # one fused reduction (multi-tensor on CUDA)
    squares = torch.stack(norms).float().square()
    which = torch.tensor([group_of[i] if group_of is not None else 0 for i in idx], device=device)
    return out.index_add_(0, which, squares)


def global_sums_of_squares(params, grid=None, group_of=None, groups: int = 1) -> torch.Tensor:
    """Squared norms per group of the whole (single-process-equivalent) model's gradient, identical on every rank.
    Collective over tp and pp (one all-reduce each)."""
    sq = local_sums_of_squares(params, grid.tp_rank if grid is not None else 0, group_of, groups)
    if grid is not None:
        for group in (grid.tp_group, grid.pp_group):
            if group is not None:
                dist.all_reduce(sq, group=group)
    return sq


def global_grad_norm(params, grid=None) -> float:
    """The L2 norm of the gradient of the whole (single-process-equivalent) model. Collective over tp and pp."""
    return math.sqrt(float(global_sums_of_squares(params, grid).sum()))  # inf and nan pass through


@torch.no_grad()
def clip_by_norm_(params, norm: float, max_norm: float, eps: float = 1e-6) -> None:
    """Scale every gradient by max_norm / (norm + eps) when the norm exceeds max_norm (as
    torch.nn.utils.clip_grad_norm_ does on one process). max_norm = inf (or <= 0), or a non-finite norm: no-op."""
    if not math.isfinite(norm) or max_norm <= 0 or math.isinf(max_norm):
        return
    coef = max_norm / (norm + eps)
    if coef < 1.0:
        grads = list({id(p): p.grad for p in params if p.grad is not None}.values())
        torch._foreach_mul_(grads, coef)


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, grid=None, eps: float = 1e-6) -> float:
    """Clip by the global norm; returns the norm BEFORE clipping. max_norm = inf (or <= 0) only measures. A
    non-finite norm is returned and the gradients are left untouched."""
    params = list(params)
    norm = global_grad_norm(params, grid)
    clip_by_norm_(params, norm, max_norm, eps)
    return norm
