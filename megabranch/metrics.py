"""Training metrics: one JSON line per interval in <save_dir>/log.jsonl, TensorBoard scalars, a progress bar;
and reading log.jsonl back as one curve per run (read_log).

log.jsonl is strict JSON (RFC 8259): a non-finite number (a diverged loss, an overflowed gradient norm) is
written as null, never as the NaN / Infinity that only Python reads.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from .checkpoint.space import is_disk_full
from .errors import UserError


def strict_json(value):
    """`value` with every non-finite float replaced by None (nested dicts and lists too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


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

    def log(self, record: dict, tag: str = "train", echo: bool = True) -> None:
        """Append `record` to log.jsonl (and TensorBoard); echo: also print it (unless the bar shows it)."""
        record = {"tag": tag, **record, "wall": round(time.time() - self.start, 3)}
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise UserError(f"no space left on the device of {self.path} (writing the training log)") from None
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


def read_log(path: str, tag: str = "train") -> list[dict]:
    """The `tag` records of a log.jsonl in order, as one run: at a "start" record (a run starting or resuming at
    step S) the records after S that an earlier run logged are dropped, since the resumed run logs those steps
    again. A line that is not JSON (cut short by a kill) is skipped with a warning."""
    if not os.path.isfile(path):
        raise UserError(f"log file not found: {path}")
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{n} is not JSON; skipped", file=sys.stderr)
                continue
            if rec.get("tag") == "start":
                rows = [r for r in rows if r.get("step", 0) <= rec.get("step", 0)]
            elif rec.get("tag", "train") == tag:
                rows.append(rec)
    return rows
