"""Tensor parallelism, split by job as Megatron-core splits it:

    layers.py         ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelOutput
    mappings.py       the communication as autograd functions (copy / reduce / scatter / gather, sequence splits)
    cross_entropy.py  the vocabulary-parallel label-smoothed loss
    random.py         the dropout RNG of split regions (RNGTracker) and the recomputation that replays it

Applying it to the model from outside is parallel/parallelize.py's job. This package re-exports the public
names, so callers write `from megabranch.parallel.tensor_parallel import ColumnParallelLinear`.
"""

from .cross_entropy import vocab_parallel_label_smoothed_nll_loss
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelOutput, mark_shard
from .mappings import (
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence,
    scatter_to_sequence,
    scatter_to_tp,
)
from .random import RNGTracker, checkpoint, get_rng_tracker, install_rng_fork, model_parallel_seed

__all__ = [
    "ColumnParallelLinear",
    "RNGTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabParallelOutput",
    "checkpoint",
    "copy_to_tp",
    "gather_from_sequence",
    "gather_from_tp",
    "get_rng_tracker",
    "install_rng_fork",
    "mark_shard",
    "model_parallel_seed",
    "reduce_from_tp",
    "reduce_scatter_to_sequence",
    "scatter_to_sequence",
    "scatter_to_tp",
    "vocab_parallel_label_smoothed_nll_loss",
]
