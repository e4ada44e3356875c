"""A full disk during a save: what a rank's files need, whether the filesystem has it, and the one-line error
that says so (naming the path, the bytes needed and the bytes free)."""

from __future__ import annotations

import errno
import os

import torch

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def payload_bytes(obj) -> int:
    """The tensor bytes in a nest of dicts / lists / tuples (each storage once): about what torch.save writes."""
    seen, total, todo = set(), 0, [obj]
    while todo:
        x = todo.pop()
        if torch.is_tensor(x):
            storage = x.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return total


def free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


# how writers that do not raise OSError say it (safetensors: "I/O error: No space left on device (os error 28)")
_DISK_FULL_TEXT = tuple(os.strerror(n) for n in DISK_FULL) + tuple(f"os error {n})" for n in DISK_FULL)


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or what it was raised while handling (torch.save's zip writer raises its own RuntimeError on
    the way out of a failed write), is a full disk or an exceeded quota."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        if any(text in str(e) for text in _DISK_FULL_TEXT):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


# what the user can do, after the line that says what happened: a training save, or a step directory written once
RESUME_ADVICE = "the previous checkpoint is untouched: free some space or set log.save_dir elsewhere, then --resume"
WRITE_ADVICE = "nothing was written: free some space or write elsewhere"


def disk_full_message(path: str, need: int | None, advice: str = RESUME_ADVICE) -> str:
    """need: the bytes this rank's files take (None: only small metadata was left to write)."""
    free = free_bytes(path)
    parts = ([f"this rank's files need about {_mb(need)}"] if need is not None else []) + \
        ([f"{_mb(free)} free"] if free is not None else [])
    return f"no space left on the device of {path} while saving a checkpoint ({', '.join(parts)}); {advice}"


def shortfall(directory: str, need: int, advice: str = RESUME_ADVICE) -> str | None:
    """The disk-full message when `directory`'s filesystem has less than `need` bytes free, else None."""
    free = free_bytes(directory)
    if free is not None and free < need:
        return disk_full_message(directory, need, advice)
    return None
