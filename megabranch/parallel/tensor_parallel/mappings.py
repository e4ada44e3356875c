"""Communication for tensor parallelism as autograd functions: each says what it does forward AND backward.

    copy_to_tp        fwd: identity                      bwd: all-reduce (sum) the gradient
    reduce_from_tp    fwd: all-reduce (sum)              bwd: identity
    scatter_to_tp     fwd: keep my slice of the last dim bwd: all-gather the last dim
    gather_from_tp    fwd: all-gather the last dim       bwd: keep my slice

Sequence-parallel building blocks (split along `dim`, the sequence dimension by default):

    scatter_to_sequence         fwd: keep my slice        bwd: all-gather
    gather_from_sequence        fwd: all-gather           bwd: reduce-scatter (sum)
    reduce_scatter_to_sequence  fwd: reduce-scatter (sum) bwd: all-gather

Every function takes the process group; `group=None` (a tensor-parallel size of 1) makes it the identity, so
code written for tp > 1 runs unchanged on one process. Collectives work on contiguous copies, never in place on
the caller's tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives (the old names warn); older torch (2.11 on the GPU image) has
# only the old ones
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} into {n} equal parts")
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` (one single-tensor all-gather over the leading dimension)."""
    n = _size(group)
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * front.shape[0],) + tuple(front.shape[1:]), dtype=x.dtype, device=x.device)
    _ALL_GATHER_SINGLE(out, front, group=group)
    return out.movedim(0, dim) if dim == 0 else out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The sum over ranks of `x`, this rank's part of it along `dim` (one single-tensor reduce-scatter)."""
    n = _size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {n} ranks")
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((front.shape[0] // n,) + tuple(front.shape[1:]), dtype=x.dtype, device=x.device)
    _REDUCE_SCATTER_SINGLE(out, front, group=group)
    return out if dim == 0 else out.movedim(0, dim).contiguous()


def all_gather_along(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The all-gather along `dim` itself, no autograd (for autograd Functions that call it in their backward);
    group None: x."""
    return x if group is None else _all_gather(x, group, dim)


def reduce_scatter_along(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The reduce-scatter along `dim` itself, no autograd; group None: x."""
    return x if group is None else _reduce_scatter(x, group, dim)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group, ctx.dim), None, None


class _GatherReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.group, ctx.dim), None, None


class _ReduceScatterGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce of the gradient backward."""
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a tensor-parallel region by summing the partial results: all-reduce forward, identity backward."""
    return x if group is None else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension (forward); all-gather the gradient (backward)."""
    return x if group is None else _Scatter.apply(x, group, x.dim() - 1)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's slice along the last dimension (forward); keep my slice of the gradient."""
    return x if group is None else _Gather.apply(x, group, x.dim() - 1)


def scatter_to_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: keep my chunk of `dim` (forward); all-gather the gradient (backward)."""
    return x if group is None else _Scatter.apply(x, group, dim % x.dim())


def gather_from_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: all-gather `dim` (forward); reduce-scatter the gradient (backward).

    The backward sums, because the gathered tensor feeds a tensor-parallel region whose ranks each produce a
    partial gradient of the whole sequence.
    """
    return x if group is None else _GatherReduceScatter.apply(x, group, dim % x.dim())


def reduce_scatter_to_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: sum the partial results and keep my chunk of `dim` (forward); all-gather backward."""
    return x if group is None else _ReduceScatterGather.apply(x, group, dim % x.dim())
