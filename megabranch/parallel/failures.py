"""When a peer rank stalls or dies: recognise the communication error, name the peer where it is known, and end
the run with one line per surviving rank instead of a gloo traceback (or a hang).

Every wait is bounded by the process-group timeout (parallel.timeout_s; grid.init_distributed and build_grid
give it to every group): gloo's collectives and point-to-point waits raise "Timed out waiting ..." after it, and
a peer that died raises "Connection reset/closed by peer" at once. NCCL's watchdog aborts the process after the
same timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING), with NCCL's own message; docs/launch.md says more.

One stalled rank makes its neighbours time out; when they exit, ranks further away see only their connections
close, and would blame a dead peer. So the first rank to time out leaves its line in the rendezvous store, and a
rank that lost a connection reports that first failure: with hundreds of ranks, every line then names the stall.
"""

from __future__ import annotations

import os
import threading
import time

import torch.distributed as dist

from ..errors import EXIT_FAILED, RunEnded

# what gloo, NCCL and the TCP store put in the errors they raise as plain RuntimeError (compared in lower case)
_MARKERS = (
    "gloo",
    "nccl",
    "processgroup",
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "timed out",
    "timeout",
    "pair closure",
)


class PeerFailure(RuntimeError):
    """A point-to-point wait on a known peer failed (timed out, or the connection broke)."""

    def __init__(self, peer: int, cause: BaseException):
        super().__init__(f"rank {peer}: {cause}")
        self.peer, self.cause = peer, cause


def is_comm_failure(e: BaseException) -> bool:
    """Whether `e` is a process group's error (a timeout or a lost peer), not a bug of ours."""
    if isinstance(e, PeerFailure) or isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _MARKERS)


def _timed_out(text: str) -> bool:
    text = text.lower()
    return "timed out" in text or "timeout" in text


def wait_for(work, peer: int) -> None:
    """work.wait() for a message to or from global rank `peer`; a failure (all a wait can raise is the process
    group's error: a timeout, a closed connection) names the peer."""
    try:
        work.wait()
    except PeerFailure:
        raise
    except RuntimeError as e:
        raise PeerFailure(peer, e) from e


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


# Bounds on the store calls of a failing rank: the store's host may be the stalled rank itself, and a TCPStore
# call to a stopped host blocks past its timeout, so each call runs in a thread the exiting rank leaves behind.
STORE_WAIT_S = 3.0  # how long a rank that lost a connection looks for the first failure's line
LINGER_S = 3.0  # how long a rank that timed out keeps its connections (and perhaps the store) up for the others


def _cause_key() -> str:
    # one key per torchrun attempt: a restarted job's store may still hold the previous attempt's line
    return f"megabranch/first_comm_failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _default_store():
    """The process group's rendezvous store, or None (no process group; a torch without the accessor)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except Exception:  # no store: the line goes without the first failure's
        return None


def _bounded(fn, limit_s: float):
    """fn() in a daemon thread: its result, or None when it raised or is still waiting after limit_s."""
    out = []

    def run():
        try:
            out.append(fn())
        except Exception:  # a store that is gone is expected here
            pass

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit_s)
    return out[0] if out else None


def publish_first_failure(store, line: str) -> None:
    """Leave `line` as the job's first communication failure unless another rank's is already there."""
    if store is not None:
        _bounded(lambda: store.compare_set(_cause_key(), "", line), STORE_WAIT_S)


def first_failure(store) -> str | None:
    """The first failure's line another rank left in the store, looked for during STORE_WAIT_S (it may be
    written a moment after its rank's connections close)."""
    if store is None:
        return None
    key, deadline = _cause_key(), time.monotonic() + STORE_WAIT_S
    # check, then get: a get of a missing key would block the store's one connection until the store's timeout
    while True:
        found = _bounded(lambda: store.check([key]), max(deadline - time.monotonic(), 0.1))
        if found:
            value = _bounded(lambda: store.get(key), max(deadline - time.monotonic(), 0.1))
            return value.decode() if value is not None else None
        if found is None or time.monotonic() >= deadline:  # the store is gone, or nobody timed out
            return None
        time.sleep(0.1)


def comm_failure_ended(e: BaseException, where: str, timeout_s: float) -> RunEnded:
    """The one line a surviving rank prints for the communication failure `e` that happened at `where`; a
    timeout is shared with the other ranks through the store, a lost connection reports the shared one."""
    text = str(e.cause if isinstance(e, PeerFailure) else e)
    peer = f"rank {e.peer}" if isinstance(e, PeerFailure) else "a peer rank"
    store = _default_store()
    if _timed_out(text):
        what = f"no answer from {peer} within parallel.timeout_s={timeout_s:g} s (stalled, hung or dead)"
        publish_first_failure(store, f"rank {_rank()}, {where}: {what}")
        if store is not None:
            time.sleep(LINGER_S)
    else:
        cause = first_failure(store)
        what = f"lost the connection to {peer} " + (
            f"after the job's first failure ({cause})" if cause else "(it died or closed its process group)"
        )
    detail = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    if "] " in detail:  # gloo's "[.../pair.cc:537] Read error ...": keep the error, drop the source location
        detail = detail.split("] ", 1)[1]
    return RunEnded(f"error: rank {_rank()}, {where}: {what} [{detail[:160]}]", EXIT_FAILED, abrupt=True)
