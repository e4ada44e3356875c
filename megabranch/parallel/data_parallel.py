"""Data parallelism: SUM all-reduce of gradients over the data-parallel group, in flat buckets, overlapped with
the backward pass. The gradients live IN the buckets: every reduced parameter's `.grad` is a view of its slot
(Megatron-core's `main_grad`, DDP's gradient_as_bucket_view), so autograd accumulates into the bucket and the
all-reduce sums in place: no copy in, no copy out, no second gradient buffer.

The engine normalises the loss by the GLOBAL token count, so the gradients are summed, never averaged.

    reducer = GradReducer(stage.parameters(), grid.dp_group)   # dp > 1: buckets allocated, .grad = views
    for i, mb in enumerate(micro_batches):
        if i == len(micro_batches) - 1:
            reducer.arm()                 # only the last backward launches all-reduces as buckets fill
        loss(mb).backward()               # AccumulateGrad adds into the views (in place)
    reducer.finish()                      # launch what is left, wait: the sums are in .grad
    clip / optimizer.step()
    reducer.zero_grad()                   # one fill_ per bucket; never optimizer.zero_grad(set_to_none=True)

Why the views hold: autograd's AccumulateGrad adds a new gradient into an existing .grad IN PLACE
(`variable_grad += new_grad`) unless the backward records a graph (create_graph=True) or a gradient is sparse;
that holds for loss.backward() and torch.autograd.backward(outputs, grads) alike. finish() checks that every
.grad is still its view and says so if not (a .grad set to None or replaced would otherwise be silently lost).

Correctness never depends on arm(): finish() reduces every bucket that was not launched during the backward
(so forgetting arm() only loses the overlap, and a parameter that got no gradient on some rank cannot
deadlock: its slot holds zeros). Buckets are launched strictly in bucket order on every rank, so the
collectives match across ranks even when gradients become ready in a different order.

Data-parallel size 1 (group None): no buckets, no views, no hooks; `.grad` is autograd's own tensor as in one
process, and zero_grad() sets it to None. Either way each parameter's gradient exists once (gradient_bytes).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def assign_buckets(params: list, bucket_mb: float) -> list[list]:
    """Split `params` into buckets of at most bucket_mb MiB, in reverse order (the order in which a backward pass
    usually produces their gradients), a new bucket wherever dtype or device changes."""
    cap = max(1, int(bucket_mb * 2**20))
    buckets, current, size = [], [], 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if current and ((current[0].dtype, current[0].device) != (p.dtype, p.device) or size + nbytes > cap):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def gradient_bytes(params) -> int:
    """Bytes the gradients of `params` really occupy during a step: each parameter's gradient once, in its dtype.
    With dp > 1 that is exactly GradReducer's bucket buffers (the .grad are views into them), with dp == 1
    autograd's own .grad tensors (the memory plan's "grads" column)."""
    unique = {id(p): p for p in params if p.requires_grad}
    return sum(p.numel() * p.element_size() for p in unique.values())


class _Bucket:
    def __init__(self, params: list):
        self.params = params
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.buffer = torch.zeros(n, dtype=params[0].dtype, device=params[0].device)
        self.views = [self.buffer[o : o + p.numel()].view_as(p) for o, p in zip(self.offsets, params)]
        self.ready: set[int] = set()
        self.work = None
        self.launched = False

    def attach(self) -> None:
        """Make each parameter's .grad its slot, keeping a gradient it already has."""
        for p, v in zip(self.params, self.views):
            if p.grad is not None and p.grad is not v:
                v.copy_(p.grad)
            p.grad = v


class GradReducer:
    """Sum-all-reduce the .grad of `params` over `group` (None: a data-parallel size of 1, a no-op).

    bucket_mb: flat bucket size in MiB (see assign_buckets). overlap=False: no hooks, everything happens in
    finish(). With dp > 1 the buckets are allocated here and every .grad becomes a view of its slot; after
    finish() every parameter's .grad holds the sum (zeros where no rank produced a gradient).
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
        if self.size == 1:
            return
        for b, members in enumerate(assign_buckets(plist, bucket_mb)):
            for i, p in enumerate(members):
                self._where[id(p)] = (b, i)
            self.buckets.append(_Bucket(members))
            self.buckets[-1].attach()
        self._next = 0  # the next bucket to launch (launch order = bucket order, on every rank)
        if overlap:
            for p in plist:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def allocated_bytes(self) -> int:
        """Bytes of the bucket buffers (the gradients themselves when dp > 1; 0 when dp == 1)."""
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)

    # --- arming ------------------------------------------------------------------------------------------

    def arm(self, ready=()) -> None:
        """Launch all-reduces from the NEXT backward as buckets fill (call before the last micro-batch's
        backward). Disarmed again by finish(). `ready`: parameters whose gradients are already final (a split
        backward arms before its last W, after the B that gave the other parameters their last gradient);
        buckets they complete launch now, parameters of other reducers are ignored."""
        self.armed = self.overlap and self.size > 1
        if self.armed:
            for p in ready:
                if id(p) in self._where:
                    self._on_grad(p)

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

    def _detached(self, p: torch.Tensor) -> RuntimeError:
        return RuntimeError(
            f"a parameter's .grad ({tuple(p.shape)}) is no longer its GradReducer bucket view (set to None, "
            "replaced, or accumulated out of place by create_graph=True): zero gradients with reducer.zero_grad(), "
            "not optimizer.zero_grad(set_to_none=True) or model.zero_grad()"
        )

    def _on_grad(self, p: torch.Tensor) -> None:
        b, i = self._where[id(p)]
        bucket = self.buckets[b]
        if p.grad is not bucket.views[i]:
            raise self._detached(p)
        if not self.armed:
            return
        if bucket.launched:
            raise RuntimeError(
                "a parameter received a gradient after its bucket was all-reduced: arm() only before the LAST "
                "backward of the step, and call finish() before the next step's backward"
            )
        bucket.ready.add(i)  # a set: a second gradient for p before the launch just accumulated into its slot
        while self._next < len(self.buckets):
            nxt = self.buckets[self._next]
            if len(nxt.ready) < len(nxt.params):
                break
            self._launch(nxt)
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.launched = True
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def finish(self) -> None:
        """Launch every bucket not yet launched (in order) and wait for all: each .grad (a view) holds the sum."""
        self.armed = False
        if self.size == 1:
            return
        for b in self.buckets:
            for p, v in zip(b.params, b.views):
                if p.grad is not v:
                    raise self._detached(p)
        while self._next < len(self.buckets):  # not armed, or some parameter got no gradient here
            self._launch(self.buckets[self._next])
            self._next += 1
        for b in self.buckets:
            b.work.wait()
            b.work, b.launched, b.ready = None, False, set()
        self._next = 0

    reduce = finish

    def zero_grad(self) -> None:
        """Zero the gradients for the next step: one fill_ per bucket (the views stay attached); with dp == 1
        .grad = None, as optimizer.zero_grad(set_to_none=True) does."""
        if self.size == 1:
            for p in self.params:
                p.grad = None
            return
        for b in self.buckets:
            b.buffer.zero_()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __repr__(self) -> str:
        return (
            f"GradReducer({len(self.params)} params in {len(self.buckets)} buckets, dp={self.size}, "
            f"overlap={self.overlap})"
        )
