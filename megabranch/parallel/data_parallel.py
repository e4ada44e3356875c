"""Data parallelism: SUM all-reduce of gradients over the data-parallel group, in flat buckets, overlapped with
the backward pass.

The engine normalises the loss by the GLOBAL token count, so the gradients are summed, never averaged.

    reducer = GradReducer(stage.parameters(), grid.dp_group)
    for i, mb in enumerate(micro_batches):
        if i == len(micro_batches) - 1:
            reducer.arm()                 # only the last backward launches all-reduces as buckets fill
        loss(mb).backward()
    reducer.finish()                      # launch what is left, wait, copy the sums back into .grad
    clip / optimizer.step() / zero_grad

Correctness never depends on arm(): finish() reduces every bucket that was not launched during the backward
(so forgetting arm() only loses the overlap, and a parameter that got no gradient on some rank cannot
deadlock). Buckets are launched strictly in bucket order on every rank, so the collectives match across ranks
even when gradients become ready in a different order.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class _Bucket:
    def __init__(self, params: list, dtype, device):
        self.params = params
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel, self.dtype, self.device = n, dtype, device
        self.buffer = None
        self.ready: set[int] = set()
        self.work = None
        self.launched = False

    def slot(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i] : self.offsets[i] + p.numel()].view_as(p)


class GradReducer:
    """Sum-all-reduce the .grad of `params` over `group` (None: a data-parallel size of 1, a no-op).

    bucket_mb: flat bucket size in MiB (parameters are bucketed in reverse registration order, the order in which
    a backward pass usually produces their gradients; one bucket per dtype/device run). overlap=False: no hooks,
    everything happens in finish(). After finish(), every parameter has a .grad (zeros where no rank produced one).
    """

    def __init__(self, params, group=None, bucket_mb: float = 25.0, overlap: bool = True):
        seen, plist = set(), []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                plist.append(p)
        self.params = plist
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.overlap = overlap
        self.armed = False
        self._hooks = []
        self._where: dict[int, tuple[int, int]] = {}
        self.buckets: list[_Bucket] = []
        cap = max(1, int(bucket_mb * 2**20))
        current, size = [], 0
        for p in reversed(plist):
            key = (p.dtype, p.device)
            if current and ((current[0].dtype, current[0].device) != key or size + p.numel() * p.element_size() > cap):
                self._close(current)
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self._close(current)
        self._next = 0  # the next bucket to launch (launch order = bucket order, on every rank)
        if overlap and self.size > 1:
            for p in plist:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _close(self, params: list) -> None:
        b = len(self.buckets)
        for i, p in enumerate(params):
            self._where[id(p)] = (b, i)
        self.buckets.append(_Bucket(params, params[0].dtype, params[0].device))

    # --- arming ------------------------------------------------------------------------------------------

    def arm(self) -> None:
        """Launch all-reduces from the NEXT backward as buckets fill (call before the last micro-batch's
        backward). Disarmed again by finish()."""
        self.armed = self.overlap and self.size > 1

    def disarm(self) -> None:
        self.armed = False

    @contextlib.contextmanager
    def sync(self, enabled: bool = True):
        """`with reducer.sync(is_last_micro_batch): loss.backward()` arms for that backward only if enabled."""
        previous = self.armed
        if enabled:
            self.arm()
        else:
            self.armed = False
        try:
            yield
        finally:
            if not enabled:
                self.armed = previous

    # --- hooks and launching -----------------------------------------------------------------------------

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        b, i = self._where[id(p)]
        bucket = self.buckets[b]
        if bucket.launched:
            raise RuntimeError(
                "a parameter received a gradient after its bucket was all-reduced: arm() only before the LAST "
                "backward of the step, and call finish() before the next step's backward"
            )
        if bucket.buffer is None:
            bucket.buffer = torch.zeros(bucket.numel, dtype=bucket.dtype, device=bucket.device)
        bucket.slot(i).copy_(p.grad)
        bucket.ready.add(i)  # a set: a second gradient for p before the launch just refreshes its slot
        while self._next < len(self.buckets):
            nxt = self.buckets[self._next]
            if len(nxt.ready) < len(nxt.params):
                break
            self._launch(nxt, copied=True)
            self._next += 1

    def _launch(self, bucket: _Bucket, copied: bool) -> None:
        if bucket.buffer is None:
            bucket.buffer = torch.zeros(bucket.numel, dtype=bucket.dtype, device=bucket.device)
        if not copied:
            for i, p in enumerate(bucket.params):
                if p.grad is None:
                    bucket.slot(i).zero_()
                else:
                    bucket.slot(i).copy_(p.grad)
        bucket.launched = True
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def finish(self) -> None:
        """Launch every bucket not yet launched (in order), wait for all, write the sums into each .grad."""
        self.armed = False
        if self.size == 1:
            return
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            # not launched by the hooks (not armed, or some parameter got no gradient here): copy every slot now
            self._launch(b, copied=False)
            self._next += 1
        for b in self.buckets:
            b.work.wait()
            for i, p in enumerate(b.params):
                if p.grad is None:
                    p.grad = b.slot(i).clone()
                else:
                    p.grad.copy_(b.slot(i))
            b.work, b.launched, b.ready = None, False, set()
        self._next = 0

    reduce = finish

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __repr__(self) -> str:
        return (f"GradReducer({len(self.params)} params in {len(self.buckets)} buckets, dp={self.size}, "
                f"overlap={self.overlap})")
