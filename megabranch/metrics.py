"""Training metrics: one JSON line per interval in <save_dir>/log.jsonl, TensorBoard scalars, a progress bar;
reading log.jsonl back as one curve per run (read_log), and the training health records (training/health.py) as a
depth x time heatmap (TensorBoard, plots).

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

import numpy as np

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
        self.bar = ProgressBar(total_steps, bar_wanted(progress))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(save_dir, "tb"))
            except ImportError:  # tensorboard is a listed dependency, but logging must never kill a run
                print("warning: tensorboard not installed; TensorBoard scalars are off", file=sys.stderr)
        self.start = time.time()
        self._health: list[dict] = []  # the run's health records, for TensorBoard's heatmap
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
        if tag != "train" or not self.bar.enabled:
            shown = " | ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "tag"
            )
            self._clear()
            print(f"[{tag}] {shown}", file=sys.stderr, flush=True)

    def log_health(self, record: dict) -> None:
        """A training health record (training/health.py) to log.jsonl; in TensorBoard the bottom and top layer of
        each stack as scalars and the whole depth x time picture of log10 gradient norms as an image."""
        self.log(record, tag="health", echo=False)
        if self.writer is None:
            return
        step = record["step"]
        for key in ("grad_norm", "update_ratio"):
            for name, v in record.get(key, {}).items():
                if isinstance(v, list) and v:
                    self.writer.add_scalar(f"health/{key}/{name}_bottom", v[0], step)
                    self.writer.add_scalar(f"health/{key}/{name}_top", v[-1], step)
                elif isinstance(v, (int, float)):
                    self.writer.add_scalar(f"health/{key}/{name}", v, step)
        self._health.append(record)
        image = heatmap_image(self._health)
        if image is not None:
            self.writer.add_image(
                "health/grad_norm_log10 (rows: layers, encoder bottom first)", image, step, dataformats="HWC"
            )
        self.writer.flush()

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
                print(
                    f"warning: cannot write {self.path} ({e.strerror or e}): its records wait in memory until it "
                    "can be written",
                    file=sys.stderr,
                )
            self._refused = True
            return
        self._unwritten.clear()
        self._refused = False

    def progress(self, step: int, loss: float, alpha: float) -> None:
        self.bar.show(step, f"loss {loss:.3f} alpha {alpha:.3f}")

    def _clear(self) -> None:
        self.bar.clear()

    def close(self) -> None:
        self._clear()
        if self._unwritten:
            self._append()
            if self._unwritten:
                print(f"warning: {len(self._unwritten)} records could not be written to {self.path}", file=sys.stderr)
        if self.writer is not None:
            self.writer.close()


# --- health records read back (TensorBoard's heatmap, the plots) -----------------------------------------------


def depth_rows(record: dict, key: str = "grad_norm") -> tuple[list[str], list[float]]:
    """One record's per-layer values in depth order, encoder bottom first, then the decoder: (labels, values)."""
    labels, values = [], []
    for stack in ("encoder", "decoder"):
        layers = record.get(key, {}).get(stack, [])
        labels += [f"{stack}.{i}" for i in range(len(layers))]
        values += layers
    return labels, values


def heatmap(records: list[dict], key: str = "grad_norm") -> tuple[list[str], list[int], list[list[float]]]:
    """log10 of `key` per layer (rows, depth order) and record (columns, time): (row labels, steps, rows).
    Zero or missing values are NaN (drawn blank)."""
    labels: list[str] = []
    columns, steps = [], []
    for r in records:
        if key not in r:
            continue
        names, values = depth_rows(r, key)
        labels = names if len(names) > len(labels) else labels
        columns.append([math.log10(v) if v and v > 0 else math.nan for v in values])
        steps.append(r["step"])
    rows = [[col[i] if i < len(col) else math.nan for col in columns] for i in range(len(labels))]
    return labels, steps, rows


def heatmap_image(records: list[dict]):
    """The depth x time heatmap of log10 gradient norms as an RGB uint8 array (H = layers with the encoder's
    bottom at the foot of the picture, W = log intervals), or None without matplotlib or data."""
    labels, _, rows = heatmap(records)
    if not rows or not rows[0]:
        return None
    try:
        from matplotlib import colormaps
    except ImportError:
        return None
    values = np.array(rows[::-1], dtype=np.float64)  # the top row of the image is the last decoder layer
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    scaled = np.nan_to_num((values - lo) / max(hi - lo, 1e-12), nan=0.0)
    rgb = colormaps["viridis"](scaled)[..., :3]
    return (rgb * 255).astype(np.uint8)


class SilentLogger:
    """What ranks other than global rank 0 log: nothing."""

    def log(self, record: dict, tag: str = "train", echo: bool = True) -> None:
        pass

    def log_health(self, record: dict) -> None:
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
