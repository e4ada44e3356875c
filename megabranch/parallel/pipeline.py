"""Pipeline stages for encoder-decoder stacks and the schedules that run them (GPipe, 1F1B, interleaved 1F1B).

A pipeline rank runs one or more chunks (virtual stages) of the layout from partition.py. A chunk is a
`StageChunk`: the slice of the model's layers it owns, plus whatever rides with them (the source embedding with
E0, the target embedding with D0, the final norms, the output projection and the loss with the last decoder
layer), and its own ResidualCoefficients for the stacks it touches, so `residual.set_step` reaches every layer
of the stage. Parameter names inside a chunk are the single-process model's (`encoder.layers.7.ffn...`), so
initialisation (model.transformer.initial_value) and comparisons are by name; see `canonical_name` for the
one alias (a tied table).

What travels between chunks (every rank of a pipeline reads the same micro-batches, so every shape is known
from the batch and no shape is ever communicated):

    inside the encoder          x        (B, S, d)
    after the encoder's end     memory   (B, S, d)
    inside the decoder          memory (B, S, d) and y (B, T, d)

The encoder output travels with the decoder hidden through every decoder stage, and its gradient flows back
the same way: a decoder chunk adds its cross-attention contributions to the gradient it receives for memory and
sends the sum on. Masks, decoder input tokens and targets are rebuilt from the micro-batch on each rank.

The executor is our own point-to-point loop over an action list ((F|B, chunk, micro-batch) per rank), not
torch.distributed.pipelining; docs/design.md ("Parallel engine") says why. Sends are non-blocking; a receive
blocks only when its data is needed; each sent activation's storage is freed as soon as its send has
completed (the autograd graph keeps only its metadata: no op at a chunk boundary saves its own output).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from ..model.embeddings import Embedder, sinusoidal_table
from ..model.layers import DecoderLayer, EncoderLayer
from ..model.loss import label_smoothed_nll_loss
from ..model.norm import LayerNorm
from ..model.transformer import PAD, OutputProjection, initial_value
from ..residual import ResidualCoefficients, deepnorm_constants
from .partition import Chunk, Layout


# --- stage modules ---------------------------------------------------------------------------------------

class _Stack(nn.Module):
    """The part of one stack (encoder or decoder) a chunk holds; attribute names follow model.transformer."""


class StageChunk(nn.Module):
    def __init__(self, cfg: ModelConfig, chunk: Chunk, tables: dict, vocab: int, tgt_vocab: int, recompute: int = 0):
        super().__init__()
        self.cfg, self.chunk, self.recompute = cfg, chunk, recompute
        consts = deepnorm_constants(cfg.encoder_layers, cfg.decoder_layers)
        coeff = lambda stack: ResidualCoefficients(  # noqa: E731
            cfg.residual, consts[stack][0], cfg.alpha_schedule, cfg.alpha_warmup_steps
        )

        def table(name: str, size: int) -> nn.Embedding:
            if cfg.share_all_embeddings:
                name = "encoder"
            if name not in tables:
                tables[name] = nn.Embedding(size, cfg.d_model, padding_idx=PAD)
            return tables[name]

        self.encoder = _Stack()
        self.decoder = _Stack()
        if chunk.has_encoder:
            if chunk.has_src_embed:
                self.encoder.embed = Embedder(table("encoder", vocab), cfg.max_positions, cfg.dropout)
            self.encoder.coeffs = coeff("encoder")
            self.encoder.layers = nn.ModuleDict(
                {str(i): EncoderLayer(cfg, cfg.fused_kernels) for i in range(chunk.enc_lo, chunk.enc_hi)}
            )
            if chunk.ends_encoder and cfg.residual == "pre_ln":
                self.encoder.final_norm = LayerNorm(cfg.d_model, cfg.ln_eps)
        if chunk.has_decoder:
            if chunk.has_tgt_embed:
                self.decoder.embed = Embedder(table("decoder", tgt_vocab), cfg.max_positions, cfg.dropout)
            self.decoder.coeffs = coeff("decoder")
            self.decoder.layers = nn.ModuleDict(
                {str(i): DecoderLayer(cfg, cfg.fused_kernels) for i in range(chunk.dec_lo, chunk.dec_hi)}
            )
            if chunk.has_output:
                if cfg.residual == "pre_ln":
                    self.decoder.final_norm = LayerNorm(cfg.d_model, cfg.ln_eps)
                tied = table("decoder", tgt_vocab) if cfg.share_decoder_input_output_embed else None
                self.decoder.output = OutputProjection(cfg.d_model, tgt_vocab, tied)
        self.loss_group = None  # the tensor-parallel group when the output is vocabulary-parallel
        self.label_smoothing = 0.0
        self.audit: list | None = None  # (phase, micro-batch, stack, alpha) records, when a test asks for them

    # -- forward ---------------------------------------------------------------------------------------------
    def _record(self, phase: str, mb: int) -> None:
        for stack in ("encoder", "decoder"):
            co = getattr(getattr(self, stack), "coeffs", None)
            if co is not None:
                self.audit.append((phase, self.chunk.index, mb, stack, float(co.s)))

    def _run(self, layers: list, fn, h: torch.Tensor, *extra) -> torch.Tensor:
        k = self.recompute
        if k <= 0 or not torch.is_grad_enabled():
            for layer in layers:
                h = fn(layer, h, *extra)
            return h
        from .tensor_parallel import checkpoint

        for start in range(0, len(layers), k):
            group = layers[start : start + k]

            def segment(h, *extra, group=group):
                for layer in group:
                    h = fn(layer, h, *extra)
                return h

            h = checkpoint(segment, h, *extra)
        return h

    def forward(self, mb: "MicroBatch", inputs: tuple = ()) -> tuple:
        """inputs: what `chunk.receives` says. Returns what `chunk.sends`, or (loss_sum, nll_sum) at the end."""
        c = self.chunk
        if self.audit is not None:
            self._record("F", mb.index)
        x = memory = y = None
        if c.has_src_embed:
            x = self.encoder.embed(mb.src_tokens)
        elif c.receives == "x":
            (x,) = inputs
        elif c.receives == "memory":
            (memory,) = inputs
        else:
            memory, y = inputs
        if c.has_encoder:
            co = self.encoder.coeffs
            key_mask = mb.key_mask
            x = self._run(list(self.encoder.layers.values()),
                          lambda layer, h: layer(h, co.r, co.s, key_mask=key_mask), x)
            if not c.ends_encoder:
                return self._hook((x,), mb)
            if getattr(self.encoder, "final_norm", None) is not None:
                x = self.encoder.final_norm(x)
            memory = x
            if not c.has_decoder:
                return self._hook((memory,), mb)
        if c.has_tgt_embed:
            y = self.decoder.embed(mb.prev_tokens)
        co = self.decoder.coeffs
        mask = mb.key_mask
        y = self._run(list(self.decoder.layers.values()),
                      lambda layer, h, mem: layer(h, co.r, co.s, mem, mask), y, memory)
        if not c.has_output:
            return self._hook((memory, y), mb)
        if getattr(self.decoder, "final_norm", None) is not None:
            y = self.decoder.final_norm(y)
        y = self._hook((y,), mb)[0]
        logits = self.decoder.output(y)
        if self.loss_group is not None:
            from .tensor_parallel import vocab_parallel_label_smoothed_nll_loss

            return vocab_parallel_label_smoothed_nll_loss(logits, mb.target, self.label_smoothing, PAD, self.loss_group)
        return label_smoothed_nll_loss(logits, mb.target, self.label_smoothing, PAD)

    def _hook(self, outs: tuple, mb: "MicroBatch") -> tuple:
        """With an audit list, record the alpha this chunk sees while its backward runs."""
        if self.audit is not None and torch.is_grad_enabled() and outs[-1].requires_grad:
            outs[-1].register_hook(lambda g, i=mb.index: self._record("B", i))
        return outs


def canonical_name(local: str, cfg: ModelConfig) -> str:
    """The single-process model's name of a chunk parameter (tied tables have one canonical name)."""
    if local.startswith("decoder.output_table."):
        local = "decoder.embed.table." + local[len("decoder.output_table."):]
    if cfg.share_all_embeddings and local.startswith("decoder.embed.table."):
        local = "encoder.embed.table." + local[len("decoder.embed.table."):]
    return local


