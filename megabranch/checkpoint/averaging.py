"""fairseq-style checkpoint averaging: the mean of the parameters of several checkpoints of one model."""

from __future__ import annotations

from ..errors import UserError
from .reading import read_meta
from .resharding import consolidate


def average(step_dirs_: list[str]) -> tuple[dict, dict]:
    """fairseq's average_checkpoints: the mean (in float64, cast back) of the parameters of several
    checkpoints of one model, any layouts. -> (full parameters, meta of the newest)."""
    if not step_dirs_:
        raise UserError("no checkpoints to average")
    metas = [read_meta(s) for s in step_dirs_]
    models = [consolidate(s, m, optimizer=False)[0] for s, m in zip(step_dirs_, metas)]
    keys = set(models[0])
    for s, m in zip(step_dirs_, models):
        if set(m) != keys or any(m[k].shape != models[0][k].shape for k in keys):
            raise UserError(f"{s} has different parameters than {step_dirs_[0]}; cannot average")
    avg = {}
    for k in models[0]:
        t = models[0][k]
        avg[k] = (sum(m[k].double() for m in models) / len(models)).to(t.dtype) if t.is_floating_point() else t
    newest = max(zip(metas, step_dirs_), key=lambda x: int(x[0]["step"]))[0]
    return avg, newest
