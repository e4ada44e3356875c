"""The result records of a sweep or a study: the statistics of the first gradient norms that both record, and
reading the records back."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from megabranch.errors import UserError


def gnorm_stats(gnorms: list[float], first: int) -> dict:
    """Statistics of the first `first` steps' gradient norms (the paper's Figure 3 is about these)."""
    g = np.array([x for x in gnorms[:first] if math.isfinite(x)], dtype=np.float64)
    if g.size == 0:
        return {"n": 0}
    lg = np.log(np.maximum(g, 1e-30))
    return {
        "n": int(g.size),
        "mean": float(g.mean()),
        "std": float(g.std()),
        "max": float(g.max()),
        "min": float(g.min()),
        "max_over_median": float(g.max() / max(np.median(g), 1e-30)),
        # mean |log g_t - log g_{t-1}|: 0 for a flat curve, large for a spiky one
        "mean_abs_dlog": float(np.abs(np.diff(lg)).mean()) if g.size > 1 else 0.0,
    }


def load_results(out: str, sub: str = "runs", what: str = "sweep") -> list[dict]:
    """Every <out>/<sub>/*.json (the results of a sweep, or of a study), in name order."""
    runs_dir = os.path.join(out, sub)
    if not os.path.isdir(runs_dir):
        raise UserError(f"no {what} results under {runs_dir}; run the {what} first")
    res = []
    for f in sorted(os.listdir(runs_dir)):
        if f.endswith(".json"):
            with open(os.path.join(runs_dir, f)) as fh:
                res.append(json.load(fh))
    return res
