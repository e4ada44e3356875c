"""A save that cannot be written: a full disk (what a rank's files need, whether the filesystem has it), a quota,
a read-only or vanished filesystem, no permission; the one line that says which (naming the path and, for a full
disk, the bytes needed and the bytes free)."""

from __future__ import annotations

import errno
import os
import re

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
_OS_ERROR_TEXT = re.compile(r"I/O error: (.+?) \(os error \d+\)")


def _chain(e: BaseException | None):
    """`e` and what it was raised while handling (torch.save's zip writer raises its own RuntimeError on the way
    out of a failed write)."""
    seen = set()
    while e is not None and id(e) not in seen:
        yield e
        seen.add(id(e))
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or what it was raised while handling, is a full disk or an exceeded quota."""
    return any(
        (isinstance(x, OSError) and x.errno in DISK_FULL) or any(t in str(x) for t in _DISK_FULL_TEXT)
        for x in _chain(e)
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


# what the user can do, after the line that says what happened: a training save, or a step directory written once
RESUME_ADVICE = "the previous checkpoint is untouched: free some space or set log.save_dir elsewhere, then --resume"
WRITE_ADVICE = "nothing was written: free some space or write elsewhere"


def disk_full_reason(path: str, need: int | None) -> str:
    """need: the bytes this rank's files take (None: only small metadata was left to write)."""
    free = free_bytes(path)
    parts = ([f"this rank's files need about {_mb(need)}"] if need is not None else []) + (
        [f"{_mb(free)} free"] if free is not None else []
    )
    return f"no space left on the device of {path} while saving a checkpoint ({', '.join(parts)})"


def write_failure(path: str, e: BaseException, need: int | None = None) -> str | None:
    """Why writing under `path` failed, when it is the filesystem's doing (a full disk or quota; a read-only,
    unreachable or vanished filesystem; no permission: an OSError, or a writer's own error that carries one), else
    None (a bug: let it raise). need: as disk_full_reason."""
    if is_disk_full(e):
        return disk_full_reason(path, need)
    for x in _chain(e):
        if isinstance(x, OSError):
            return f"cannot write {x.filename or path} while saving a checkpoint: {x.strerror or x}"
        found = _OS_ERROR_TEXT.search(str(x))
        if found:
            return f"cannot write {path} while saving a checkpoint: {found.group(1)}"
    return None


def shortfall(directory: str, need: int) -> str | None:
    """The disk-full reason when `directory`'s filesystem has less than `need` bytes free, else None."""
    free = free_bytes(directory)
    if free is not None and free < need:
        return disk_full_reason(directory, need)
    return None
