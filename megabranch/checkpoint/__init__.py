"""Checkpoints: sharded step directories, atomic publication, safe loading, resharding, averaging.

A save directory (format 3; format-2 directories, one shard_*.pt per shard, are still read):

    <save_dir>/step_<N>/meta.json                 layout, model config, vocabulary hash, versions, sha256 per
                                                  file, which parameters each pipeline position holds
    <save_dir>/step_<N>/shard_tp<t>_pp<p>.{safetensors,json}   written by data-parallel rank 0 of grid position
                                                  (t, p): its parameters (by single-process name, tensor-
                                                  parallel slices), optimizer state, step, alpha, its own RNG /
                                                  data position (shard_format.py: data + JSON index)
    <save_dir>/step_<N>/shard_tp<t>_pp<p>_dp<d>.{safetensors,json}   every other data-parallel rank d: RNG
                                                  states, data position, its ZeRO-1 optimizer slice
    <save_dir>/latest, <save_dir>/best            one line each: the name of a step directory

The modules, one job each (this package re-exports their public functions: `checkpoint.save_step(...)`):

    reading.py          the file names, resolve / read_meta / load_shard / load_file / safe_load / verify
                        (sha256 first, weights_only loading of format 2, one-line errors)
    shard_format.py     format-3 shard files: safetensors data + JSON index, per-block sha256
    slice_reader.py     StepReader: the slices one rank owns, read from the shards that hold them
    publication.py      atomic writes, save_step / write_step_dir, the latest/best pointers, keep-last-K pruning
    async_save.py       AsyncSaver: the same publication in a background thread, on a process group of its own
    optimizer_state.py  the layout-free canonical optimizer state, ZeRO-1 flat shards, load_optimizer / restore
    resharding.py       load_for_rank (slices only), consolidate (the whole model), cut / cut_optimizer,
                        the single-process view
    averaging.py        fairseq-style averaging of several checkpoints
    model_loading.py    the single-process model from a checkpoint (load_model) or from weights
    lock.py             one writer per save directory (an flock held for the run's life)
    paths.py            every path a checkpoint's metadata names stays inside its directory
    space.py            a save that cannot be written (a full disk, a read-only or vanished filesystem): the line

This package knows files, layouts and tensors, and builds the single-process model from them; nothing about the
training loop.
"""

from .averaging import average
from .lock import LOCK_NAME, SaveDirLock, one_writer
from .model_loading import LoadedModel, load_model, model_from_weights
from .optimizer_state import (
    is_zero,
    load_optimizer,
    optimizer_to_canonical,
    restore,
)
from .paths import contained
from .publication import SaveFailed, atomic_write, atomic_write_bytes, prune, save_step, versions, write_step_dir
from .reading import (
    FORMAT_VERSION,
    META,
    READABLE_FORMATS,
    has_checkpoints,
    load_file,
    load_shard,
    read_meta,
    read_pointer,
    resolve,
    safe_load,
    sha256_file,
    shard_files,
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
    single_layout,
    single_process_files,
)
from .slice_reader import StepReader

__all__ = [
    "FORMAT_VERSION",
    "LOCK_NAME",
    "META",
    "READABLE_FORMATS",
    "LoadedModel",
    "SaveDirLock",
    "SaveFailed",
    "StepReader",
    "atomic_write",
    "atomic_write_bytes",
    "average",
    "consolidate",
    "contained",
    "cut",
    "cut_optimizer",
    "has_checkpoints",
    "is_zero",
    "load_checkpoint",
    "load_file",
    "load_for_rank",
    "load_model",
    "load_optimizer",
    "load_shard",
    "model_from_weights",
    "one_writer",
    "optimizer_to_canonical",
    "prune",
    "read_meta",
    "read_pointer",
    "resolve",
    "restore",
    "safe_load",
    "save_step",
    "sha256_file",
    "shard_files",
    "shard_name",
    "single_layout",
    "single_process_files",
    "step_dirs",
    "verify",
    "versions",
    "write_step_dir",
]
