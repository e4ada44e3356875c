"""The global gradient norm over every rank of a tensor x pipeline x data-parallel grid, and clipping by it.

Each gradient element of the single-process model is counted exactly once:
  * split (tensor-parallel) parameters: every tp rank adds its own shard;
  * tp-replicated parameters (`p.tp_replicated`, identical on every tp rank): only tp_rank 0 adds them;
  * `p.pp_duplicate` (a tied embedding copy on a pipeline stage that does not own it): never added;
  * data parallelism: gradients are already identical across replicas after the reduction, so no dp reduce.
The local sums of squares (fp32) are all-reduced over the tp and pp groups. A non-finite gradient makes the
norm inf/nan on EVERY rank, so the engine can skip the step consistently.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _unique_grads(params):
    seen = set()
    for p in params:
        if id(p) in seen or p.grad is None:
            continue
        seen.add(id(p))
        yield p


def local_sum_of_squares(params, tp_rank: int = 0) -> torch.Tensor:
    """This rank's share of the squared global norm (fp32, on the gradients' device)."""
    total = None
    for p in _unique_grads(params):
        if getattr(p, "pp_duplicate", False) or (tp_rank != 0 and getattr(p, "tp_replicated", False)):
            continue
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        total = sq if total is None else total + sq
    return torch.zeros((), dtype=torch.float32) if total is None else total


def global_grad_norm(params, grid=None) -> float:
    """The L2 norm of the gradient of the whole (single-process-equivalent) model. Collective over tp and pp."""
    params = list(params)
    tp_rank = grid.tp_rank if grid is not None else 0
    sq = local_sum_of_squares(params, tp_rank)
    if grid is not None:
        for group in (grid.tp_group, grid.pp_group):
            if group is not None:
                dist.all_reduce(sq, group=group)
    return math.sqrt(sq.item())  # inf and nan pass through


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, grid=None, eps: float = 1e-6) -> float:
    """Scale every gradient by max_norm / (norm + eps) when the global norm exceeds max_norm (as
    torch.nn.utils.clip_grad_norm_ does on one process); returns the norm BEFORE clipping.

    max_norm = inf (or <= 0) only measures. A non-finite norm is returned and the gradients are left untouched.
    """
    params = list(params)
    norm = global_grad_norm(params, grid)
    if not math.isfinite(norm) or max_norm <= 0 or math.isinf(max_norm):
        return norm
    coef = max_norm / (norm + eps)
    if coef < 1.0:
        for p in _unique_grads(params):
            p.grad.mul_(coef)
    return norm
