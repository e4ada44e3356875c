"""Training metrics: one JSON line per interval in <save_dir>/log.jsonl, TensorBoard scalars, a progress bar.

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
from .progress import ProgressBar, bar_wanted


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
        self.bar = ProgressBar(total_steps, bar_wanted(progress))
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
        if tag != "train" or not self.bar.enabled:
            shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "tag")
            self._clear()
            print(f"[{tag}] {shown}", file=sys.stderr, flush=True)

    def progress(self, step: int, loss: float, alpha: float) -> None:
        self.bar.show(step, f"loss {loss:.3f} alpha {alpha:.3f}")

    def _clear(self) -> None:
        self.bar.clear()

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
