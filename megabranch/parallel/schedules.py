"""Pipeline schedules as plain action lists: for each pipeline rank, the ordered (op, virtual chunk, micro-batch)
actions it runs, their validation, and an ideal-machine simulator that proves an action list deadlock-free and
measures its bubble (tests, benchmarks, planning).

    op "F"   forward
    op "B"   backward: the whole backward (gpipe, 1f1b, interleaved), or only its input gradient (zb-h1, zb-v:
             what the previous chunk waits for)
    op "W"   the weight gradients of a backward whose B ran earlier (zb-h1, zb-v; weight_grad.py)

    gpipe        every forward, then every backward
    1f1b         PipeDream-flush: rank r runs pp - r - 1 forwards, then one forward / one backward
    interleaved  1F1B over vpp chunks per rank (Megatron's interleaving); micro-batches run in rounds of about pp
                 (torch.distributed.pipelining's rounds, with the last rounds one shorter when pp does not divide m)
    zb-h1        1F1B whose backwards are split into B and W (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"):
                 rank r postpones its W's by r slots, so the W's fill the cool-down bubble; 1F1B's peak memory
    zb-v         two chunks per rank in a V (chunk c < pp on rank c, the rest mirrored back: layout.py), the
                 paper's ZB-V order as torch.distributed.pipelining's ScheduleZBVZeroBubble computes it
"""

from __future__ import annotations

from ..config import PIPELINE_SCHEDULES as SCHEDULES
from ..errors import UserError
from .layout import chunk_index

SPLIT_BACKWARD = ("zb-h1", "zb-v")  # schedules whose backward is a B and a later W


def splits_backward(kind: str) -> bool:
    return kind in SPLIT_BACKWARD


def placement_of(kind: str) -> str:
    """How the schedule places chunks on ranks (layout.PLACEMENTS)."""
    return "v" if kind == "zb-v" else "interleaved"


def check_schedule(kind: str, pp: int, vpp: int, m: int) -> None:
    """One-line UserErrors for combinations a schedule cannot run."""
    if kind not in SCHEDULES:
        raise UserError(f"parallel.schedule={kind!r} is invalid: must be one of {', '.join(SCHEDULES)} (or auto)")
    if m < 1:
        raise UserError(f"optim.update_freq={m}: a step needs at least one micro-batch")
    if kind == "interleaved" and vpp < 2:
        raise UserError("parallel.schedule=interleaved needs parallel.vpp >= 2 (virtual stages per rank)")
    if kind == "1f1b" and vpp > 1:
        raise UserError(
            f"parallel.vpp={vpp} needs parallel.schedule=interleaved (or zb-v with vpp 2, or gpipe); 1f1b runs one "
            f"chunk per rank"
        )
    if kind == "zb-h1" and vpp != 1:
        raise UserError(
            f"parallel.schedule=zb-h1 runs one chunk per rank: set parallel.vpp=1 (got {vpp}), or use "
            f"zb-v for two chunks per rank"
        )
    if kind == "zb-v" and vpp != 2:
        raise UserError(
            f"parallel.schedule=zb-v runs exactly two chunks per rank in a V: set parallel.vpp=2 (got {vpp})"
        )


