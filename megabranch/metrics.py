"""Training metrics: one JSON line per interval in <save_dir>/log.jsonl, TensorBoard scalars, a progress bar."""

from __future__ import annotations

import json
import os
import sys
import time


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

    def log(self, record: dict, tag: str = "train") -> None:
        record = {"tag": tag, **record, "wall": round(time.time() - self.start, 3)}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for k, v in record.items():
                if k not in ("step", "tag") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{tag}/{k}", v, step)
            self.writer.flush()
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

    def log(self, record: dict, tag: str = "train") -> None:
        pass

    def progress(self, step: int, loss: float, alpha: float) -> None:
        pass

    def close(self) -> None:
        pass
