"""Checkpoints: sharded step directories, atomic publication, safe loading, resharding, averaging.

A save directory:

    <save_dir>/step_<N>/meta.json                 layout, model config, vocabulary hash, versions, sha256 per file
    <save_dir>/step_<N>/shard_tp<t>_pp<p>.pt      written by data-parallel rank 0 of grid position (t, p): its
                                                  parameters (by single-process name, tensor-parallel slices),
                                                  optimizer state, step, alpha, its own RNG / data position
    <save_dir>/step_<N>/shard_tp<t>_pp<p>_dp<d>.pt  every other data-parallel rank d: RNG states, data position,
                                                  and its ZeRO-1 optimizer slice when parallel.zero
    <save_dir>/latest, <save_dir>/best            one line each: the name of a step directory

The modules, one job each (this package re-exports their public functions: `checkpoint.save_step(...)`):

    reading.py          the file names, resolve / read_meta / load_file / safe_load / verify (sha256 first,
                        weights_only loading, one-line errors)
    publication.py      atomic writes, save_step / write_step_dir, the latest/best pointers, keep-last-K pruning
    optimizer_state.py  the layout-free canonical optimizer state, ZeRO-1 flat shards, load_optimizer / restore
    resharding.py       consolidate (merge shards), cut / cut_optimizer, load_for_rank, the single-process view
    averaging.py        fairseq-style averaging of several checkpoints

This package knows files, layouts and tensors; nothing about the training loop.
"""

from .averaging import average
from .optimizer_state import (
    is_zero,
    load_optimizer,
    optimizer_to_canonical,
    restore,
    zero_flat_to_canonical,
)
from .publication import atomic_write, atomic_write_bytes, prune, save_step, versions, write_step_dir
from .reading import (
    FORMAT_VERSION,
    META,
    has_checkpoints,
    load_file,
    read_meta,
    read_pointer,
    resolve,
    safe_load,
    sha256_file,
    shard_name,
    step_dirs,
    verify,
)
from .resharding import (
    consolidate,
    cut,
    cut_optimizer,
    load_checkpoint,
    load_for_rank,
    merge_slices,
    single_layout,
    single_process_files,
    split_info,
)

__all__ = [
    "FORMAT_VERSION", "META", "atomic_write", "atomic_write_bytes", "average", "consolidate", "cut",
    "cut_optimizer", "has_checkpoints", "is_zero", "load_checkpoint", "load_file", "load_for_rank",
    "load_optimizer", "merge_slices", "optimizer_to_canonical", "prune", "read_meta", "read_pointer", "resolve", "restore",
    "safe_load", "save_step", "sha256_file", "shard_name", "single_layout", "single_process_files",
    "split_info", "step_dirs", "verify", "versions", "write_step_dir", "zero_flat_to_canonical",
]
