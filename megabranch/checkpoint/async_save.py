"""Saving in the background: training stalls only for the copy of this rank's state into host memory.

    saver = AsyncSaver()
    saver.save(save_dir, step, snapshot(files), meta, ...)   # waits for the previous save, then returns at once
    saver.wait()                                             # the end of the run: everything published

A save is the same publication as publication.save_step (tmp dir, sha exchange, rename, pointers last), run in
a daemon thread. Its collective parts (the tmp-name broadcast, the sha exchange, the last barrier) run on a
process group of their own (`publication_group`, gloo, made once by every rank from the main thread), never on
the group training uses: two threads issuing collectives on one group could interleave them differently on
different ranks and deadlock; on separate groups each keeps its own order. At most one save is in flight: the
next one (and the end of the run) first waits for it, and a failure in the background is raised there. A kill
at any moment leaves `latest` at the last complete step directory, as for a synchronous save.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from .publication import save_step


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in host memory that training cannot change (pinned when it comes from a GPU)."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def snapshot(node):
    """A shard-object tree with every tensor that is not already a host copy moved to host memory."""
    if torch.is_tensor(node):
        return node if node.device.type == "cpu" else host_copy(node)
    if isinstance(node, dict):
        return {k: snapshot(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(snapshot(v) for v in node)
    return node


def publication_group(timeout_s: float | None = None):
    """Collective (every rank, main thread, in the same order): a gloo group over the whole job for the
    publication of background saves, its waits bounded by timeout_s (parallel.timeout_s; None: torch's default);
    None when there is one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=None if timeout_s is None else timedelta(seconds=timeout_s))


class AsyncSaver:
    """One background save at a time over a publication group of its own."""

    def __init__(self, timeout_s: float | None = None):
        self.timeout_s = timeout_s
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._group = None
        self._made_group = False

    def save(
        self, save_dir: str, step: int, files: dict, meta: dict, is_best: bool = False, keep_last: int = 0
    ) -> None:
        """Collective. Wait for the previous save, then publish `files` (already a host snapshot) in the background."""
        self.wait()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned copies of snapshot() have landed
        if not self._made_group:
            self._group, self._made_group = publication_group(self.timeout_s), True

        def run():
            try:
                save_step(save_dir, step, files, meta, is_best, keep_last, group=self._group)
            except BaseException as e:  # raised in the main thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name=f"megabranch-save-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight (if any) is published; re-raise its failure here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
