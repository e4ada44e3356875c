"""Writing step directories so that a kill at any moment leaves a loadable checkpoint.

Publication: every rank writes into `step_<N>.tmp-<id>`; the ranks then exchange their files' sha256 (which
is the barrier: rank 0 goes on only when every rank has finished writing), rank 0 writes meta.json, renames the
directory to step_<N>, then rewrites `latest` (and `best`) atomically, last. A kill at any moment leaves
`latest` pointing at a complete step directory; stale `.tmp-*` directories are removed by the next save (never
one whose writer is alive). keep-last-K cleanup never removes what `latest` or `best` point to. A write that
fails on any rank (a full disk, a read-only or vanished filesystem: space.py) is one SaveFailed on every rank,
the same line everywhere (the failure travels with the sha exchange), with the step's temporary directory removed
and the previous checkpoint as it was.

save_step is three steps, each its own function: _open_step (rank 0 clears a killed save's leftovers and makes
the temporary directory), _write_files (this rank's shards, shard_format.py), _finish_step (the sha exchange,
meta.json, rename, pointers, pruning). The collective parts run over `group` (default: the whole job), so a
background save (async_save.py) can run them on a process group of its own.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from .. import __version__
from ..errors import UserError
from . import space
from .reading import FORMAT_VERSION, META, read_pointer, step_dirs
from .shard_format import write_shard


class SaveFailed(UserError):
    """A checkpoint that could not be written (space.write_failure): nothing of it was published and the previous
    one is untouched. `reason` is the line without the advice that follows it."""

    def __init__(self, reason: str, advice: str = space.RESUME_ADVICE):
        super().__init__(f"{reason}; {advice}")
        self.reason = reason


def _dist_world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` fills a temporary file next to `path`, which is then fsynced and renamed over `path`:
    readers see the old or the new file, never a part of one."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write to a temporary file next to `path`, fsync, rename over it: readers see the old or the new file."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def versions() -> dict:
    return {"torch": torch.__version__, "megabranch": __version__}


def write_step_dir(final: str, files: dict, meta: dict) -> str:
    """Write a complete step directory from one process (converters, averaging): files name -> object."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    written = _write_or_fail(tmp, files)
    error = written["error"] or _publish_or_fail(
        parent, tmp, final, dict(meta, files=written["files"], holds=written["holds"]), pointers=()
    )
    if error:  # a full disk, a read-only filesystem: one line, nothing left behind (as save_step)
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(error, space.WRITE_ADVICE)
    return final


def _write_files(tmp: str, files: dict) -> dict:
    """This rank's shards (name -> shard object) into `tmp` -> {"files": {file: sha256}, "holds": {shard name:
    its parameter names}} (the holds of tensor-parallel rank 0's shards go into meta.json: a reader finds where a
    parameter lives without opening every shard)."""
    shas, holds = {}, {}
    for name, obj in files.items():
        shas.update(write_shard(tmp, name, obj))
        if obj.get("model") is not None and name.startswith("shard_tp0_"):
            holds[name] = list(obj["model"])
    return {"files": shas, "holds": holds}


def _publish(tmp: str, final: str, meta: dict) -> None:
    meta = dict(meta, format=FORMAT_VERSION, versions=versions())
    atomic_write_bytes((json.dumps(meta, indent=1, sort_keys=True) + "\n").encode(), os.path.join(tmp, META))
    parent, base = os.path.dirname(os.path.abspath(final)), os.path.basename(final)
    old, repoint = None, []
    if os.path.exists(final):  # the same step saved again (a resume from an older step): replace it
        # pointers naming it are moved to the complete new copy first, so none ever dangles
        repoint = [n for n in ("latest", "best") if read_pointer(parent, n) == base]
        for n in repoint:
            _set_pointer(parent, n, os.path.basename(tmp))
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(parent)
    for n in repoint:
        _set_pointer(parent, n, base)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_step(
    save_dir: str, step: int, files: dict, meta: dict, is_best: bool = False, keep_last: int = 0, group=None
) -> str:
    """Collective over `group` (default: the whole job) when torch.distributed is initialised: every rank
    passes its own shards (name -> shard object, possibly none). Returns the published step directory."""
    tmp = _open_step(save_dir, step, group)
    return _finish_step(save_dir, step, tmp, _write_or_fail(tmp, files), meta, is_best, keep_last, group)


