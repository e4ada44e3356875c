"""The cost of each layer kind of a model config for one micro-batch on one tensor-parallel rank: FLOPs, memory
traffic, parameters and activation bytes; what the balanced split (partition.py) and the memory plan
(memory.py) weigh."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..model.span import Carried
from ..parallel.layout import Chunk, Layout
from ..residual import SCHEMES

MACHINE_BALANCE = 150.0  # FLOPs per byte of memory traffic (about an H100's bf16 peak / HBM bandwidth)

# what a chunk receives (model/span.py): the encoder hidden, the encoder output, or that and the decoder hidden
HIDDEN = (Carried.ENCODER_HIDDEN,)
MEMORY = (Carried.MEMORY,)
MEMORY_AND_HIDDEN = (Carried.MEMORY, Carried.DECODER_HIDDEN)


@dataclass
class Cost:
    """Cost of one piece for one micro-batch on one rank (after the tensor-parallel split)."""

    flops: float = 0.0  # forward + backward
    traffic: float = 0.0  # bytes of memory-bound work (embedding gathers/scatters, softmax over the vocabulary)
    params: float = 0.0  # parameter count held by this rank
    act_bytes: float = 0.0  # layer activations kept for backward, one micro-batch, no recompute
    boundary_bytes: float = 0.0  # the hidden state at this piece's input (kept per layer group with recompute)
    kept_bytes: float = 0.0  # activations outside the recomputed layers (embeddings, final norms, logits)
    w_flops: float = 0.0  # the weight-gradient products within `flops` (a split backward's W)
    w_bytes: float = 0.0  # what a split backward's B leaves for W: the input and output gradient of every linear
    linear_params: float = 0.0  # parameters used by matrix products (what autocast keeps a low-precision copy of)
    f_flops: float = 0.0  # the forward's share of `flops` (what recomputation runs again)

    def __add__(self, o: Cost) -> Cost:
        return Cost(
            self.flops + o.flops,
            self.traffic + o.traffic,
            self.params + o.params,
            self.act_bytes + o.act_bytes,
            self.boundary_bytes + o.boundary_bytes,
            self.kept_bytes + o.kept_bytes,
            self.w_flops + o.w_flops,
            self.w_bytes + o.w_bytes,
            self.linear_params + o.linear_params,
            self.f_flops + o.f_flops,
        )

    @property
    def time(self) -> float:
        """A roofline-style time in FLOP units: compute plus memory traffic at the machine balance."""
        return self.flops + MACHINE_BALANCE * self.traffic


STREAM_BYTES = 4  # the residual stream: float32 (and under GPU autocast LayerNorm runs, and outputs, float32)
STATS_BYTES = 8  # LayerNorm's saved mean and rstd per token (float32 each)


class CostModel:
    """Per-layer-kind costs of a ModelConfig for micro-batches of `tokens` target tokens.

    Matrix FLOPs count 2 per multiply-add, backward = 2 x forward (half of a linear's backward is its weight
    gradient, `w_flops`); with tensor parallelism the head / FFN / vocabulary dimensions are divided by tp.

    Activation bytes are what autograd keeps on a GPU, as megabranch-train --rehearse measures them (the real
    layers on fake tensors, planning/rehearsal.py): under bf16 / fp16 autocast (`act_size` 2) the residual stream
    stays float32 (LayerNorm runs in float32) and every matrix product runs in the compute dtype, so each linear
    that reads the stream keeps its own low-precision copy of its input (autocast casts once per call), while a
    linear reading a low-precision tensor (attention's output, the FFN hidden, a received message) keeps that
    tensor; attention keeps q, k, v, its output and log-sum-exp (flash / efficient kernels); dropout keeps a
    boolean mask (the GPU's fused kernel); LayerNorm its float32 input, mean and rstd. `w_bytes` is what a split
    backward keeps from its B to its W (weight_grad.py: each linear's input and output gradient).

    With sequence parallelism (parallel/sequence_parallel.py) everything of the regions tensor parallelism
    replicates is divided by tp too (`self.sp`): the linears' stream inputs (a column-parallel linear keeps its
    input's sequence slice, from F to B and from B to W), the residuals and LayerNorms, the hidden states, the
    embeddings' masks, the encoder output and what crosses a stage.
    """

    def __init__(
        self,
        cfg,
        vocab: int,
        tgt_vocab: int | None = None,
        tp: int = 1,
        tokens: int = 4096,
        src_len: int = 64,
        tgt_len: int = 64,
        act_size: int = 4,
        recompute: int = 0,
        state_bytes_per_param: float = 16.0,
        sequence_parallel: bool = False,
    ):
        self.cfg, self.tp, self.act = cfg, tp, act_size
        self.sp = tp if sequence_parallel else 1  # what the replicated regions' (B, L, d) tensors are divided by
        self.recompute = recompute
        self.state_bytes = state_bytes_per_param  # fp32 weights + grads + Adam moments
        self._cache: dict = {}
        self.vocab, self.tgt_vocab = vocab, tgt_vocab or vocab
        self.tokens, self.S, self.T = tokens, src_len, tgt_len
        self.src_tokens = tokens * src_len / tgt_len  # source tokens in a micro-batch of `tokens` target tokens

    # --- what one linear, one residual, one tensor read cost in bytes ----------------------------------------------
    @property
    def _casts(self) -> bool:
        """Whether linears reading the float32 stream keep a low-precision copy each (autocast)."""
        return self.act < STREAM_BYTES

    def _reads(self, tokens: float, linears: int) -> float:
        """Bytes `linears` linear layers reading one (tokens x d) tensor of the stream keep of it."""
        d = self.cfg.d_model / self.sp
        return linears * tokens * d * self.act if self._casts else tokens * d * STREAM_BYTES

    def _residual(self, tokens: float) -> float:
        """The residual and LayerNorm of one sub-layer: dropout's mask and LayerNorm's float32 input with its
        mean and rstd (the fused op keeps x and F(x) and regenerates the mask)."""
        cfg, tokens = self.cfg, tokens / self.sp
        d = cfg.d_model
        if cfg.fused_kernels and cfg.residual != "pre_ln":
            return tokens * d * (STREAM_BYTES + self.act) + tokens * STATS_BYTES
        mask = tokens * d if cfg.dropout > 0 else 0.0
        return mask + tokens * d * STREAM_BYTES + tokens * STATS_BYTES

    def _attn(
        self,
        q_tokens: float,
        kv_tokens: float,
        kv_len: float,
        causal: bool,
        cross: bool = False,
        local_memory: bool = False,
    ) -> Cost:
        """Self-attention, or cross-attention over the encoder output (`local_memory`: produced on this chunk, so
        float32 and cast by both k and v; otherwise a received tensor the chunk keeps once: chunk_*_bytes)."""
        d, tp, h, c = self.cfg.d_model, self.tp, self.cfg.n_heads, self.act
        proj = 2 * d * d / tp * (2 * q_tokens + 2 * kv_tokens)  # q, out on queries; k, v on keys
        span = kv_len / 2 if causal else kv_len
        scores = 2 * 2 * q_tokens * span * d / tp  # QK^T and AV
        params = (4 * d * d + 3 * d) / tp + d + 2 * d  # weights, q/k/v biases sharded, out bias + LN replicated
        if not cross:
            ins = self._reads(q_tokens, 3)
        else:
            ins = self._reads(q_tokens, 1) + (self._reads(kv_tokens, 2) if local_memory and self._casts else 0.0)
        heads = (2 * q_tokens + 2 * kv_tokens) * d / tp * c + q_tokens * h / tp * 4  # q k v, output (out_proj's
        # input too), log-sum-exp
        act = ins + heads + self._residual(q_tokens)
        # B -> W: every linear's input (out_proj's: attention's output) and output gradient
        w = ins + q_tokens * d / tp * c + (q_tokens + 2 * kv_tokens) * d / tp * c + q_tokens * d * c
        # backward: twice the projections, and the attention kernel's five products over the scores (it
        # recomputes QK^T) where the forward has two
        return Cost(
            flops=3 * proj + 3.5 * scores,
            params=params,
            act_bytes=act,
            w_flops=proj,
            w_bytes=w,
            linear_params=(4 * d * d + 3 * d) / tp,
            f_flops=proj + scores,
        )

    def _ffn(self, tokens: float) -> Cost:
        cfg, c = self.cfg, self.act
        d, f, tp = cfg.d_model, cfg.ffn_dim, self.tp
        hidden = tokens * f / tp * c  # the activation's output (ReLU) or input (GELU), also fc2's input
        if cfg.activation_dropout > 0:
            hidden += tokens * f / tp * (1 + c)  # its mask, and the dropped hidden fc2 reads
        ins = self._reads(tokens, 1)
        w = ins + tokens * f / tp * c + tokens * f / tp * c + tokens * d * c  # fc1, fc2 inputs; their output grads
        return Cost(
            flops=3 * 2 * 2 * d * f / tp * tokens,
            params=(2 * d * f + f) / tp + d + 2 * d,
            act_bytes=ins + hidden + self._residual(tokens),
            w_flops=2 * 2 * d * f / tp * tokens,
            w_bytes=w,
            linear_params=(2 * d * f + f) / tp,
            f_flops=2 * 2 * d * f / tp * tokens,
        )

    def encoder_layer(self) -> Cost:
        if "enc" in self._cache:
            return self._cache["enc"]
        n = self.src_tokens
        c = self._attn(n, n, self.S, False) + self._ffn(n)
        c.boundary_bytes = self.hidden_bytes(n)
        self._cache["enc"] = c
        return c

    def decoder_layer(self, local_memory: bool = False) -> Cost:
        """A decoder layer; `local_memory`: its cross-attention reads an encoder output made on the same chunk."""
        key = ("dec", local_memory)
        if key in self._cache:
            return self._cache[key]
        n = self.tokens
        c = (
            self._attn(n, n, self.T, True)
            + self._attn(n, self.src_tokens, self.S, False, True, local_memory)
            + self._ffn(n)
        )
        c.boundary_bytes = self.hidden_bytes(n)
        self._cache[key] = c
        return c

    def hidden_bytes(self, tokens: float) -> float:
        """Bytes of one float32 (B, L, d) hidden state of `tokens` positions on this rank (1/tp of them under
        sequence parallelism)."""
        return tokens * self.cfg.d_model * STREAM_BYTES / self.sp

    def embedding(self, vocab: int, tokens: float) -> Cost:
        d, tp = self.cfg.d_model, self.tp
        rows = math.ceil(vocab / tp)
        # gather + scale + positions forward; a dense (rows x d) gradient is zeroed and scattered into backward
        traffic = 4 * (3 * tokens * d + rows * d + tokens * d)
        kept = tokens * 8 + (tokens * d / self.sp if self.cfg.dropout > 0 else 0.0)  # the ids, the dropout mask
        if tp > 1:
            kept += tokens * (8 + 2)  # this shard's ids and the out-of-shard masks
        return Cost(traffic=traffic, params=rows * d, kept_bytes=kept)

    def output(self) -> Cost:
        d, tp, n, c = self.cfg.d_model, self.tp, self.tokens, self.act
        rows = math.ceil(self.tgt_vocab / tp)
        tied = self.cfg.share_decoder_input_output_embed
        ins = self._reads(n, 1)
        # the loss keeps float32 log-probabilities (softmax under tensor parallelism) and the target indices
        return Cost(
            flops=3 * 2 * n * d * rows,
            traffic=6 * 4 * n * rows,
            params=0 if tied else rows * d,
            kept_bytes=ins + n * rows * 4 + 2 * n * 8,
            w_flops=2 * n * d * rows,
            w_bytes=ins + n * rows * c,
            linear_params=rows * d,
        )  # W: the input, the logits' gradient

    def final_norm(self, tokens: float) -> Cost:
        d = self.cfg.d_model
        return Cost(
            traffic=4 * 4 * tokens * d, params=2 * d, kept_bytes=tokens / self.sp * (d * STREAM_BYTES + STATS_BYTES)
        )

    def units(self) -> list[Cost]:
        """The cost of each layer of the sequence E0..E(N-1) D0..D(M-1), extras folded into their layer."""
        cfg = self.cfg
        n, m = cfg.encoder_layers, cfg.decoder_layers
        enc, dec = self.encoder_layer(), self.decoder_layer()
        out = [enc + Cost() for _ in range(n)] + [dec + Cost() for _ in range(m)]
        out[0] = out[0] + self.embedding(self.vocab, self.src_tokens)
        out[n] = out[n] + self.embedding(self.tgt_vocab, self.tokens)
        if SCHEMES[cfg.residual].final_norm:
            out[n - 1] = out[n - 1] + self.final_norm(self.src_tokens)
            out[n + m - 1] = out[n + m - 1] + self.final_norm(self.tokens)
        out[n + m - 1] = out[n + m - 1] + self.output()
        return out

    def memory(self, u: Cost) -> float:
        """Bytes a unit pins for one micro-batch: weights + grads + optimizer states, and what its backward
        keeps (with recompute every k layers: its input, 1/k of the time)."""
        act = u.act_bytes if self.recompute <= 0 else u.boundary_bytes / self.recompute
        return u.params * self.state_bytes + act + u.kept_bytes

    # --- per chunk ---------------------------------------------------------------------------------------------------
    def _runs(self, chunk: Chunk) -> list[tuple[int, Cost]]:
        """(layers, cost of one) of the chunk's encoder and decoder layers."""
        local = chunk.ends_encoder and chunk.has_decoder
        return [
            (chunk.enc_hi - chunk.enc_lo, self.encoder_layer()),
            (chunk.dec_hi - chunk.dec_lo, self.decoder_layer(local)),
        ]

    def _messages(self, chunk: Chunk) -> float:
        """Bytes of the tensors a chunk keeps from its forward to its backward besides its layers': what it
        received (the executor keeps a message until its B; the first layer's linears read it without a copy),
        and an encoder output it makes: the low-precision copy it sends on, the float32 tensor itself where its
        cross-attentions read it without autocast or recomputation keeps it as an input."""
        d, c = self.cfg.d_model / self.sp, self.act
        n_src, n = self.src_tokens, self.tokens
        got = self.received_bytes(chunk) - {HIDDEN: self._reads(n_src, 3), MEMORY_AND_HIDDEN: self._reads(n, 3)}.get(
            chunk.receives, 0.0
        )
        if chunk.ends_encoder and chunk.has_decoder:  # the encoder output is made here
            if not self._casts or self.recompute > 0:  # read as is (float32), or kept for the recomputations
                got += n_src * d * STREAM_BYTES
            if self._casts and not chunk.output:
                got += n_src * d * c
        return got

    def received_bytes(self, chunk: Chunk) -> float:
        """Bytes of what the chunk receives for one micro-batch (in the compute dtype: the executor's message
        dtype), and of the gradient it sends back for it; 1/tp of each sequence under sequence parallelism."""
        d = self.cfg.d_model / self.sp
        tokens = {HIDDEN: self.src_tokens, MEMORY: self.src_tokens, MEMORY_AND_HIDDEN: self.src_tokens + self.tokens}
        return tokens.get(chunk.receives, 0.0) * d * self.act

    def chunk_activation_bytes(self, chunk: Chunk, recompute: int | None = None) -> float:
        """Activation bytes one micro-batch keeps on `chunk` until its backward (with recompute every k layers: the
        input of each k-layer group, plus one group's full activations while it is being recomputed), the
        messages it keeps included. Embeddings, final norms and the loss are not recomputed."""
        return self.chunk_held_bytes(chunk, recompute) + self._recomputed(chunk, recompute)

    def chunk_held_bytes(self, chunk: Chunk, recompute: int | None = None) -> float:
        """What one micro-batch's forward leaves held on `chunk` until its backward: chunk_activation_bytes
        without the group a recomputation rebuilds inside the backward (chunk_transients counts that)."""
        k = self.recompute if recompute is None else recompute
        extras = sum(x.kept_bytes for x in self._extras(chunk))
        layers = sum(
            n * cost.act_bytes if k <= 0 else math.ceil(n / k) * cost.boundary_bytes
            for n, cost in self._runs(chunk)
            if n
        )
        return layers + extras + self._messages(chunk) + self.history_bytes(chunk)

    def _recomputed(self, chunk: Chunk, recompute: int | None = None) -> float:
        """The full activations of the largest layer group a recomputation rebuilds at once (0 without)."""
        k = self.recompute if recompute is None else recompute
        return max([min(k, n) * cost.act_bytes for n, cost in self._runs(chunk) if n and k > 0], default=0.0)

    def history_bytes(self, chunk: Chunk) -> float:
        """DLCL's extra activation bytes for one micro-batch on `chunk`: the history entries it receives beyond
        the one hidden any scheme receives (model/span.py: all earlier layers' normalised outputs of the stack),
        and per layer it holds two hiddens more than Pre-LN keeps: its normalised output (read by every later
        layer) and its output itself (the input of that norm, while the next layer's input is a new tensor, the
        combination). Recomputation keeps them too: they are the segments' outputs. 0 for other schemes."""
        if self.cfg.residual != "dlcl":
            return 0.0
        d = self.cfg.d_model
        received = (chunk.enc_lo if chunk.has_encoder and not chunk.src_embed else 0) * self.src_tokens + (
            chunk.dec_lo if chunk.has_decoder and not chunk.tgt_embed else 0
        ) * self.tokens
        own = 2 * ((chunk.enc_hi - chunk.enc_lo) * self.src_tokens + (chunk.dec_hi - chunk.dec_lo) * self.tokens)
        return (received + own) * d * self.act / self.sp

    def message_bytes(self, chunk: Chunk) -> float:
        """Bytes `chunk` sends to the next chunk for one micro-batch (its input gradient travels back with the same
        size): the encoder hidden, the encoder output, or the encoder output and the decoder hidden, each hidden
        DLCL's whole history so far (model/span.py); 1/tp of each sequence under sequence parallelism."""
        d = self.cfg.d_model
        dense = self.cfg.residual == "dlcl"
        shapes = chunk.message_shapes(False, 1, 1, 1, d, dense)  # per token: scaled by the tokens below
        total = 0.0
        for what, shape in zip(chunk.sends, shapes):
            tokens = self.tokens if what.name == "DECODER_HIDDEN" else self.src_tokens
            total += math.prod(shape) * tokens * self.act / self.sp
        return total

    def _extras(self, chunk: Chunk) -> list[Cost]:
        out = []
        if chunk.src_embed:
            out.append(self.embedding(self.vocab, self.src_tokens))
        if chunk.tgt_embed:
            out.append(self.embedding(self.tgt_vocab, self.tokens))
        if SCHEMES[self.cfg.residual].final_norm:
            if chunk.ends_encoder:
                out.append(self.final_norm(self.src_tokens))
            if chunk.output:
                out.append(self.final_norm(self.tokens))
        if chunk.output:
            out.append(self.output())
        return out

    def chunk_weight_grad_bytes(self, chunk: Chunk) -> float:
        """Bytes one micro-batch keeps on `chunk` from its B to its W under a split backward: every linear's input
        and output gradient (with or without recomputation: the recomputed linear inputs live until W), a
        received hidden state the first layer's linears read, and the encoder output the cross-attentions read
        without a copy."""
        d, c = self.cfg.d_model / self.sp, self.act
        held = sum(n * cost.w_bytes for n, cost in self._runs(chunk)) + sum(x.w_bytes for x in self._extras(chunk))
        if chunk.receives == HIDDEN:
            held += self.src_tokens * d * c - self._reads(self.src_tokens, 3)
        elif chunk.receives == MEMORY_AND_HIDDEN:
            held += self.tokens * d * c - self._reads(self.tokens, 3)
        if chunk.has_decoder and chunk.receives in (MEMORY, MEMORY_AND_HIDDEN):
            held += self.src_tokens * d * c
        elif chunk.ends_encoder and chunk.has_decoder and not self._casts:
            held += self.src_tokens * d * STREAM_BYTES
        return held

    def chunk_transients(self, chunk: Chunk, split: bool = True) -> tuple[float, float, float]:
        """Bytes above what was held before it that one action of `chunk` reaches while it runs (measured with
        megabranch-train --rehearse): the forward its activations plus a few float32 hidden states, or the loss's
        logits with their float32 copy; B a few float32 hidden-state gradients, the loss's two float32 gradients
        of the logits, or an embedding table's dense float32 gradient; W the weight gradients in the compute
        dtype. split: the schedule splits its backward (what B leaves held is then what waits for W)."""
        c, d, tp = self.act, self.cfg.d_model, self.tp
        stream = (self.tokens if chunk.has_decoder else self.src_tokens) * d * STREAM_BYTES  # one hidden, float32
        # a layer's temporaries of the stream's size (tensor parallelism adds the all-reduced copies)
        f, b = (3 if tp == 1 else 5) * stream, 5 * stream
        if chunk.output:  # the vocabulary-parallel loss's backward makes four float32 tensors of the logits' size
            rows = math.ceil(self.tgt_vocab / tp)
            f = max(f, self.tokens * rows * (c + (4 if c < 4 else 0)))  # the logits (and their float32 copy)
            b = max(b, (2 if tp == 1 else 4) * self.tokens * rows * 4)
        if self.recompute > 0:  # a recomputed group while its backward runs (the loss's part is freed by then)
            freed = self.output().kept_bytes if chunk.output else 0.0
            b = max(b, self._recomputed(chunk) + 4 * stream - freed)
        act = self.chunk_held_bytes(chunk)
        for embedded, vocab in ((chunk.src_embed, self.vocab), (chunk.tgt_embed, self.tgt_vocab)):
            if embedded:  # the table's dense gradient comes last, once B has freed most of the activations
                left = self.chunk_weight_grad_bytes(chunk) if split else 0.0
                b = max(b, left - act + math.ceil(vocab / tp) * d * 4 + 3 * stream)
        w = c * self.chunk_linear_params(chunk)
        return act + f, b, w

    def chunk_linear_params(self, chunk: Chunk) -> float:
        """Parameters the chunk's matrix products use (its layers', and the output projection's table)."""
        return sum(n * cost.linear_params for n, cost in self._runs(chunk)) + (
            self.output().linear_params if chunk.output else 0.0
        )

    def chunk_phase_times(self, layout: Layout) -> list[tuple[float, float, float]]:
        """(forward, B, W) time of one micro-batch on each chunk, in Cost.time units: the forward a third of the
        work, W the weight-gradient products, B the rest of the backward plus, with recomputation, the recomputed
        forward of the chunk's layers. A backward that is not split takes B + W."""
        out = []
        for chunk, cost in zip(layout.chunks, self.chunk_costs(layout)):
            fwd = cost.time / 3
            layers = (
                (chunk.enc_hi - chunk.enc_lo) * self.encoder_layer().time
                + (chunk.dec_hi - chunk.dec_lo) * self.decoder_layer().time
            ) / 3
            recompute = layers if self.recompute > 0 else 0.0
            out.append((fwd, cost.time - fwd - cost.w_flops + recompute, cost.w_flops))
        return out

    def chunk_step_flops(self, layout: Layout, chunk: Chunk, m: int) -> float:
        """FLOPs of `m` micro-batches' forward and backward on `chunk`, the recomputed forward of its layers
        included (parallel.recompute)."""
        again = sum(n * cost.f_flops for n, cost in self._runs(chunk)) if self.recompute > 0 else 0.0
        return m * (self.chunk_costs(layout)[chunk.index].flops + again)

    def chunk_params(self, chunk: Chunk) -> float:
        """Parameters the chunk holds: its layers, and one copy of every embedding table it uses (the source
        and target embeddings, and the output projection's table when it is tied)."""
        return self.params_of([chunk])

    def params_of(self, chunks: list) -> float:
        """Parameters of chunks that live on one rank: their layers, and each embedding table they use once
        (chunks of a rank share one copy, stage.build_stage)."""
        cfg, d = self.cfg, self.cfg.d_model
        n, tables = 0.0, set()
        for chunk in chunks:
            n += (chunk.enc_hi - chunk.enc_lo) * self.encoder_layer().params + (
                chunk.dec_hi - chunk.dec_lo
            ) * self.decoder_layer().params
            if chunk.src_embed:
                tables.add("src")
            if chunk.tgt_embed:
                tables.add("tgt")
            if chunk.output:
                tables.add("tgt" if cfg.share_decoder_input_output_embed else "out")
            if SCHEMES[cfg.residual].final_norm:
                n += 2 * d * (int(chunk.ends_encoder) + int(chunk.output))
        if cfg.share_all_embeddings:
            tables = {"src" if t == "tgt" else t for t in tables}
        return n + sum(math.ceil((self.vocab if t == "src" else self.tgt_vocab) / self.tp) * d for t in tables)

    def buffer_bytes(self, chunks: list) -> float:
        """Bytes of the buffers chunks of one rank hold: every embedder's float32 sinusoidal table (a slice
        holding a tied table only for its output projection has one too), and each chunk's two stacks' residual
        coefficients (r and s, float32 scalars)."""
        cfg = self.cfg
        embedders = sum(
            int(c.src_embed)
            + int(c.tgt_embed)
            + int(c.output and cfg.share_decoder_input_output_embed and not c.tgt_embed)
            for c in chunks
        )
        return embedders * (cfg.position_offset + cfg.max_positions) * cfg.d_model * 4 + len(chunks) * 2 * 2 * 4

    def chunk_memory(self, chunk: Chunk) -> float:
        """Weights + grads + optimizer states and one micro-batch's activations of a chunk, in bytes."""
        return self.chunk_params(chunk) * self.state_bytes + self.chunk_activation_bytes(chunk)

    def memory_of_span(self, lo: int, hi: int) -> float:
        """chunk_memory of the chunk holding layers [lo, hi) of E0..E(N-1) D0..D(M-1) (memoised)."""
        key = ("span", lo, hi)
        if key not in self._cache:
            n_enc, n_dec = self.cfg.encoder_layers, self.cfg.decoder_layers
            chunk = Chunk.of_layers(lo, hi, n_enc, n_dec)
            self._cache[key] = self.chunk_memory(chunk)
        return self._cache[key]

    def chunk_costs(self, layout: Layout) -> list[Cost]:
        units = self.units()
        b = layout.bounds()
        costs = []
        for c in range(layout.num_chunks):
            total = Cost()
            for u in units[b[c] : b[c + 1]]:
                total = total + u
            costs.append(total)
        return costs
