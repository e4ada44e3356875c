"""How a block reaches features that tensor parallelism splits over ranks (attention heads, FFN hidden units).

In the model itself nothing is split, so `UNSHARDED` does nothing. `megabranch.parallel.parallelize` gives the
blocks it shards an object with the same three methods over the tensor-parallel group instead; the model never
learns of process groups. Used only where a scheme puts something on split features: Sub-LN's and NormFormer's
LayerNorms over the concatenated heads / the FFN hidden units (gather, normalise, scatter), R-Fixup's scalar biases
inside the FFN (a replicated scalar whose gradient sums over every shard).
"""

from __future__ import annotations

import torch


class Unsharded:
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The full last dimension of features this rank holds a slice of."""
        return x

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full last dimension."""
        return x

    def replicated(self, p: torch.Tensor) -> torch.Tensor:
        """A parameter every rank holds whole, used on this rank's slice: its gradient summed over the slices."""
        return p


UNSHARDED = Unsharded()
