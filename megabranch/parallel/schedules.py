"""Pipeline schedules as plain action lists: for each pipeline rank, the ordered (F | B, virtual chunk, micro-batch)
actions it runs (GPipe, 1F1B, interleaved 1F1B), their validation, and an ideal-machine simulator that proves an
action list deadlock-free and measures its bubble (tests, benchmarks, planning)."""

from __future__ import annotations

from ..errors import UserError

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
