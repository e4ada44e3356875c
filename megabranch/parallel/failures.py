"""When a peer rank stalls or dies: recognise the communication error, name the peer where it is known, and end
the run with one line per surviving rank instead of a gloo traceback (or a hang).

Every wait is bounded by the process-group timeout (parallel.timeout_s; grid.init_distributed and build_grid
give it to every group): gloo's collectives and point-to-point waits raise "Timed out waiting ..." after it, and
a peer that died raises "Connection reset/closed by peer" at once. NCCL's watchdog aborts the process after the
same timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING), with NCCL's own message; docs/launch.md says more.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from ..errors import EXIT_FAILED, RunEnded

# what gloo, NCCL and the TCP store put in the errors they raise as plain RuntimeError (compared in lower case)
_MARKERS = ("gloo", "nccl", "processgroup", "connection reset", "connection closed", "connection refused",
            "broken pipe", "timed out", "timeout", "pair closure")


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


def comm_failure_ended(e: BaseException, where: str, timeout_s: float) -> RunEnded:
    """The one line a surviving rank prints for the communication failure `e` that happened at `where`."""
    text = str(e.cause if isinstance(e, PeerFailure) else e)
    peer = f"rank {e.peer}" if isinstance(e, PeerFailure) else "a peer rank"
    if _timed_out(text):
        what = f"no answer from {peer} within parallel.timeout_s={timeout_s:g} s (stalled, hung or dead)"
    else:
        what = f"lost the connection to {peer} (it died or closed its process group)"
    detail = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    if "] " in detail:  # gloo's "[.../pair.cc:537] Read error ...": keep the error, drop the source location
        detail = detail.split("] ", 1)[1]
    return RunEnded(f"error: rank {_rank()}, {where}: {what} [{detail[:160]}]", EXIT_FAILED, abrupt=True)
