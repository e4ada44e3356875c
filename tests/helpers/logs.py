"""Reading a run's log.jsonl."""

from __future__ import annotations

import json
import os


def read_log(path: str) -> list[dict]:
    """Every record in order; a line cut short by SIGKILL (not JSON) is skipped."""
    out = []
    with open(path) as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def records_by_step(path: str, tag: str = "train", drop: tuple[str, ...] = ()) -> dict:
    """step -> the last record with this tag (a resumed run re-logs the steps after its checkpoint), without the
    keys in `drop`. `path` is a log.jsonl or the save directory holding it."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.jsonl")
    return {r["step"]: {k: v for k, v in r.items() if k not in drop} for r in read_log(path) if r["tag"] == tag}
