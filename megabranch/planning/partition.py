"""Pipeline partitioning: a balanced contiguous split of the layer sequence (layout.py) into pp * vpp chunks by
the cost model (cost_model.py).

The extras' cost is added to the layer they ride with. The split minimises the heaviest chunk, then (among the
splits that reach that minimum) maximises the lightest one. A split whose heaviest chunk is more than
MAX_IMBALANCE times its lightest is refused with a one-line error that prints the best split found: give it (or
any other) explicitly as `parallel.layout` to accept an uneven split knowingly. Nothing is ever split unevenly in
silence.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError
from ..parallel.layout import Layout, parse_layout
from .cost_model import CostModel

MAX_IMBALANCE = 1.5  # heaviest / lightest chunk above which an automatic split is refused


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


def _greedy_count(prefix: np.ndarray, cap: float, limit: int) -> int:
    """Chunks a left-to-right greedy fill needs with no metric of any chunk above `cap` (huge if impossible),
    counted up to limit + 1. Each chunk is one binary search per metric on the prefix sums (a row-by-row fill
    was 0.2 s per 1000-layer plan, most of a --dry-run's planning)."""
    n = prefix.shape[0] - 1
    count, i = 0, 0
    while i < n:
        j = min(
            int(np.searchsorted(prefix[:, m], prefix[i, m] + cap, side="right")) - 1 for m in range(prefix.shape[1])
        )
        if j <= i:  # the next unit alone is over the cap
            return 10**9
        count, i = count + 1, j
        if count > limit:
            break
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
        if _greedy_count(prefix, mid, k) <= k:
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


def unit_weights(cm: CostModel, by: str = "time") -> np.ndarray:
    """(units x 1) weights for `by`: 'time' (roofline FLOPs) or 'memory' (bytes pinned per micro-batch)."""
    units = cm.units()
    if by not in BALANCE:
        raise UserError(f"parallel.balance={by!r} is invalid: must be one of {', '.join(BALANCE)}")
    col = [u.time for u in units] if by == "time" else [cm.memory(u) for u in units]
    return np.array(col)[:, None]


def plan_layout(
    cfg,
    pp: int,
    vpp: int = 1,
    vocab: int = 32000,
    tgt_vocab: int | None = None,
    tp: int = 1,
    layout: str = "",
    cost_model: CostModel | None = None,
    by: str = "time",
    max_imbalance: float = MAX_IMBALANCE,
    recompute: int = 0,
    placement: str = "interleaved",
    sequence_parallel: bool = False,
) -> Layout:
    """The layout for `parallel.layout` when given, else the balanced split of the cost model's units; chunks
    are placed on ranks by `placement` (layout.PLACEMENTS; the schedule decides it).

    by='time' (the default: a pipeline runs at the pace of its slowest stage) or 'memory' (what
    megabranch.memory_plan balances; paste the layout it prints into parallel.layout)."""
    n, m = cfg.encoder_layers, cfg.decoder_layers
    if vpp > 1 and pp == 1:
        raise UserError(f"parallel.vpp={vpp} needs parallel.pp > 1")
    if layout:
        return parse_layout(layout, n, m, pp, vpp, placement)
    k = pp * vpp
    if k > n + m:
        raise UserError(
            f"parallel.pp * parallel.vpp = {pp} * {vpp} = {k} stages but the model has only {n}+{m} layers; "
            f"lower pp or vpp"
        )
    cm = cost_model or CostModel(cfg, vocab, tgt_vocab, tp, recompute=recompute, sequence_parallel=sequence_parallel)
    if by == "memory":  # per-chunk terms (table copies, the encoder output, one recomputed group) are not additive
        bounds = balanced_bounds_fn(n + m, k, cm.memory_of_span)
    else:
        bounds = balanced_bounds(unit_weights(cm, by), k)
    result = Layout.from_bounds(bounds, pp, vpp, n, m, placement)
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
