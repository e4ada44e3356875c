"""Stopping a run early without losing work: SIGTERM / SIGUSR1 (what SLURM and torchrun send before a kill)
and a wall-clock limit (--exit-duration-mins, Megatron's name).

A signal only sets a flag; the run loop asks after every step whether any rank has one (one all-reduce of a
reason code, so a signal that reached a single rank stops them all at the same step), then every rank saves one
coordinated
checkpoint and the run ends with exit code 75 (errors.EXIT_REQUEUE): run the same command with --resume auto
to continue. A rank blocked in a wait notices the flag when the wait returns (every wait is bounded by
parallel.timeout_s).

The stop is re-entrant: once the ranks have agreed to stop (`ending()`), the stop signals are ignored until the
process exits, however many arrive (SLURM's scancel and torchrun's forwarding each send one; an impatient user
more): they never interrupt the checkpoint, and the default action (death, 143) is never restored before exit 75.
"""

from __future__ import annotations

import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# why a rank wants to stop, as the number the ranks agree on (the largest wins): 0 it does not
_DEADLINE = 1
_SIGNAL_CODE = {"SIGTERM": 2, "SIGUSR1": 3}


class StopRequest:
    """What may stop a run after its current step: a signal received since install(), or the deadline."""

    def __init__(self, exit_duration_mins: float | None = None, started: float | None = None):
        self.started = time.time() if started is None else started
        self.minutes = exit_duration_mins
        self.deadline = None if exit_duration_mins is None else self.started + 60.0 * exit_duration_mins
        self.signal: str | None = None
        self._previous: dict = {}
        self._ending = False

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name

    def install(self) -> StopRequest:
        """Catch the stop signals (only the main thread may: elsewhere the deadline alone applies)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back (not after ending(): the process is on its way out)."""
        if self._ending:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def ending(self) -> None:
        """The run stops now (saves, then exits 75): from here the stop signals are ignored (SIG_IGN, which,
        unlike a Python handler, Python's own shutdown leaves in place) until the process exits."""
        self._ending = True
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    def code(self) -> int:
        """Whether (> 0) and why this rank wants to stop now; the loop takes the largest over the ranks."""
        if self.signal is not None:
            return _SIGNAL_CODE[self.signal]
        return _DEADLINE if self.deadline is not None and time.time() >= self.deadline else 0

    def reason(self, code: int) -> str:
        """Why the run stops, from the code the ranks agreed on (a signal may have reached another rank only)."""
        for name, c in _SIGNAL_CODE.items():
            if c == code:
                return f"on {name}"
        return f"after --exit-duration-mins {self.minutes:g}" if self.minutes is not None else "after the time limit"
