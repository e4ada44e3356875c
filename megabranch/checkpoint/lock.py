"""One writer per save directory: an exclusive flock on `<save_dir>/run.lock`, held for the run's life.

The lock file says who holds it ("pid <n> host <name> since <time>"); a second run is refused with that line.
The kernel drops a flock when its process dies, however it dies, so the lock of a killed run is simply taken
over by the next one (which says so: the file still names the dead holder). The file itself is never deleted:
deleting a lock file lets two processes each lock a different inode of the same name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time

import torch.distributed as dist

from ..errors import UserError

LOCK_NAME = "run.lock"
# filesystems without flock (Lustre mounted without -o flock, some FUSE mounts) answer with one of these
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _unusable(save_dir: str, e: OSError) -> str:
    """The one line saying why save_dir cannot be created or written (a regular file on its path, a read-only
    filesystem, no permission)."""
    blocker = save_dir
    while blocker and not os.path.exists(blocker):
        blocker = os.path.dirname(blocker.rstrip(os.sep))
    if blocker and not os.path.isdir(blocker):
        why = f"{blocker} is a file, not a directory"
    else:
        why = e.strerror or str(e)
    return f"log.save_dir={save_dir} cannot be created or written: {why}; set log.save_dir to a writable directory"


def _holder_line() -> str:
    return f"pid {os.getpid()} host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


class SaveDirLock:
    """The flock of one save directory. acquire() -> a note when a dead run's lock was taken over (else None);
    a UserError naming the holder when a live process holds it."""

    def __init__(self, save_dir: str):
        self.save_dir, self.path, self.fd = save_dir, os.path.join(save_dir, LOCK_NAME), None

    def acquire(self) -> str | None:
        try:
            os.makedirs(self.save_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(_unusable(self.save_dir, e)) from None
        if not os.access(self.save_dir, os.W_OK | os.X_OK):  # the lock file may be writable, its directory not
            os.close(fd)
            raise UserError(_unusable(self.save_dir, PermissionError(errno.EACCES, os.strerror(errno.EACCES))))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "a process that has not written its name yet"
            os.close(fd)
            raise UserError(
                f"{self.save_dir} is in use by another run ({holder}); one run writes a save directory "
                "at a time: wait for it to end or set log.save_dir elsewhere"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _UNSUPPORTED:
                raise
            return (
                f"warning: {self.path}: this filesystem does not support flock ({e.strerror}); nothing stops "
                "a second run from writing the same save directory"
            )
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_line().encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if previous:  # the holder's name is cleared on release: this one died holding the lock
            return f"{self.save_dir}: took over the lock of a run that is no longer running ({previous})"
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextlib.contextmanager
def one_writer(save_dir: str):
    """Hold save_dir's lock for the duration of the block. Collective when torch.distributed is initialised:
    global rank 0 takes the lock, and every rank raises the same UserError when another run holds it."""
    initialised = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if initialised else 0
    lock, outcome = None, [None]
    if rank == 0:
        lock = SaveDirLock(save_dir)
        try:
            note = lock.acquire()
        except UserError as e:
            outcome = [str(e)]
        else:
            if note:
                print(note, file=sys.stderr)
    if initialised and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise UserError(outcome[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
