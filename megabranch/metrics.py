"""Training metrics: one JSON line per interval in <save_dir>/log.jsonl, TensorBoard scalars, a progress bar.

log.jsonl is strict JSON (RFC 8259): a non-finite number (a diverged loss, an overflowed gradient norm) is
written as null, never as the NaN / Infinity that only Python reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time


def strict_json(value):
    """`value` with every non-finite float replaced by None (nested dicts and lists too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _size(path: str) -> int | None:
    """The size of a file (0: none yet), or None when even that cannot be read."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0
    except OSError:
        return None


class MetricsLogger:
    def __init__(self, save_dir: str, total_steps: int, tensorboard: bool = True, progress: str = "auto"):
        os.makedirs(save_dir, exist_ok=True)
        self.path = os.path.join(save_dir, "log.jsonl")
        self.total = total_steps
        self.bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(save_dir, "tb"))
            except ImportError:  # tensorboard is a listed dependency, but logging must never kill a run
                print("warning: tensorboard not installed; TensorBoard scalars are off", file=sys.stderr)
        self.start = time.time()
        self._unwritten: list[str] = []  # records log.jsonl could not take yet (a full or failing filesystem)
        self._refused = False

    def log(self, record: dict, tag: str = "train", echo: bool = True) -> None:
        """Append `record` to log.jsonl (and TensorBoard); echo: also print it (unless the bar shows it)."""
        record = {"tag": tag, **record, "wall": round(time.time() - self.start, 3)}
        self._unwritten.append(json.dumps(strict_json(record), allow_nan=False) + "\n")
        self._append()
        if self.writer is not None:
            step = record["step"]
            for k, v in record.items():
                if k not in ("step", "tag") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{tag}/{k}", v, step)
            self.writer.flush()
        if not echo:
            return
        if tag != "train" or not self.bar:
            shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "tag")
            self._clear()
            print(f"[{tag}] {shown}", file=sys.stderr, flush=True)

    def _append(self) -> None:
        """Append the records not yet in log.jsonl. A filesystem that refuses (full, read-only, gone) does not end
        the run: the records wait in memory for the next try (said once per outage), and a partly written one is
        cut off again, so the file holds whole lines only."""
        size = _size(self.path)
        try:
            with open(self.path, "a") as fh:
                fh.write("".join(self._unwritten))
        except OSError as e:
            if size is not None:
                with contextlib.suppress(OSError):
                    os.truncate(self.path, size)
            if not self._refused:
                print(f"warning: cannot write {self.path} ({e.strerror or e}): its records wait in memory until it "
                      "can be written", file=sys.stderr)
            self._refused = True
            return
        self._unwritten.clear()
        self._refused = False

    def progress(self, step: int, loss: float, alpha: float) -> None:
        if not self.bar:
            return
        width = 30
        done = int(width * step / max(self.total, 1))
        elapsed = time.time() - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
        sys.stderr.write(
            f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {loss:.3f} alpha {alpha:.3f} "
            f"eta {eta:5.0f}s "
        )
        sys.stderr.flush()

    def _clear(self) -> None:
        if self.bar:
            sys.stderr.write("\r" + " " * 100 + "\r")

    def close(self) -> None:
        self._clear()
        if self._unwritten:
            self._append()
            if self._unwritten:
                print(f"warning: {len(self._unwritten)} records could not be written to {self.path}", file=sys.stderr)
        if self.writer is not None:
            self.writer.close()


class SilentLogger:
    """What ranks other than global rank 0 log: nothing."""

    def log(self, record: dict, tag: str = "train", echo: bool = True) -> None:
        pass

    def progress(self, step: int, loss: float, alpha: float) -> None:
        pass

    def close(self) -> None:
        pass
