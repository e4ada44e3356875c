"""The pipeline executor: runs this rank's chunks over the micro-batches of one step with point-to-point messages,
in the order of an action list (megabranch.parallel.schedules).

A chunk is a slice of the model (megabranch.model.Transformer built for the chunk's span, see stage.py); what
the executor adds is the engine-specific part only: it feeds the chunk what the previous chunk sent, sends on
what the chunk returns, and on the last chunk computes the loss (vocabulary-parallel when the output is sharded
over tensor-parallel ranks). Every rank of a pipeline reads the same micro-batches, so every shape is known from
the batch and no shape is ever communicated; masks, decoder input tokens and targets are rebuilt from the
micro-batch on each rank (model/span.py lists what travels).

The encoder output travels with the decoder hidden through every decoder stage, and its gradient flows back the
same way: a decoder chunk adds its cross-attention contributions to the gradient it receives for memory and sends
the sum on. Sends are non-blocking; a receive blocks only when its data is needed; each sent activation's storage
is freed as soon as its send has completed (the autograd graph keeps only its metadata: no op at a chunk boundary
saves its own output). docs/design.md ("Parallel engine") says why this is our own loop and not
torch.distributed.pipelining's.

Under the zero-bubble schedules (zb-h1, zb-v) a chunk's backward is two actions: B, the backward with the
weight-gradient products left to a WeightGradStore (weight_grad.py; it sends the input gradients on, the encoder
output's included), and W, those products, later. Chunks next to each other on one rank (the V placement's turn)
hand their tensors over locally instead of through point-to-point messages.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model import label_smoothed_nll_loss
from ..model.span import Carried
from ..vocab import PAD
from .failures import wait_for
from .layout import Layout
from .schedules import schedule_actions, splits_backward
from .tensor_parallel import vocab_parallel_label_smoothed_nll_loss
from .weight_grad import WeightGradStore, defer_weight_grads

# what a point-to-point message carries (part of its tag): a chunk's output forward, the gradient of a chunk's
# input backward, or Admin's profiling pass (its output and the running ratios)
ACTIVATION, GRADIENT, PROFILE = 0, 1, 2


@dataclass
class MicroBatch:
    index: int
    src_tokens: torch.Tensor
    prev_tokens: torch.Tensor
    target: torch.Tensor
    ntokens: int
    seq_split: int = 1  # sequence parallelism: the hiddens hold 1/seq_split of each sequence (the tp size)
    key_mask: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.key_mask = self.src_tokens.ne(PAD)

    @classmethod
    def from_batch(cls, i: int, batch: dict, device, seq_split: int = 1) -> MicroBatch:
        """seq_split > 1: source and target padded to a multiple of it with padding tokens, which change nothing
        (masked keys, positions after every real one under causal attention, targets the loss ignores)."""
        src, prev, target = (
            _pad_to(batch[k].to(device), seq_split) for k in ("src_tokens", "prev_output_tokens", "target")
        )
        return cls(i, src, prev, target, int(batch["ntokens"]), seq_split)

    def shapes(self, span, incoming: bool, d: int, history: bool) -> list[tuple]:
        """The shapes of what `span` receives (incoming) or sends for this micro-batch (model/span.py); under
        sequence parallelism this rank's slice of each sequence."""
        b, s = self.src_tokens.shape
        k = self.seq_split
        return span.message_shapes(incoming, b, s // k, self.prev_tokens.shape[1] // k, d, history)


def _pad_to(tokens: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, L) tokens with PAD columns appended up to a multiple of `multiple` positions."""
    extra = -tokens.shape[1] % multiple
    return tokens if extra == 0 else torch.nn.functional.pad(tokens, (0, extra), value=PAD)


class _SendReaper:
    """Waits for non-blocking sends on a helper thread and, for a sent activation, frees its data the moment the
    send completes (the next stage has it). A thread, because gloo's send work only reports completion from
    wait(): polling is_completed() from the schedule loop would see nothing before the step ends; Work.wait()
    releases the GIL, so the schedule keeps running meanwhile."""

    def __init__(self, stats: dict):
        self.stats, self.error = stats, None
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="megabranch-send-reaper", daemon=True)
        self._thread.start()

    def put(self, work, tensor: torch.Tensor | None, peer: int) -> None:
        self._q.put((work, tensor, peer))

    def _loop(self) -> None:
        while True:
            work, t, peer = self._q.get()
            try:
                wait_for(work, peer)
                if t is not None:  # drop the data; autograd keeps the metadata, all backward(outputs) needs
                    self.stats["freed_bytes"] += t.untyped_storage().nbytes()
                    t.untyped_storage().resize_(0)
            except BaseException as e:  # re-raised on the main thread by drain()
                self.error = self.error or e
            finally:
                del work, t
                self._q.task_done()

    def drain(self) -> None:
        """Wait for every send of the step; raise what a send raised."""
        self._q.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise err


class PipelineExecutor:
    """Runs this rank's chunks over the micro-batches of one step with point-to-point messages."""

    def __init__(
        self,
        chunks: nn.ModuleList,
        layout: Layout,
        grid,
        kind: str,
        d_model: int,
        dtype: torch.dtype = torch.float32,
        label_smoothing: float = 0.0,
    ):
        self.chunks, self.layout, self.grid, self.kind = chunks, layout, grid, kind
        self.specs = layout.chunks_of_rank(grid.pp_rank)  # the layout's Chunk of each local slice
        self.d, self.dtype = d_model, dtype
        cfg = chunks[0].cfg
        self.history = cfg.residual == "dlcl"  # the hiddens that travel are DLCL's stacked histories
        self.label_smoothing = label_smoothing
        self.loss_group = grid.tp_group if grid.tp > 1 else None  # the output is vocabulary-parallel
        self.loss_fn = self.token_loss  # (last chunk's output, micro-batch) -> (loss_sum, nll_sum)
        first = next(iter(chunks.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.pp, self.vpp, self.k = layout.pp, layout.vpp, layout.num_chunks
        self.ranks = [c.rank for c in layout.chunks]  # pipeline rank of each chunk (the layout's placement)
        # callback(v, ready) right before the last gradient work of chunk v in a step: the backward of the last
        # micro-batch, or under a split schedule its W; `ready` = the parameters whose gradients are already final
        self.on_last_backward: Callable[[int, Any], None] | None = None
        # callback(op, v, i) right before each action of a step, and ("end", None, None) after the last: where a
        # step is, for observers such as the rehearsal's memory timeline (planning/rehearsal.py)
        self.on_action = None
        self.split = splits_backward(kind)
        self.weight_grads = WeightGradStore()
        if self.split:
            defer_weight_grads(chunks, self.weight_grads)
        self._local: dict = {}  # tensors handed to a chunk on this rank: (what, sending chunk, mb) -> list
        # freed_early_bytes: activation bytes freed while the step was still running (not by the final drain)
        self.stats = {"sent_bytes": 0, "freed_bytes": 0, "freed_early_bytes": 0}
        self._reaper: _SendReaper | None = None  # started on the first send of a tensor to free
        self._unreaped: list = []  # (work, tensor) of the other sends

    # --- one chunk: the model's slice, plus what only a pipeline needs -----------------------------------------
    def _forward(self, v: int, mb: MicroBatch, inputs: tuple) -> tuple:
        """Chunk v's forward: -> what it sends on, or (loss_sum, nll_sum) on the last chunk."""
        out = self.chunks[v](mb.src_tokens, mb.prev_tokens, *inputs)
        return self.loss_fn(out, mb) if self.specs[v].output else out

    def token_loss(self, logits: torch.Tensor, mb: MicroBatch) -> tuple:
        """Label-smoothed loss and nll sums over the micro-batch's target tokens (vocabulary-parallel logits when
        the output is sharded over the tensor-parallel group)."""
        if self.loss_group is not None:
            return vocab_parallel_label_smoothed_nll_loss(logits, mb.target, self.label_smoothing, PAD, self.loss_group)
        return label_smoothed_nll_loss(logits, mb.target, self.label_smoothing, PAD)

    # --- messages ---------------------------------------------------------------------------------------------
    def _peer(self, chunk_index: int) -> int:
        return self.grid.pp_ranks[self.ranks[chunk_index]]

    def _is_local(self, chunk_index: int) -> bool:
        return self.ranks[chunk_index] == self.grid.pp_rank

    def _tag(self, what: int, chunk_index: int, mb: int, j: int, m: int) -> int:
        """what: ACTIVATION, GRADIENT or PROFILE; j: the tensor's place in the message (at most 3)."""
        return ((chunk_index * m + mb) * 3 + what) * 4 + j

    def _send(self, tensors, dst_chunk: int, src_chunk: int, what: int, mb: int, m: int, free: list[bool]):
        if self._is_local(dst_chunk):  # the receiving chunk is ours: the same storage, no message, nothing freed
            self._local[(what, src_chunk, mb)] = [t.detach() for t in tensors]
            return
        for j, (t, fr) in enumerate(zip(tensors, free)):
            t = t.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            peer = self._peer(dst_chunk)
            work = dist.isend(t, peer, tag=self._tag(what, src_chunk, mb, j, m))
            self.stats["sent_bytes"] += t.numel() * t.element_size()
            if not fr:  # nothing to free early: waited for at the end of the step
                self._unreaped.append((work, t, peer))
                continue
            if self._reaper is None:
                self._reaper = _SendReaper(self.stats)
            self._reaper.put(work, t, peer)

    def _recv(self, shapes, src_chunk: int, what: int, mb: int, m: int, dtypes=None) -> list[torch.Tensor]:
        if self._is_local(src_chunk):
            return self._local.pop((what, src_chunk, mb))
        dtypes = dtypes or [self.dtype] * len(shapes)
        bufs = [torch.empty(s, dtype=dt, device=self.device) for s, dt in zip(shapes, dtypes)]
        peer = self._peer(src_chunk)
        works = [dist.irecv(b, peer, tag=self._tag(what, src_chunk, mb, j, m)) for j, b in enumerate(bufs)]
        for w in works:
            wait_for(w, peer)  # bounded by the process group's timeout; a failure names the peer
        return bufs

    def profile_admin(self, mb: MicroBatch) -> None:
        """Admin's profiling pass (model.residual=admin, before the first step) over the pipeline, stage by stage:
        each chunk receives the previous chunk's output and the running (encoder, decoder) ratios, sets its
        omegas (model.Transformer.profile_admin) and sends both on. `mb` is the first micro-batch of data-parallel
        replica 0, which is the single process's first; the other replicas take replica 0's omegas."""
        for v, c in enumerate(self.specs):  # this rank's chunks, in pipeline order
            inputs, ratios = [], (1.0, 1.0)
            if c.index > 0:
                shapes = mb.shapes(c, True, self.d, self.history)
                *inputs, carried = self._recv(
                    shapes + [(2,)], c.index - 1, PROFILE, 0, 1, dtypes=[self.dtype] * len(shapes) + [torch.float64]
                )
                ratios = tuple(carried.tolist())
            out, ratios = self.chunks[v].profile_admin(mb.src_tokens, mb.prev_tokens, *inputs, ratios=ratios)
            if not c.output:
                msg = [o.to(self.dtype) for o in out] + [torch.tensor(ratios, dtype=torch.float64, device=self.device)]
                self._send(msg, c.index + 1, c.index, PROFILE, 0, 1, [False] * len(msg))
        for work, _, peer in self._unreaped:
            wait_for(work, peer)
        self._unreaped = []
        if self.grid.dp > 1:
            with torch.no_grad():
                for p in (p for ch in self.chunks for n, p in ch.named_parameters() if n.endswith(".omega")):
                    dist.broadcast(p, self.grid.dp_ranks[0], group=self.grid.dp_group)

    def run(self, mbs: list[MicroBatch], loss_scale: float, forward_only: bool = False) -> tuple[float, float]:
        """Forward (+ backward, loss * loss_scale) of every micro-batch. -> (loss_sum, nll_sum) of the micro-batches
        whose loss this rank computes (the last stage; 0 elsewhere)."""
        m = len(mbs)
        if not forward_only and any(ch.needs_admin_profile() for ch in self.chunks):
            self.profile_admin(mbs[0])
        actions = (
            [("F", v, i) for i in range(m) for v in range(self.vpp)]
            if forward_only
            else schedule_actions(self.kind, self.pp, self.vpp, m, self.grid.pp_rank)
        )
        saved: dict = {}
        sums = []  # (loss, nll) of each micro-batch whose loss this rank computes, read after the loop (no host sync)
        freed_at_start = self.stats["freed_bytes"]
        ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
        with ctx:
            for op, v, i in actions:
                if self.on_action is not None:
                    self.on_action(op, v, i)
                c = self.specs[v]
                mb = mbs[i]
                if op == "F":
                    inputs = ()
                    if c.index > 0:
                        shapes = mb.shapes(c, True, self.d, self.history)
                        inputs = tuple(self._recv(shapes, c.index - 1, ACTIVATION, i, m))
                        if not forward_only:
                            for t in inputs:
                                t.requires_grad_(True)
                    outs = self._forward(v, mb, inputs)
                    if c.output:
                        loss, nll = outs
                        sums.append(torch.stack((loss.detach(), nll.detach())))
                        if not forward_only:
                            saved[(v, i)] = (inputs, (loss * loss_scale,))
                    else:
                        outs = tuple(o if o.dtype == self.dtype else o.to(self.dtype) for o in outs)
                        # free what only the next stage needs once it has it: the hidden state (or DLCL's stacked
                        # history, a fresh tensor no op saves), and a finished encoder output that no local decoder
                        # layer reads. Inside the decoder, memory is this chunk's input or read by its
                        # cross-attention: it stays.
                        free = [what is not Carried.MEMORY or not c.runs_decoder for what in c.sends]
                        self._send(outs, c.index + 1, c.index, ACTIVATION, i, m, free)
                        if not forward_only:
                            saved[(v, i)] = (inputs, outs)
                    if forward_only:
                        del outs, inputs
                elif op == "B":
                    if self.on_last_backward is not None and i == m - 1 and not self.split:
                        self.on_last_backward(v, ())
                    inputs, outs = saved.pop((v, i))
                    # split: B leaves the weight-gradient products to the store (weight_grad.py)
                    with self.weight_grads.collect((v, i)) if self.split else contextlib.nullcontext():
                        if c.output:
                            torch.autograd.backward(outs[0])
                        else:
                            grads = self._recv(mb.shapes(c, False, self.d, self.history), c.index + 1, GRADIENT, i, m)
                            pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
                            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                    if c.index > 0:
                        gin = [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs]
                        self._send(gin, c.index - 1, c.index, GRADIENT, i, m, [False] * len(gin))
                    del inputs, outs
                else:  # W: the weight gradients the B of (v, i) left
                    if self.on_last_backward is not None and i == m - 1:
                        later = self.weight_grads.param_ids((v, i))
                        self.on_last_backward(v, [p for p in self.chunks[v].parameters() if id(p) not in later])
                    self.weight_grads.run((v, i))
        if self.on_action is not None:
            self.on_action("end", None, None)
        self.stats["freed_early_bytes"] += self.stats["freed_bytes"] - freed_at_start
        for work, _, peer in self._unreaped:
            wait_for(work, peer)
        self._unreaped = []
        if self._reaper is not None:
            self._reaper.drain()
        assert not saved, f"unfinished micro-batches: {sorted(saved)}"
        pending = self.weight_grads.pending()
        assert not pending, f"weight gradients never computed (no W) for (chunk, micro-batch) {pending}"
        if not sums:
            return 0.0, 0.0
        loss_sum, nll_sum = torch.stack(sums).double().sum(0).tolist()  # float64, as Python's float sums were
        return loss_sum, nll_sum
