"""The whole model on global rank 0, gathered from a tensor x pipeline x data-parallel grid: what the parallel
engine decodes its validation BLEU with.

Decoding needs every layer in one process (beam search runs the decoder once per token). So at a validation,
when the whole model fits on rank 0 (`fits_on_rank0`: twice its fp32 parameter bytes free there, for the
received slices plus the model built from them), each data-parallel-rank-0 process sends its parameters (this
layout's tensor-parallel slices, by single-process name) to rank 0 in one flat message, rank 0 concatenates the
slices by the split table checkpoints record (parallelize.split_info) and builds the single-process model on its
device. Nothing is written to disk and no other rank holds more than it did. When the model does not fit (a
1000-layer model over many GPUs), the validation logs no BLEU and says so once; decode a saved step directory
with `megabranch-generate` on a machine that holds the model instead (docs/design.md, "Validation BLEU").
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..model import count_parameters, meta_model
from .grid import coords
from .parallelize import split_info


def full_model_bytes(cfg_model, vocab: int, tgt_vocab: int) -> int:
    """fp32 bytes of the single-process model's parameters (counted on the meta device: nothing allocated)."""
    return 4 * count_parameters(meta_model(cfg_model, vocab, tgt_vocab))


def free_memory_bytes(device: torch.device) -> int:
    """What could still be allocated on `device`: free CUDA memory plus the allocator's cached-but-unused
    blocks, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def fits_on_rank0(need_bytes: int, free_bytes: int) -> bool:
    """The gather needs the received slices and the model built from them at once: twice the model."""
    return 2 * need_bytes <= free_bytes


def gather_to_rank0(params: dict, grid, device: torch.device) -> dict | None:
    """Collective over the world. params: this rank's parameters by single-process name (tensor-parallel slices)
    -> on global rank 0 the full single-process tensors by name, on every other rank None. Only data-parallel
    rank 0 of each (tp, pp) position sends (the replicas hold the same values); a tied table held by several
    stages is taken from the first."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = None
    if grid.dp_rank == 0:
        mine = {
            "split": split_info(params),
            "shapes": [(n, tuple(p.shape)) for n, p in params.items()],
            "dtype": str(next(iter(params.values())).dtype).replace("torch.", ""),
        }
    if world == 1:
        metas = [mine]
    else:
        metas = [None] * world if grid.rank == 0 else None
        dist.gather_object(mine, metas, dst=0)
    if grid.rank != 0:
        if mine is not None:
            dist.send(torch.cat([p.detach().reshape(-1) for p in params.values()]), dst=0)
        return None
    pieces: dict = {}
    split: dict = {}
    for src, meta in enumerate(metas):
        if meta is None:
            continue
        tp_rank = coords(src, grid.tp, grid.dp)[0]
        split.update(meta["split"])
        if src == 0:
            tensors = {n: p.detach() for n, p in params.items()}
        else:
            total = sum(torch.Size(shape).numel() for _, shape in meta["shapes"])
            flat = torch.empty(total, dtype=getattr(torch, meta["dtype"]), device=device)
            dist.recv(flat, src=src)
            views = flat.split([torch.Size(shape).numel() for _, shape in meta["shapes"]])
            tensors = {n: v.view(shape) for (n, shape), v in zip(meta["shapes"], views)}
        for name, t in tensors.items():
            pieces.setdefault(name, {}).setdefault(tp_rank, t)
    return merge_slices(pieces, split)


def merge_slices(pieces: dict, split: dict) -> dict:
    """name -> {tp_rank: slice} -> name -> full tensor, by split_info's table ([split dim (-1: not
    split), *full shape]), as the slices are concatenated when a step directory is consolidated."""
    out = {}
    for name, by_tp in pieces.items():
        dim = split[name][0]
        if dim < 0 or len(by_tp) == 1 and tuple(next(iter(by_tp.values())).shape) == tuple(split[name][1:]):
            out[name] = next(iter(by_tp.values()))
        else:
            out[name] = torch.cat([by_tp[t] for t in sorted(by_tp)], dim=dim)
    return out
