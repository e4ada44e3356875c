"""safetensors files (the consolidated model for inference), read and written with the `safetensors` package.

Reads are memory-mapped (copy-on-write): the tensors returned are views of the file's pages, read when
touched, so loading a model costs no second copy of it in memory. Writes publish atomically (a temporary file
next to the destination, fsynced, renamed over it; checkpoint.atomic_write). Files written by megabranch's
earlier hand-written codec have the same header and load unchanged.
"""

from __future__ import annotations

import os

import safetensors
from safetensors.torch import save_file

from .. import checkpoint
from ..errors import UserError


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """Write `tensors` (name -> tensor) and string `metadata` to `path`, replacing it atomically."""
    own, storages = {}, set()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()  # the package refuses tensors that share memory (e.g. a tied table under two names)
        storages.add(t.untyped_storage().data_ptr())
        own[name] = t
    meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    checkpoint.atomic_write(path, lambda tmp: save_file(own, tmp, metadata=meta))


def load_safetensors(path: str) -> tuple[dict, dict]:
    """-> (tensors, metadata), the tensors memory-mapped; a malformed file is a one-line UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"safetensors file not found: {path}")
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path} is not a valid safetensors file: {first}") from None
    return tensors, meta