def _materialize(module: nn.Module, device) -> None:
    """meta -> real storage on `device`, keeping every Parameter's attributes and shared objects shared."""
    memo: dict = {}
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                memo[id(p)] = new
            m._parameters[name] = memo[id(p)]
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)


@torch.no_grad()
def _init_values(chunks: nn.ModuleList, cfg: ModelConfig, seed: int) -> None:
    from .parallelize import full_shape, shard_of

    done: set = set()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if id(p) in done:
                continue
            done.add(id(p))
            full = initial_value(canonical_name(name, cfg), full_shape(p), cfg, seed)
            p.copy_(shard_of(full, p))
        for m in chunk.modules():
            if isinstance(m, Embedder):
                m.positions = sinusoidal_table(m.positions.shape[0], m.positions.shape[1]).to(m.positions.device)
            elif isinstance(m, ResidualCoefficients):
                consts = deepnorm_constants(cfg.encoder_layers, cfg.decoder_layers)
                stack = "encoder" if m is getattr(chunk.encoder, "coeffs", None) else "decoder"
                m.r.fill_(consts[stack][0] if m.residual == "deepnorm" else 1.0)
                m.s.fill_(1.0)
                m.set_step(0)


def build_stage(cfg: ModelConfig, layout: Layout, grid, vocab: int, tgt_vocab: int | None = None,
                seed: int | None = 0, device: str | torch.device = "cpu", recompute: int = 0,
                label_smoothing: float = 0.0) -> nn.ModuleList:
    """This rank's chunks (in virtual order) as a ModuleList, tensor-parallel sharded for grid.tp.

    Built on the meta device, sharded there, then only this rank's shards are allocated and filled from the
    layout-independent init (so it holds exactly the single-process model's weights for `seed`).
    device="meta" stops before allocating (memory planning). Tied tables on a pipeline rank that does not own
    them (the first holder) are marked `p.pp_duplicate = True`.
    """
    from .parallelize import apply_tensor_parallel

    tgt_vocab = tgt_vocab or vocab
    tables: dict = {}
    with torch.device("meta"):
        chunks = nn.ModuleList(
            StageChunk(cfg, c, tables, vocab, tgt_vocab, recompute) for c in layout.chunks_of_rank(grid.pp_rank)
        )
    # the stage that owns a table: its first holder in pipeline order (the source / target embedding's stage)
    owners = {}
    for name, what in (("encoder", "src_embed"), ("decoder", "tgt_embed")):
        holders = layout.ranks_holding(what)
        if holders:
            owners[name] = holders[0]
    for name, t in tables.items():
        if owners.get(name, grid.pp_rank) != grid.pp_rank:
            t.weight.pp_duplicate = True
    chunks = apply_tensor_parallel(chunks, grid)
    # an output projection tied to a table that no local embedding holds: register that table with it
    registered = {id(p) for p in chunks.parameters()}
    for ch in chunks:
        out = getattr(ch.decoder, "output", None)
        if out is not None and out._tied and id(out._tied[0].weight) not in registered:
            ch.decoder.output_table = out._tied[0]
            w = out._tied[0].weight
            registered.add(id(w))
            if getattr(w, "tp_split_dim", None) is None:
                w.tp_replicated = True
    for ch in chunks:
        ch.label_smoothing = label_smoothing
        if getattr(ch.decoder, "output", None) is not None and grid.tp > 1:
            ch.loss_group = grid.tp_group
    if str(device) != "meta":
        _materialize(chunks, device)
        _init_values(chunks, cfg, 0 if seed is None else seed)
    return chunks


