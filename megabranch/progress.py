"""A one-line progress bar on stderr with the time left (training steps, preprocessing lines)."""

from __future__ import annotations

import sys
import time


def bar_wanted(mode: str) -> bool:
    """auto: a bar when stderr is a terminal; bar: always; none: never (log.progress, --progress)."""
    return mode == "bar" or (mode == "auto" and sys.stderr.isatty())


class ProgressBar:
    """`show(done, note)` redraws `[###...] done/total note eta Ns` in place; the time left is the rate so far
    times what remains. Disabled, it prints nothing."""

    WIDTH = 30

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.start = time.time()

    def show(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        filled = int(self.WIDTH * done / max(self.total, 1))
        eta = (time.time() - self.start) / max(done, 1) * (self.total - done)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} "
            + (f"{note} " if note else "")
            + f"eta {eta:5.0f}s "
        )
        sys.stderr.flush()

    def clear(self) -> None:
        """Erase the bar (before another line is printed, and at the end)."""
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
