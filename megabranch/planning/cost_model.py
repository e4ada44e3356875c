"""The cost of each layer kind of a model config for one micro-batch on one tensor-parallel rank: FLOPs, memory
traffic, parameters and activation bytes; what the balanced split (partition.py) and the memory plan
(memory.py) weigh."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..parallel.layout import Chunk, Layout
from ..residual import SCHEMES

MACHINE_BALANCE = 150.0  # FLOPs per byte of memory traffic (about an H100's bf16 peak / HBM bandwidth)


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

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.flops + o.flops, self.traffic + o.traffic, self.params + o.params,
                    self.act_bytes + o.act_bytes, self.boundary_bytes + o.boundary_bytes,
                    self.kept_bytes + o.kept_bytes, self.w_flops + o.w_flops, self.w_bytes + o.w_bytes)

    @property
    def time(self) -> float:
        """A roofline-style time in FLOP units: compute plus memory traffic at the machine balance."""
        return self.flops + MACHINE_BALANCE * self.traffic


class CostModel:
    """Per-layer-kind costs of a ModelConfig for micro-batches of `tokens` target tokens.

    Matrix FLOPs count 2 per multiply-add, backward = 2 x forward (half of a linear's backward is its weight
    gradient, `w_flops`). Activation bytes follow what autograd keeps (inputs of every linear, attention output
    and log-sum-exp, LayerNorm inputs, the ReLU output), in `act_size`-byte elements; `w_bytes` what a split
    backward keeps from its B to its W (weight_grad.py: each linear's input and output gradient; the encoder
    output a cross-attention reads is counted once, with the chunk); with tensor parallelism the head / FFN /
    vocabulary dimensions are divided by tp, and with sequence parallelism (parallel/sequence_parallel.py) so is
    everything of the replicated regions (`self.sp`): the linears' (B, L, d) inputs (a column-parallel linear
    keeps its input's sequence slice, from F to B and from B to W), the LayerNorm inputs, the hidden states,
    the embeddings' outputs, the encoder output and what crosses a stage.
    """

    def __init__(self, cfg, vocab: int, tgt_vocab: int | None = None, tp: int = 1, tokens: int = 4096,
                 src_len: int = 64, tgt_len: int = 64, act_size: int = 4, recompute: int = 0,
                 state_bytes_per_param: float = 16.0, sequence_parallel: bool = False):
        self.cfg, self.tp, self.act = cfg, tp, act_size
        self.sp = tp if sequence_parallel else 1  # what the replicated regions' (B, L, d) tensors are divided by
        self.recompute = recompute
        self.state_bytes = state_bytes_per_param  # fp32 weights + grads + Adam moments
        self._cache: dict = {}
        self.vocab, self.tgt_vocab = vocab, tgt_vocab or vocab
        self.tokens, self.S, self.T = tokens, src_len, tgt_len
        self.src_tokens = tokens * src_len / tgt_len  # source tokens in a micro-batch of `tokens` target tokens

    def _attn(self, q_tokens: float, kv_tokens: float, kv_len: float, causal: bool) -> Cost:
        d, tp, h = self.cfg.d_model, self.tp, self.cfg.n_heads
        proj = 2 * d * d / tp * (2 * q_tokens + 2 * kv_tokens)  # q, out on queries; k, v on keys
        span = kv_len / 2 if causal else kv_len
        scores = 2 * 2 * q_tokens * span * d / tp  # QK^T and AV
        sp = self.sp
        act = (q_tokens * (d / sp + 2 * d / tp + h / tp + d / sp)  # input, q + attention out, lse, LN input
               + kv_tokens * 2 * d / tp)  # k, v
        params = (4 * d * d + 3 * d) / tp + d + 2 * d  # weights, q/k/v biases sharded, out bias + LN replicated
        # B -> W: the query input (the key/value input too under self-attention), out_proj's input; the output
        # gradients of q, k, v and out_proj
        w_in = q_tokens * (d / sp + d / tp)
        w_grad = q_tokens * (d / tp + d) + kv_tokens * 2 * d / tp
        return Cost(flops=3 * (proj + scores), params=params, act_bytes=act * self.act, w_flops=proj,
                    w_bytes=(w_in + w_grad) * self.act)

    def _ffn(self, tokens: float) -> Cost:
        d, f, tp, sp = self.cfg.d_model, self.cfg.ffn_dim, self.tp, self.sp
        return Cost(flops=3 * 2 * 2 * d * f / tp * tokens, params=(2 * d * f + f) / tp + d + 2 * d,
                    act_bytes=tokens * (d / sp + f / tp + d / sp) * self.act,  # input, ReLU output, LN input
                    w_flops=2 * 2 * d * f / tp * tokens,
                    w_bytes=tokens * (d / sp + 2 * f / tp + d) * self.act)  # fc1 / fc2 inputs and output gradients

    def encoder_layer(self) -> Cost:
        if "enc" in self._cache:
            return self._cache["enc"]
        n = self.src_tokens
        c = self._attn(n, n, self.S, False) + self._ffn(n)
        c.boundary_bytes = self.hidden_bytes(n)
        self._cache["enc"] = c
        return c

    def decoder_layer(self) -> Cost:
        if "dec" in self._cache:
            return self._cache["dec"]
        n = self.tokens
        c = self._attn(n, n, self.T, True) + self._attn(n, self.src_tokens, self.S, False) + self._ffn(n)
        c.boundary_bytes = self.hidden_bytes(n)
        self._cache["dec"] = c
        return c

    def hidden_bytes(self, tokens: float) -> float:
        """Bytes of one (B, L, d) hidden state of `tokens` positions on this rank (1/tp of them under sequence
        parallelism)."""
        return tokens * self.cfg.d_model * self.act / self.sp

    def embedding(self, vocab: int, tokens: float) -> Cost:
        d, tp = self.cfg.d_model, self.tp
        rows = math.ceil(vocab / tp)
        # gather + scale + positions forward; a dense (rows x d) gradient is zeroed and scattered into backward
        traffic = 4 * (3 * tokens * d + rows * d + tokens * d)
        return Cost(traffic=traffic, params=rows * d, kept_bytes=self.hidden_bytes(tokens))

    def output(self) -> Cost:
        d, tp, n = self.cfg.d_model, self.tp, self.tokens
        rows = math.ceil(self.tgt_vocab / tp)
        tied = self.cfg.share_decoder_input_output_embed
        # logits in float32 for the loss: log-softmax keeps its output; ~6 passes over them
        return Cost(flops=3 * 2 * n * d * rows, traffic=6 * 4 * n * rows, params=0 if tied else rows * d,
                    kept_bytes=self.hidden_bytes(n) + 2 * n * rows * 4, w_flops=2 * n * d * rows,
                    w_bytes=self.hidden_bytes(n) + n * rows * self.act)  # the hidden input, the logits' gradient

    def final_norm(self, tokens: float) -> Cost:
        d = self.cfg.d_model
        return Cost(traffic=4 * 4 * tokens * d, params=2 * d, kept_bytes=self.hidden_bytes(tokens))

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

    def chunk_activation_bytes(self, chunk: Chunk, recompute: int | None = None) -> float:
        """Activation bytes one micro-batch keeps on `chunk` until its backward (with recompute every k layers: the
        input of each k-layer group, plus one group's full activations while it is being recomputed). The encoder
        output a decoder chunk receives is kept once; embeddings, final norms and the loss are not recomputed."""
        k = self.recompute if recompute is None else recompute
        cfg, d = self.cfg, self.cfg.d_model
        extras = sum(x.kept_bytes for x in self._extras(chunk))
        if chunk.has_decoder:
            extras += self.hidden_bytes(self.src_tokens)  # the encoder output, input of every cross-attention
        runs = [(chunk.enc_hi - chunk.enc_lo, self.encoder_layer()),
                (chunk.dec_hi - chunk.dec_lo, self.decoder_layer())]
        layers = 0.0
        transient = 0.0
        for n, cost in runs:
            if n == 0:
                continue
            if k <= 0:
                layers += n * cost.act_bytes
            else:
                layers += math.ceil(n / k) * cost.boundary_bytes
                transient = max(transient, min(k, n) * cost.act_bytes)
        return layers + transient + extras + self.history_bytes(chunk)

    def history_bytes(self, chunk: Chunk) -> float:
        """DLCL's extra activation bytes for one micro-batch on `chunk`: the history entries it receives beyond
        the one hidden any scheme receives (model/span.py: all earlier layers' normalised outputs of the stack),
        and per layer it holds two hiddens more than Pre-LN keeps: its normalised output (read by every later
        layer) and its output itself (the input of that norm, while the next layer's input is a new tensor, the
        combination). Recomputation keeps them too: they are the segments' outputs. 0 for other schemes."""
        if self.cfg.residual != "dlcl":
            return 0.0
        d = self.cfg.d_model
        received = (chunk.enc_lo if chunk.has_encoder and not chunk.src_embed else 0) * self.src_tokens + \
            (chunk.dec_lo if chunk.has_decoder and not chunk.tgt_embed else 0) * self.tokens
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
        """Bytes one micro-batch keeps on `chunk` from its B to its W under a split backward (with or without
        recomputation: the recomputed linear inputs live until W)."""
        runs = (chunk.enc_hi - chunk.enc_lo) * self.encoder_layer().w_bytes + \
            (chunk.dec_hi - chunk.dec_lo) * self.decoder_layer().w_bytes
        extra = self.hidden_bytes(self.src_tokens) if chunk.has_decoder else 0.0  # the encoder output
        return runs + extra + sum(x.w_bytes for x in self._extras(chunk))

    def chunk_phase_times(self, layout: Layout) -> list[tuple[float, float, float]]:
        """(forward, B, W) time of one micro-batch on each chunk, in Cost.time units: the forward a third of the
        work, W the weight-gradient products, B the rest of the backward plus, with recomputation, the recomputed
        forward of the chunk's layers. A backward that is not split takes B + W."""
        out = []
        for chunk, cost in zip(layout.chunks, self.chunk_costs(layout)):
            fwd = cost.time / 3
            layers = ((chunk.enc_hi - chunk.enc_lo) * self.encoder_layer().time
                      + (chunk.dec_hi - chunk.dec_lo) * self.decoder_layer().time) / 3
            recompute = layers if self.recompute > 0 else 0.0
            out.append((fwd, cost.time - fwd - cost.w_flops + recompute, cost.w_flops))
        return out

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
            n += ((chunk.enc_hi - chunk.enc_lo) * self.encoder_layer().params
                  + (chunk.dec_hi - chunk.dec_lo) * self.decoder_layer().params)
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