def named_parameters_canonical(chunks: nn.ModuleList, cfg: ModelConfig) -> dict:
    """canonical name -> parameter for this rank (each object once)."""
    out, seen = {}, set()
    for ch in chunks:
        for name, p in ch.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[canonical_name(name, cfg)] = p
    return out


# --- micro-batches ---------------------------------------------------------------------------------------

@dataclass
class MicroBatch:
    index: int
    src_tokens: torch.Tensor
    prev_tokens: torch.Tensor
    target: torch.Tensor
    ntokens: int
    key_mask: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.key_mask = self.src_tokens.ne(PAD)

    @classmethod
    def from_batch(cls, i: int, batch: dict, device) -> "MicroBatch":
        return cls(i, batch["src_tokens"].to(device), batch["prev_output_tokens"].to(device),
                   batch["target"].to(device), int(batch["ntokens"]))

    def shapes(self, what: str, d: int) -> list[tuple]:
        b, s = self.src_tokens.shape
        t = self.prev_tokens.shape[1]
        return {"x": [(b, s, d)], "memory": [(b, s, d)], "memory+y": [(b, s, d), (b, t, d)], "": []}[what]


# --- schedules -------------------------------------------------------------------------------------------

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def check_schedule(kind: str, pp: int, vpp: int, m: int) -> None:
    """One-line UserErrors for combinations a schedule cannot run."""
    if kind not in SCHEDULES:
        raise UserError(f"parallel.schedule={kind!r} is invalid: must be one of {', '.join(SCHEDULES)}")
    if kind == "interleaved" and vpp < 2:
        raise UserError("parallel.schedule=interleaved needs parallel.vpp >= 2 (virtual stages per rank)")
    if kind == "1f1b" and vpp > 1:
        raise UserError(
            f"parallel.vpp={vpp} needs parallel.schedule=interleaved (or gpipe); 1f1b runs one chunk per rank"
        )
    if kind == "interleaved" and m % pp:
        raise UserError(
            f"the interleaved schedule needs the micro-batches per step (optim.update_freq={m}) to be a multiple "
            f"of parallel.pp={pp}"
        )


