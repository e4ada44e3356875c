"""Pipeline partitioning: a cost model per layer kind and a balanced contiguous split into stages.

The model is cut as one sequence of layers, encoder then decoder:

    E0 E1 ... E(N-1) D0 D1 ... D(M-1)

into K = pp * vpp contiguous chunks ("virtual stages"). Chunk c runs on pipeline rank c % pp (Megatron's
interleaved placement: with vpp = 2 and pp = 4, rank 0 holds chunks 0 and 4). The extras ride with a fixed
layer, so they are never an orphan stage:

    source embedding + positions      with E0
    target embedding + positions      with D0
    encoder final norm (pre_ln)       with E(N-1)
    decoder final norm, output projection and the loss   with D(M-1)

and their cost is added to that layer's. The split minimises the heaviest chunk, then (among the splits that
reach that minimum) maximises the lightest one. A split whose heaviest chunk is more than MAX_IMBALANCE times
its lightest is refused with a one-line error that prints the best split found: give it (or any other)
explicitly as `parallel.layout` to accept an uneven split knowingly. Nothing is ever split unevenly in silence.

Layout strings (`parallel.layout`) list the chunks in pipeline order, separated by `|`; a chunk is a
comma-separated list of inclusive layer ranges `E<a>-<b>` / `D<a>-<b>` (or a single `E<a>` / `D<a>`):

    "E0-3|E4-5,D0|D1-3|D4-5"      6+6 layers over pp=2, vpp=2: rank 0 runs chunks 0 and 2, rank 1 chunks 1 and 3

Every layer must appear exactly once, in order, each chunk non-empty.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import numpy as np

from ..errors import UserError
from ..model.span import Span

MAX_IMBALANCE = 1.5  # heaviest / lightest chunk above which an automatic split is refused
MACHINE_BALANCE = 150.0  # FLOPs per byte of memory traffic (about an H100's bf16 peak / HBM bandwidth)


# --- the layout ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk(Span):
    """One virtual stage: a span of the model (encoder layers [enc_lo, enc_hi), decoder layers [dec_lo, dec_hi),
    the embeddings with E0 / D0, the output with D(M-1)) and where it runs."""

    index: int = 0  # position in the pipeline, 0 .. K-1
    pp: int = 1

    @classmethod
    def of_layers(cls, lo: int, hi: int, n_enc: int, n_dec: int, index: int = 0, pp: int = 1) -> "Chunk":
        return cls(**vars(Span.of_layers(lo, hi, n_enc, n_dec)), index=index, pp=pp)

    @property
    def span(self) -> Span:
        """What the chunk holds, without where it runs (what the model is built from)."""
        return Span(**{f.name: getattr(self, f.name) for f in fields(Span)})

    @property
    def rank(self) -> int:  # pipeline rank that runs it
        return self.index % self.pp

    @property
    def virtual(self) -> int:  # its position among that rank's chunks
        return self.index // self.pp


@dataclass(frozen=True)
class Layout:
    chunks: tuple  # of Chunk, in pipeline order
    pp: int
    vpp: int
    n_enc: int
    n_dec: int

    def __str__(self) -> str:
        return "|".join(c.describe() for c in self.chunks)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def chunks_of_rank(self, pp_rank: int) -> list:
        """The chunks pipeline rank `pp_rank` runs, in virtual order."""
        return [c for c in self.chunks if c.rank == pp_rank]

    def ranks_holding(self, what: str) -> list[int]:
        """Pipeline ranks holding 'src_embed', 'tgt_embed' or 'output'."""
        return sorted({c.rank for c in self.chunks if getattr(c, what)})

    @classmethod
    def from_bounds(cls, bounds: list[int], pp: int, vpp: int, n_enc: int, n_dec: int) -> "Layout":
        """Chunk c holds layers [bounds[c], bounds[c+1]) of the sequence E0..E(N-1) D0..D(M-1)."""
        chunks = tuple(Chunk.of_layers(bounds[c], bounds[c + 1], n_enc, n_dec, index=c, pp=pp)
                       for c in range(len(bounds) - 1))
        return cls(chunks, pp, vpp, n_enc, n_dec)

    def bounds(self) -> list[int]:
        out = [0]
        for c in self.chunks:
            out.append(c.enc_hi + c.dec_hi if c.has_decoder else c.enc_hi)
        return out


_PART = re.compile(r"^([ED])(\d+)(?:-(\d+))?$")


def parse_layout(text: str, n_enc: int, n_dec: int, pp: int, vpp: int) -> Layout:
    """Parse and validate a `parallel.layout` string; every problem is a one-line UserError."""
    want = pp * vpp
    pieces = [p.strip() for p in text.strip().split("|")]
    if len(pieces) != want:
        raise UserError(
            f"parallel.layout={text!r} has {len(pieces)} stages but parallel.pp * parallel.vpp = {pp} * {vpp} = {want}"
        )
    total = n_enc + n_dec
    bounds, pos = [0], 0  # pos: next expected layer in the sequence E0..E(N-1) D0..D(M-1)
    for s, piece in enumerate(pieces):
        if not piece:
            raise UserError(f"parallel.layout={text!r}: stage {s} is empty; every stage needs at least one layer")
        for item in (i.strip() for i in piece.split(",")):
            m = _PART.match(item)
            if not m:
                raise UserError(
                    f"parallel.layout={text!r}: cannot read {item!r} in stage {s}; write layer ranges like E0-3 or D5"
                )
            kind, lo = m.group(1), int(m.group(2))
            hi = int(m.group(3)) if m.group(3) is not None else lo
            n = n_enc if kind == "E" else n_dec
            if hi < lo:
                raise UserError(f"parallel.layout={text!r}: range {item} in stage {s} runs backwards")
            if hi >= n:
                raise UserError(
                    f"parallel.layout={text!r}: {item} in stage {s} is past the model's last {kind} layer "
                    f"({kind}{n - 1}; model.{'encoder' if kind == 'E' else 'decoder'}_layers={n})"
                )
            start = lo if kind == "E" else n_enc + lo
            if start != pos:
                expect = f"E{pos}" if pos < n_enc else f"D{pos - n_enc}"
                raise UserError(
                    f"parallel.layout={text!r}: stage {s} has {item} where {expect} comes next; "
                    f"list every layer once, encoder before decoder, in order"
                )
            pos = (hi if kind == "E" else n_enc + hi) + 1
        bounds.append(pos)
    if pos != total:
        missing = f"E{pos}" if pos < n_enc else f"D{pos - n_enc}"
        raise UserError(f"parallel.layout={text!r} stops before {missing}; it must cover all {n_enc}+{n_dec} layers")
    return Layout.from_bounds(bounds, pp, vpp, n_enc, n_dec)


# --- the cost model --------------------------------------------------------------------------------------

@dataclass
class Cost:
    """Cost of one piece for one micro-batch on one rank (after the tensor-parallel split)."""

    flops: float = 0.0  # forward + backward
    traffic: float = 0.0  # bytes of memory-bound work (embedding gathers/scatters, softmax over the vocabulary)
    params: float = 0.0  # parameter count held by this rank
    act_bytes: float = 0.0  # layer activations kept for backward, one micro-batch, no recompute
    boundary_bytes: float = 0.0  # the hidden state at this piece's input (kept per layer group with recompute)
    kept_bytes: float = 0.0  # activations outside the recomputed layers (embeddings, final norms, logits)

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.flops + o.flops, self.traffic + o.traffic, self.params + o.params,
                    self.act_bytes + o.act_bytes, self.boundary_bytes + o.boundary_bytes,
                    self.kept_bytes + o.kept_bytes)

    @property
    def time(self) -> float:
        """A roofline-style time in FLOP units: compute plus memory traffic at the machine balance."""
        return self.flops + MACHINE_BALANCE * self.traffic


class CostModel:
    """Per-layer-kind costs of a ModelConfig for micro-batches of `tokens` target tokens.

    Matrix FLOPs count 2 per multiply-add, backward = 2 x forward. Activation bytes follow what autograd keeps
    (inputs of every linear, attention output and log-sum-exp, LayerNorm inputs, the ReLU output), in
    `act_size`-byte elements; with tensor parallelism the head / FFN / vocabulary dimensions are divided by tp.
    """

    def __init__(self, cfg, vocab: int, tgt_vocab: int | None = None, tp: int = 1, tokens: int = 4096,
                 src_len: int = 64, tgt_len: int = 64, act_size: int = 4, recompute: int = 0,
                 state_bytes_per_param: float = 16.0):
        self.cfg, self.tp, self.act = cfg, tp, act_size
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
        act = (q_tokens * (d + 2 * d / tp + h / tp + d)  # input, q + attention out, lse, LN input
               + kv_tokens * 2 * d / tp)  # k, v
        params = (4 * d * d + 3 * d) / tp + d + 2 * d  # weights, q/k/v biases sharded, out bias + LN replicated
        return Cost(flops=3 * (proj + scores), params=params, act_bytes=act * self.act)

    def _ffn(self, tokens: float) -> Cost:
        d, f, tp = self.cfg.d_model, self.cfg.ffn_dim, self.tp
        return Cost(flops=3 * 2 * 2 * d * f / tp * tokens, params=(2 * d * f + f) / tp + d + 2 * d,
                    act_bytes=tokens * (d + f / tp + d) * self.act)

    def encoder_layer(self) -> Cost:
        if "enc" in self._cache:
            return self._cache["enc"]
        n = self.src_tokens
        c = self._attn(n, n, self.S, False) + self._ffn(n)
        c.boundary_bytes = n * self.cfg.d_model * self.act
        self._cache["enc"] = c
        return c

    def decoder_layer(self) -> Cost:
        if "dec" in self._cache:
            return self._cache["dec"]
        n = self.tokens
        c = self._attn(n, n, self.T, True) + self._attn(n, self.src_tokens, self.S, False) + self._ffn(n)
        c.boundary_bytes = n * self.cfg.d_model * self.act
        self._cache["dec"] = c
        return c

    def embedding(self, vocab: int, tokens: float) -> Cost:
        d, tp = self.cfg.d_model, self.tp
        rows = math.ceil(vocab / tp)
        # gather + scale + positions forward; a dense (rows x d) gradient is zeroed and scattered into backward
        traffic = 4 * (3 * tokens * d + rows * d + tokens * d)
        return Cost(traffic=traffic, params=rows * d, kept_bytes=tokens * d * self.act)

    def output(self) -> Cost:
        d, tp, n = self.cfg.d_model, self.tp, self.tokens
        rows = math.ceil(self.tgt_vocab / tp)
        tied = self.cfg.share_decoder_input_output_embed
        # logits in float32 for the loss: log-softmax keeps its output; ~6 passes over them
        return Cost(flops=3 * 2 * n * d * rows, traffic=6 * 4 * n * rows, params=0 if tied else rows * d,
                    kept_bytes=n * d * self.act + 2 * n * rows * 4)

    def final_norm(self, tokens: float) -> Cost:
        d = self.cfg.d_model
        return Cost(traffic=4 * 4 * tokens * d, params=2 * d, kept_bytes=tokens * d * self.act)

    def units(self) -> list[Cost]:
        """The cost of each layer of the sequence E0..E(N-1) D0..D(M-1), extras folded into their layer."""
        cfg = self.cfg
        n, m = cfg.encoder_layers, cfg.decoder_layers
        enc, dec = self.encoder_layer(), self.decoder_layer()
        out = [enc + Cost() for _ in range(n)] + [dec + Cost() for _ in range(m)]
        out[0] = out[0] + self.embedding(self.vocab, self.src_tokens)
        out[n] = out[n] + self.embedding(self.tgt_vocab, self.tokens)
        if cfg.residual == "pre_ln":
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
            extras += self.src_tokens * d * self.act  # the encoder output, input of every cross-attention
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
        return layers + transient + extras

    def _extras(self, chunk: Chunk) -> list[Cost]:
        out = []
        if chunk.src_embed:
            out.append(self.embedding(self.vocab, self.src_tokens))
        if chunk.tgt_embed:
            out.append(self.embedding(self.tgt_vocab, self.tokens))
        if self.cfg.residual == "pre_ln":
            if chunk.ends_encoder:
                out.append(self.final_norm(self.src_tokens))
            if chunk.output:
                out.append(self.final_norm(self.tokens))
        if chunk.output:
            out.append(self.output())
        return out

    def chunk_params(self, chunk: Chunk) -> float:
        """Parameters the chunk holds: its layers, and one copy of every embedding table it uses (the source
        and target embeddings, and the output projection's table when it is tied)."""
        cfg, d = self.cfg, self.cfg.d_model
        n = ((chunk.enc_hi - chunk.enc_lo) * self.encoder_layer().params
             + (chunk.dec_hi - chunk.dec_lo) * self.decoder_layer().params)
        tables = set()
        if chunk.src_embed:
            tables.add("src")
        if chunk.tgt_embed:
            tables.add("tgt")
        if chunk.output:
            tables.add("tgt" if cfg.share_decoder_input_output_embed else "out")
        if cfg.share_all_embeddings:
            tables = {"src" if t == "tgt" else t for t in tables}
        n += sum(math.ceil((self.vocab if t == "src" else self.tgt_vocab) / self.tp) * d for t in tables)
        if cfg.residual == "pre_ln":
            n += 2 * d * (int(chunk.ends_encoder) + int(chunk.output))
        return n

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


# --- the balanced split ----------------------------------------------------------------------------------
# Additive costs (balanced_bounds): weights per unit, one column per metric, each normalised to sum 1; a chunk's
# load is its largest column share. Bisection finds the smallest cap on the heaviest chunk (a greedy fill decides
# feasibility), then the largest floor on the lightest; for a (floor, cap) window the allowed starts of a chunk
# ending at j form an interval (prefix sums are monotone), so feasibility is an O(k * n) reachability table.
# Non-additive costs (balanced_bounds_fn, memory with per-chunk terms) use binary searches on cost(lo, hi).


def _normalised(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = w[:, None]
    total = w.sum(axis=0)
    total[total <= 0] = 1.0
    return w / total  # each column sums to 1


def _greedy_count(w: np.ndarray, cap: float) -> int:
    """Chunks a left-to-right greedy fill needs with no metric of any chunk above `cap` (huge if impossible)."""
    count, acc = 1, np.zeros(w.shape[1])
    for row in w:
        if (row > cap).any():
            return 10**9
        if (acc + row > cap).any():
            count, acc = count + 1, row.copy()
        else:
            acc = acc + row
    return count


def _reach(prefix: np.ndarray, k: int, lo: float, hi: float):
    """reach[j][i]: the first i units can be cut into j chunks, every metric of each chunk in [lo, hi]
    (lo applies to the chunk's largest metric). None if all n units cannot be cut into k such chunks."""
    n = prefix.shape[0] - 1
    tol = 1e-12
    idx = np.arange(n + 1)
    first = np.zeros(n + 1, dtype=np.int64)  # smallest allowed start i for end j
    last = idx - 1  # largest allowed start i for end j (non-empty chunks)
    for m in range(prefix.shape[1]):
        p = prefix[:, m]
        first = np.maximum(first, np.searchsorted(p, p - hi - tol, side="left"))
    # lower bound on the largest metric: for each end j, chunks starting at i <= last_any are heavy enough in
    # at least one metric; take the union over metrics = the max of the per-metric bounds
    heavy = np.full(n + 1, -1, dtype=np.int64)
    for m in range(prefix.shape[1]):
        p = prefix[:, m]
        heavy = np.maximum(heavy, np.searchsorted(p, p - lo + tol, side="right") - 1)
    last = np.minimum(last, heavy)
    reach = np.zeros((k + 1, n + 1), dtype=bool)
    reach[0, 0] = True
    ok = last >= first
    for j in range(1, k + 1):
        cs = np.concatenate([[0], np.cumsum(reach[j - 1])])  # cs[t] = reachable count among 0..t-1
        cnt = np.where(ok, cs[np.clip(last + 1, 0, n + 1)] - cs[np.clip(first, 0, n + 1)], 0)
        reach[j] = cnt > 0
    return reach if reach[k, n] else None


def balanced_bounds(weights, k: int) -> list[int]:
    """Cut the units into k contiguous non-empty chunks: minimal heaviest chunk, then maximal lightest chunk.

    `weights`: one cost per unit, or rows of several costs (e.g. time and memory) balanced together."""
    w = _normalised(weights)
    n = w.shape[0]
    if k > n:
        raise UserError(f"parallel.pp * parallel.vpp = {k} stages but the model has only {n} layers; lower pp or vpp")
    prefix = np.vstack([np.zeros((1, w.shape[1])), np.cumsum(w, axis=0)])
    lo_b, hi_b = float(w.max()), 1.0
    while hi_b - lo_b > 1e-12:  # bisection on the heaviest-chunk cap; the greedy fill decides feasibility
        mid = (lo_b + hi_b) / 2
        if _greedy_count(w, mid) <= k:
            hi_b = mid
        else:
            lo_b = mid
    cap = hi_b
    best = _reach(prefix, k, 0.0, cap)
    if best is None:  # pragma: no cover - greedy feasibility implies reachability
        raise AssertionError("partition: no split under the cap")
    lo_l, hi_l = 0.0, cap
    while hi_l - lo_l > 1e-9 * cap:  # bisection on the lightest-chunk floor
        mid = (lo_l + hi_l) / 2
        r = _reach(prefix, k, mid, cap)
        if r is not None:
            lo_l, best = mid, r
        else:
            hi_l = mid
    floor, tol = lo_l, 1e-12
    bounds, j = [n], n
    for c in range(k, 0, -1):  # walk back through the reachability table
        for i in range(j - 1, -1, -1):
            seg = prefix[j] - prefix[i]
            if best[c - 1, i] and seg.max() >= floor - tol and (seg <= cap + tol).all():
                bounds.append(i)
                j = i
                break
        else:  # pragma: no cover - the table says a path exists
            raise AssertionError("partition backtrack failed")
    return bounds[::-1]


def balanced_bounds_fn(n: int, k: int, cost) -> list[int]:
    """balanced_bounds for a chunk cost(lo, hi) that is not a sum over units but grows as a chunk grows (e.g.
    memory with per-chunk terms): binary searches on cost replace the prefix-sum windows."""
    if k > n:
        raise UserError(f"parallel.pp * parallel.vpp = {k} stages but the model has only {n} layers; lower pp or vpp")

    def furthest(i: int, cap: float) -> int:  # largest j with cost(i, j) <= cap (i if none)
        lo, hi = i, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(i, mid) <= cap:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def chunks_needed(cap: float) -> int:
        i, count = 0, 0
        while i < n:
            j = furthest(i, cap)
            if j == i:
                return 10**9
            i, count = j, count + 1
        return count

    def reach(floor: float, cap: float):
        # for end j: starts i in [a_j, b_j] have floor <= cost(i, j) <= cap (cost falls as i grows)
        a = np.zeros(n + 1, dtype=np.int64)
        b = np.full(n + 1, -1, dtype=np.int64)
        for j in range(1, n + 1):
            lo, hi = 0, j - 1  # first i with cost(i, j) <= cap
            while lo < hi:
                mid = (lo + hi) // 2
                if cost(mid, j) <= cap:
                    hi = mid
                else:
                    lo = mid + 1
            a[j] = lo if cost(lo, j) <= cap else j
            lo, hi = -1, j - 1  # last i with cost(i, j) >= floor
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if cost(mid, j) >= floor:
                    lo = mid
                else:
                    hi = mid - 1
            b[j] = lo
        table = np.zeros((k + 1, n + 1), dtype=bool)
        table[0, 0] = True
        ok = b >= a
        for c in range(1, k + 1):
            cs = np.concatenate([[0], np.cumsum(table[c - 1])])
            cnt = np.where(ok, cs[np.clip(b + 1, 0, n + 1)] - cs[np.clip(a, 0, n + 1)], 0)
            table[c] = cnt > 0
        return (table, a, b) if table[k, n] else None

    hi_c = cost(0, n)
    lo_c = max(cost(i, i + 1) for i in range(n))
    while hi_c - lo_c > 1e-9 * hi_c:
        mid = (lo_c + hi_c) / 2
        if chunks_needed(mid) <= k:
            hi_c = mid
        else:
            lo_c = mid
    cap = hi_c
    best = reach(0.0, cap)
    lo_f, hi_f = 0.0, cap
    while hi_f - lo_f > 1e-6 * cap:
        mid = (lo_f + hi_f) / 2
        r = reach(mid, cap)
        if r is not None:
            lo_f, best = mid, r
        else:
            hi_f = mid
    table, a, b = best
    bounds, j = [n], n
    for c in range(k, 0, -1):
        i = next(i for i in range(int(b[j]), int(a[j]) - 1, -1) if table[c - 1, i])
        bounds.append(i)
        j = i
    return bounds[::-1]


def imbalance(values: list[float]) -> float:
    """heaviest / lightest."""
    return max(values) / min(values) if min(values) > 0 else math.inf


BALANCE = ("time", "memory")


def unit_weights(cm: "CostModel", by: str = "time") -> np.ndarray:
    """(units x 1) weights for `by`: 'time' (roofline FLOPs) or 'memory' (bytes pinned per micro-batch)."""
    units = cm.units()
    if by not in BALANCE:
        raise UserError(f"parallel.balance={by!r} is invalid: must be one of {', '.join(BALANCE)}")
    col = [u.time for u in units] if by == "time" else [cm.memory(u) for u in units]
    return np.array(col)[:, None]


def plan_layout(cfg, pp: int, vpp: int = 1, vocab: int = 32000, tgt_vocab: int | None = None, tp: int = 1,
                layout: str = "", cost_model: "CostModel | None" = None, by: str = "time",
                max_imbalance: float = MAX_IMBALANCE, recompute: int = 0) -> Layout:
    """The layout for `parallel.layout` when given, else the balanced split of the cost model's units.

    by='time' (the default: a pipeline runs at the pace of its slowest stage) or 'memory' (what
    tools/memory_plan.py balances; paste the layout it prints into parallel.layout)."""
    n, m = cfg.encoder_layers, cfg.decoder_layers
    if vpp > 1 and pp == 1:
        raise UserError(f"parallel.vpp={vpp} needs parallel.pp > 1")
    if layout:
        return parse_layout(layout, n, m, pp, vpp)
    k = pp * vpp
    if k > n + m:
        raise UserError(
            f"parallel.pp * parallel.vpp = {pp} * {vpp} = {k} stages but the model has only {n}+{m} layers; "
            f"lower pp or vpp"
        )
    cm = cost_model or CostModel(cfg, vocab, tgt_vocab, tp, recompute=recompute)
    if by == "memory":  # per-chunk terms (table copies, the encoder output, one recomputed group) are not additive
        bounds = balanced_bounds_fn(n + m, k, cm.memory_of_span)
    else:
        bounds = balanced_bounds(unit_weights(cm, by), k)
    result = Layout.from_bounds(bounds, pp, vpp, n, m)
    if by == "time":
        per_chunk = [c.time for c in cm.chunk_costs(result)]
    else:
        per_chunk = [cm.chunk_memory(c) for c in result.chunks]
    ratio = imbalance(per_chunk)
    if ratio > max_imbalance:
        raise UserError(
            f"parallel: the most even split of {n}+{m} layers into pp*vpp={k} stages is uneven (heaviest stage "
            f"{ratio:.2f}x the lightest by {by}, limit {max_imbalance}): {result}; set parallel.layout to it (or "
            f"another) to accept that, or change parallel.pp / parallel.vpp"
        )
    return result