def interleaved_rounds(pp: int, m: int) -> list[int]:
    """Micro-batches per round of the interleaved schedules: max(1, m // pp) rounds of as equal a size as possible
    (larger ones first), so each round holds at least pp micro-batches when m >= pp. Equal to torch's rounds
    (max(1, m // pp) rounds of m / rounds) whenever torch's are defined (m a multiple of the number of rounds)."""
    n = max(1, m // pp)
    base, extra = divmod(m, n)
    return [base + 1] * extra + [base] * (n - extra)


def _interleaved(pp: int, vpp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    rounds = interleaved_rounds(pp, m)
    fwd, bwd, start = [], [], 0
    for size in rounds:  # each round runs through chunk 0, then chunk 1, ...; its backwards in reverse chunk order
        mbs = range(start, start + size)
        fwd += [("F", v, i) for v in range(vpp) for i in mbs]
        bwd += [("B", v, i) for v in reversed(range(vpp)) for i in mbs]
        start += size
    total = m * vpp
    warm = min((vpp - 1) * rounds[0] + 2 * (pp - rank - 1), total)
    acts = fwd[:warm]
    for j in range(total - warm):
        acts += [fwd[warm + j], bwd[j]]
    return acts + bwd[total - warm :]


def _zb_h1(pp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """1F1B with B and W apart; rank r's W of micro-batch j follows its B of micro-batch j + r."""
    warm = min(pp - rank - 1, m)
    acts = [("F", 0, i) for i in range(warm)]
    for j in range(m):
        if warm + j < m:
            acts.append(("F", 0, warm + j))
        acts.append(("B", 0, j))
        if j >= rank:
            acts.append(("W", 0, j - rank))
    return acts + [("W", 0, j) for j in range(max(m - rank, 0), m)]


def _zb_v(pp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """The ZB-V order (virtual chunk 0 = chunk `rank` going down the V, 1 = chunk 2 pp - 1 - rank coming back),
    computed for max(m, 2 pp - 1) micro-batches and cut to the m that exist."""
    n = max(2 * pp - 1, m)
    acts: list = []
    f = [0, 0]  # next forward / backward of each virtual chunk
    b = [0, 0]

    def fwd(v):
        acts.append(("F", v, f[v]))
        f[v] += 1

    def bwd(v, weights=True):
        acts.append(("B", v, b[v]))
        if weights:
            acts.append(("W", v, b[v]))
        b[v] += 1

    for _ in range(2 * (pp - rank) - 1):
        fwd(0)
    for _ in range(rank):
        fwd(1)
        fwd(0)
    for _ in range(pp - rank):
        fwd(1)
        bwd(1)
    while f[1] < f[0] or f[0] < n:
        if f[0] < n:
            fwd(0)
        bwd(0)
        fwd(1)
        bwd(1)
    w = list(b)  # the W's still owed start here
    for _ in range(rank):
        bwd(0, weights=False)
        bwd(1, weights=False)
    for _ in range(pp - rank):
        bwd(0, weights=False)
        acts.append(("W", 0, w[0]))
        w[0] += 1
    acts += [("W", 1, i) for i in range(w[1], b[1])] + [("W", 0, i) for i in range(w[0], b[0])]
    return [a for a in acts if a[2] < m]


def schedule_actions(kind: str, pp: int, vpp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """Pipeline rank `rank`'s ordered actions: ("F" | "B" | "W", virtual chunk v, micro-batch i)."""
    if kind == "gpipe":
        fwd = [("F", v, i) for v in range(vpp) for i in range(m)]
        return fwd + [("B", v, i) for v in reversed(range(vpp)) for i in range(m)]
    if kind == "1f1b":
        warm = min(pp - rank - 1, m)
        acts = [("F", 0, i) for i in range(warm)]
        for j in range(m - warm):
            acts += [("F", 0, warm + j), ("B", 0, j)]
        return acts + [("B", 0, j) for j in range(m - warm, m)]
    if kind == "interleaved":
        return _interleaved(pp, vpp, m, rank)
    if kind == "zb-h1":
        return _zb_h1(pp, m, rank)
    if kind == "zb-v":
        return _zb_v(pp, m, rank)
    raise ValueError(f"unknown schedule {kind!r}")


def _per_chunk(t, k: int) -> list[float]:
    return [float(t)] * k if isinstance(t, (int, float)) else [float(x) for x in t]


def simulate_ranks(kind: str, pp: int, vpp: int, m: int, f_time=1.0, b_time=2.0, w_time=0.0) -> tuple[float, list]:
    """Run every rank's action list on an ideal machine (compute only, free messages, a rank waits for the data
    it needs) -> (makespan, busy time of each rank). Raises RuntimeError on a deadlock.

    Times are per chunk (a number, or one per chunk in pipeline order): a forward takes f_time, a B b_time and a
    W w_time; a schedule that does not split its backward runs B and W as one backward of b_time + w_time."""
    k = pp * vpp
    f, b, w = _per_chunk(f_time, k), _per_chunk(b_time, k), _per_chunk(w_time, k)
    split = splits_backward(kind)
    where = placement_of(kind)
    acts = [schedule_actions(kind, pp, vpp, m, r) for r in range(pp)]
    done: dict = {}  # (op, chunk, mb) -> finish time
    pos, clock, busy = [0] * pp, [0.0] * pp, [0.0] * pp
    remaining = sum(len(a) for a in acts)
    while remaining:
        progressed = False
        for r in range(pp):
            if pos[r] >= len(acts[r]):
                continue
            op, v, i = acts[r][pos[r]]
            c = chunk_index(r, v, pp, where)
            if op == "F":
                deps = [("F", c - 1, i)] if c > 0 else []
                dur = f[c]
            elif op == "B":
                deps = [("F", c, i)] + ([("B", c + 1, i)] if c < k - 1 else [])
                dur = b[c] if split else b[c] + w[c]
            else:
                deps = [("B", c, i)]
                dur = w[c]
            if all(d in done for d in deps):
                start = max([clock[r]] + [done[d] for d in deps])
                clock[r] = start + dur
                busy[r] += dur
                done[(op, c, i)] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {kind} deadlocks for pp={pp} vpp={vpp} m={m}")
    return max(clock), busy


def simulate(kind: str, pp: int, vpp: int, m: int, f_time=1.0, b_time=2.0, w_time=0.0) -> float:
    """The makespan of simulate_ranks (for tests, the benchmark and planning)."""
    return simulate_ranks(kind, pp, vpp, m, f_time, b_time, w_time)[0]


def simulated_bubble(kind: str, pp: int, vpp: int, m: int, f_time=1.0, b_time=2.0, w_time=0.0) -> float:
    """The idle fraction of the ideal-machine run: 1 - (mean busy time of a rank) / makespan."""
    span, busy = simulate_ranks(kind, pp, vpp, m, f_time, b_time, w_time)
    return 1.0 - sum(busy) / (len(busy) * span) if span > 0 else 0.0