def schedule_actions(kind: str, pp: int, vpp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """Pipeline rank `rank`'s ordered actions: ("F" | "B", virtual chunk v, micro-batch i)."""
    if kind == "gpipe":
        fwd = [("F", v, i) for v in range(vpp) for i in range(m)]
        return fwd + [("B", v, i) for v in reversed(range(vpp)) for i in range(m)]
    if kind == "1f1b":
        warm = min(pp - rank - 1, m)
        acts = [("F", 0, i) for i in range(warm)]
        for j in range(m - warm):
            acts += [("F", 0, warm + j), ("B", 0, j)]
        return acts + [("B", 0, j) for j in range(m - warm, m)]
    # interleaved 1F1B: micro-batches in groups of pp; each group runs through chunk 0, then chunk 1, ...
    total = m * vpp

    def f(k):
        return ("F", (k // pp) % vpp, (k // (pp * vpp)) * pp + k % pp)

    def b(k):
        return ("B", vpp - 1 - (k // pp) % vpp, (k // (pp * vpp)) * pp + k % pp)

    warm = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    acts = [f(k) for k in range(warm)]
    for j in range(total - warm):
        acts += [f(warm + j), b(j)]
    return acts + [b(k) for k in range(total - warm, total)]


def simulate(kind: str, pp: int, vpp: int, m: int, f_time: float = 1.0, b_time: float = 2.0) -> float:
    """Run the action lists of every rank on an ideal machine (compute only, free messages, a rank waits for
    the data it needs); -> the makespan. Raises RuntimeError on a deadlock. For tests and the benchmark."""
    acts = [schedule_actions(kind, pp, vpp, m, r) for r in range(pp)]
    k = pp * vpp
    done: dict = {}  # (op, chunk, mb) -> finish time
    pos, clock = [0] * pp, [0.0] * pp
    remaining = sum(len(a) for a in acts)
    while remaining:
        progressed = False
        for r in range(pp):
            if pos[r] >= len(acts[r]):
                continue
            op, v, i = acts[r][pos[r]]
            c = v * pp + r
            deps = []
            if op == "F" and c > 0:
                deps.append(("F", c - 1, i))
            if op == "B":
                deps.append(("F", c, i))
                if c < k - 1:
                    deps.append(("B", c + 1, i))
            if all(d in done for d in deps):
                start = max([clock[r]] + [done[d] for d in deps])
                clock[r] = start + (f_time if op == "F" else b_time)
                done[(op, c, i)] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {kind} deadlocks for pp={pp} vpp={vpp} m={m}")
    return max(clock)


# --- the executor ----------------------------------------------------------------------------------------

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

    def put(self, work, tensor: torch.Tensor | None) -> None:
        self._q.put((work, tensor))

    def _loop(self) -> None:
        while True:
            work, t = self._q.get()
            try:
                work.wait()
                if t is not None:  # drop the data; autograd keeps the metadata, all backward(outputs) needs
                    self.stats["freed_bytes"] += t.untyped_storage().nbytes()
                    t.untyped_storage().resize_(0)
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread by drain()
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

    def __init__(self, chunks: nn.ModuleList, layout: Layout, grid, kind: str, d_model: int,
                 dtype: torch.dtype = torch.float32):
        self.chunks, self.layout, self.grid, self.kind = chunks, layout, grid, kind
        self.d, self.dtype = d_model, dtype
        first = next(iter(chunks.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.pp, self.vpp, self.k = layout.pp, layout.vpp, layout.num_chunks
        self.on_last_backward = None  # callback(v) right before chunk v's backward of the last micro-batch
        # freed_early_bytes: activation bytes freed while the step was still running (not by the final drain)
        self.stats = {"sent_bytes": 0, "freed_bytes": 0, "freed_early_bytes": 0}
        self._reaper: _SendReaper | None = None  # started on the first send of a tensor to free
        self._unreaped: list = []  # (work, tensor) of the other sends

    def _peer(self, chunk_index: int) -> int:
        return self.grid.pp_ranks[chunk_index % self.pp]

    def _tag(self, kind: int, chunk_index: int, mb: int, j: int, m: int) -> int:
        return ((chunk_index * m + mb) * 2 + kind) * 2 + j

    def _send(self, tensors, dst_chunk: int, src_chunk: int, kind: int, mb: int, m: int, free: list[bool]):
        for j, (t, fr) in enumerate(zip(tensors, free)):
            t = t.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            work = dist.isend(t, self._peer(dst_chunk), tag=self._tag(kind, src_chunk, mb, j, m))
            self.stats["sent_bytes"] += t.numel() * t.element_size()
            if not fr:  # nothing to free early: waited for at the end of the step
                self._unreaped.append((work, t))
                continue
            if self._reaper is None:
                self._reaper = _SendReaper(self.stats)
            self._reaper.put(work, t)

    def _recv(self, shapes, src_chunk: int, kind: int, mb: int, m: int) -> list[torch.Tensor]:
        bufs = [torch.empty(s, dtype=self.dtype, device=self.device) for s in shapes]
        works = [dist.irecv(b, self._peer(src_chunk), tag=self._tag(kind, src_chunk, mb, j, m))
                 for j, b in enumerate(bufs)]
        for w in works:
            w.wait()
        return bufs

    def run(self, mbs: list[MicroBatch], loss_scale: float, forward_only: bool = False) -> tuple[float, float]:
        """Forward (+ backward, loss * loss_scale) of every micro-batch. -> (loss_sum, nll_sum) of the micro-batches
        whose loss this rank computes (the last stage; 0 elsewhere)."""
        m = len(mbs)
        actions = (
            [("F", v, i) for i in range(m) for v in range(self.vpp)] if forward_only
            else schedule_actions(self.kind, self.pp, self.vpp, m, self.grid.pp_rank)
        )
        saved: dict = {}
        loss_sum = nll_sum = 0.0
        freed_at_start = self.stats["freed_bytes"]
        ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
        with ctx:
            for op, v, i in actions:
                chunk = self.chunks[v]
                c = chunk.chunk
                mb = mbs[i]
                if op == "F":
                    inputs = ()
                    if c.index > 0:
                        inputs = tuple(self._recv(mb.shapes(c.receives, self.d), c.index - 1, 0, i, m))
                        if not forward_only:
                            for t in inputs:
                                t.requires_grad_(True)
                    outs = chunk(mb, inputs)
                    if c.has_output:
                        loss, nll = outs
                        loss_sum += float(loss.detach())
                        nll_sum += float(nll.detach())
                        if not forward_only:
                            saved[(v, i)] = (inputs, (loss * loss_scale,))
                    else:
                        outs = tuple(o if o.dtype == self.dtype else o.to(self.dtype) for o in outs)
                        # free what only the next stage needs once it has it: the hidden state (x or y), and a
                        # finished encoder output that no local decoder layer reads. Inside the decoder, memory is
                        # this chunk's input or read by its cross-attention: it stays.
                        free = [not (c.sends == "memory+y" and j == 0) for j in range(len(outs))]
                        self._send(outs, c.index + 1, c.index, 0, i, m, free)
                        if not forward_only:
                            saved[(v, i)] = (inputs, outs)
                    if forward_only:
                        del outs, inputs
                else:
                    if self.on_last_backward is not None and i == m - 1:
                        self.on_last_backward(v)
                    inputs, outs = saved.pop((v, i))
                    if c.has_output:
                        torch.autograd.backward(outs[0])
                    else:
                        grads = self._recv(mb.shapes(c.sends, self.d), c.index + 1, 1, i, m)
                        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
                        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                    if c.index > 0:
                        gin = [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs]
                        self._send(gin, c.index - 1, c.index, 1, i, m, [False] * len(gin))
                    del inputs, outs
        self.stats["freed_early_bytes"] += self.stats["freed_bytes"] - freed_at_start
        for work, _ in self._unreaped:
            work.wait()
        self._unreaped = []
        if self._reaper is not None:
            self._reaper.drain()
        assert not saved, f"unfinished micro-batches: {sorted(saved)}"
        return loss_sum, nll_sum
