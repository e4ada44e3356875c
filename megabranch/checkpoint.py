"""Checkpoints: atomic writes, safe loading, keep-last-K.

Everything saved is plain tensors, numbers, strings, lists and dicts, so loading uses
`torch.load(weights_only=True)` and a checkpoint can never execute code. A write goes to a temporary file in
the same directory, is fsynced, then renamed over the target: a crash mid-write leaves the old file intact.
"""

from __future__ import annotations

import glob
import os
import re

import torch

from .errors import UserError

FORMAT_VERSION = 1


def atomic_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str) -> dict:
    """Load a checkpoint file safely; any problem is a one-line UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle with code, bit rot: all the file's fault
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot load checkpoint {path} (corrupt, truncated or not a megabranch checkpoint): {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "model" not in state:
        raise UserError(f"{path} is not a megabranch checkpoint (format {FORMAT_VERSION})")
    return state


def step_path(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"checkpoint_{step}.pt")


def save(state: dict, save_dir: str, step: int, is_best: bool, keep_last: int) -> str:
    """Write checkpoint_<step>.pt, then checkpoint_last.pt (and checkpoint_best.pt); prune old step files."""
    state = dict(state, format=FORMAT_VERSION)
    path = step_path(save_dir, step)
    atomic_save(state, path)
    atomic_save(state, os.path.join(save_dir, "checkpoint_last.pt"))
    if is_best:
        atomic_save(state, os.path.join(save_dir, "checkpoint_best.pt"))
    if keep_last > 0:
        for old in step_checkpoints(save_dir)[:-keep_last]:
            os.remove(old)
    return path


def step_checkpoints(save_dir: str) -> list[str]:
    """checkpoint_<N>.pt files sorted by N."""
    found = []
    for p in glob.glob(os.path.join(save_dir, "checkpoint_*.pt")):
        m = re.fullmatch(r"checkpoint_(\d+)\.pt", os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def average(paths: list[str]) -> dict:
    """fairseq's average_checkpoints: the mean of the model weights of several checkpoints (the last one's rest)."""
    if not paths:
        raise UserError("no checkpoints to average")
    states = [load(p) for p in paths]
    keys = states[0]["model"].keys()
    for p, s in zip(paths, states):
        if s["model"].keys() != keys:
            raise UserError(f"{p} has different parameters than {paths[0]}; cannot average")
    avg = {}
    for k in keys:
        t = states[0]["model"][k]
        if t.is_floating_point():
            avg[k] = (sum(s["model"][k].double() for s in states) / len(states)).to(t.dtype)
        else:
            avg[k] = t
    out = dict(states[-1], model=avg)
    out.pop("optimizer", None)
    return out
