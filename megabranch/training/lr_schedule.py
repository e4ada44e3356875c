"""The learning-rate schedule every engine uses: fairseq's inverse_sqrt."""

from __future__ import annotations

import math


def inverse_sqrt_lr(step: int, cfg) -> float:
    """Linear warmup from warmup_init_lr to lr over warmup_updates steps, then lr * sqrt(warmup / step).
    cfg: an OptimConfig; step: the 0-based global step about to be taken."""
    warmup = cfg.warmup_updates
    if warmup > 0 and step < warmup:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / warmup
    return cfg.lr * math.sqrt(max(warmup, 1) / max(step, 1))