def _open_step(save_dir: str, step: int, group=None) -> str:
    """Collective: rank 0 removes a killed save's leftovers and makes step_<N>.tmp-<pid> -> its path, on every
    rank (or the same SaveFailed everywhere when it cannot)."""
    rank, world = _dist_world(group)
    names = [None, None]  # the temporary directory, or why it could not be made
    if rank == 0:
        tmp = f"{os.path.join(save_dir, f'step_{step}')}.tmp-{os.getpid()}"
        try:
            os.makedirs(save_dir, exist_ok=True)
            pointed = {read_pointer(save_dir, "latest"), read_pointer(save_dir, "best")}
            for stale in glob.glob(os.path.join(save_dir, "step_*.tmp-*")) + glob.glob(
                os.path.join(save_dir, "step_*.old-*")
            ):
                # a killed save's leftovers (never what a pointer names, never a live writer's)
                if os.path.basename(stale) not in pointed and not _writer_alive(stale):
                    shutil.rmtree(stale, ignore_errors=True)
            os.makedirs(tmp)
            names[0] = tmp
        except OSError as e:
            names[1] = space.write_failure(tmp, e)
    if world > 1:
        dist.broadcast_object_list(names, src=_global_rank0(group), group=group)
    if names[1]:
        raise SaveFailed(names[1])
    return names[0]


def _global_rank0(group) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


def _finish_step(
    save_dir: str, step: int, tmp: str, mine: dict, meta: dict, is_best: bool, keep_last: int, group=None
) -> str:
    """Collective: the sha exchange (the barrier: nobody gets past it before every rank has written), then rank 0
    publishes the directory and moves the pointers; a last barrier so no rank starts the next save early."""
    rank, world = _dist_world(group)
    final = os.path.join(save_dir, f"step_{step}")
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, mine, group=group)
    else:
        gathered = [mine]
    failed = [part["error"] for part in gathered if part.get("error")]
    if failed:  # a write failed on some rank: nothing is published, every rank says so
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(failed[0])
    outcome = [None]
    if rank == 0:
        shas, holds = {}, {}
        for part in gathered:
            shas.update(part["files"])
            holds.update(part["holds"])
        outcome = [
            _publish_or_fail(
                save_dir,
                tmp,
                final,
                dict(meta, step=step, files=shas, holds=holds),
                ("latest", "best") if is_best else ("latest",),
            )
        ]
        if outcome[0]:
            shutil.rmtree(tmp, ignore_errors=True)
        elif keep_last > 0:
            _prune_after_save(save_dir, keep_last)
    if world > 1:
        dist.broadcast_object_list(outcome, src=_global_rank0(group), group=group)  # rank 0's outcome
        dist.barrier(group=group)
    if outcome[0]:
        raise SaveFailed(outcome[0])
    return final


def _write_or_fail(tmp: str, files: dict) -> dict:
    """_write_files, or when the disk is (or would be) full, or the filesystem refuses the write, no files and
    the one-line reason under "error"."""
    need = space.payload_bytes(files)
    short = space.shortfall(tmp, need)
    if short is None:
        try:
            return dict(_write_files(tmp, files), error=None)
        except Exception as e:  # safetensors reports ENOSPC as its own error type
            short = space.write_failure(tmp, e, need)
            if short is None:
                raise
    return {"files": {}, "holds": {}, "error": short}


def _publish_or_fail(save_dir: str, tmp: str, final: str, meta: dict, pointers: tuple) -> str | None:
    """meta.json, the rename, then the `pointers` ("latest", "best") of save_dir -> None, or the one-line reason
    they could not be written (the caller removes `tmp`)."""
    try:
        _publish(tmp, final, meta)
        for name in pointers:
            _set_pointer(save_dir, name, os.path.basename(final))
    except Exception as e:  # see _write_or_fail
        reason = space.write_failure(save_dir, e)
        if reason is None:
            raise
        return reason
    return None


def _prune_after_save(save_dir: str, keep_last: int) -> None:
    """prune(), after a published save: a filesystem that refuses the deletion leaves old checkpoints (said in
    one line), never fails the save that is already published."""
    try:
        prune(save_dir, keep_last)
    except OSError as e:
        print(f"warning: could not remove old checkpoints of {save_dir}: {e.strerror or e}", file=sys.stderr)


def _writer_alive(path: str) -> bool:
    """Whether the process named by a `.tmp-<pid>` / `.old-<pid>` suffix is alive on this host (and not this
    one): its directory may still be being written. A reused pid only keeps a leftover a little longer."""
    try:
        pid = int(path.rsplit("-", 1)[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _set_pointer(save_dir: str, name: str, target: str) -> None:
    atomic_write_bytes((target + "\n").encode(), os.path.join(save_dir, name))


def prune(save_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` step directories, never one that `latest` or `best` names."""
    protected = {read_pointer(save_dir, "latest"), read_pointer(save_dir, "best")}
    removed = []
    for _, path in step_dirs(save_dir)[:-keep_last]:
        if os.path.basename(path) not in protected:
            # renamed first (atomic), so a kill during the deletion never leaves a half-deleted step_<N>
            doomed = f"{path}.old-{os.getpid()}"
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            removed.append(path)
    return removed
