"""The DeepSpeed JSON config, with megabranch's settings filled in where it is silent."""

from __future__ import annotations

import json
import os

from ...config import Config
from ...errors import UserError


def load_ds_config(path: str | None, cfg: Config) -> dict:
    """gradient_accumulation_steps = optim.update_freq (micro-batches per step; a different value is refused),
    gradient_clipping = optim.clip_norm, train_micro_batch_size_per_gpu = 1 (our micro-batches are token-sized;
    DeepSpeed only uses it for its reports), pipeline.pipe_partitioned/grad_partitioned = false."""
    ds: dict = {}
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--deepspeed_config: {path} not found")
        try:
            with open(path) as fh:
                ds = json.load(fh)
        except ValueError as e:
            raise UserError(f"--deepspeed_config: cannot parse {path}: {e}") from None
    o = cfg.optim
    gas = ds.get("gradient_accumulation_steps", o.update_freq)
    if gas != o.update_freq:
        raise UserError(
            f"{path}: gradient_accumulation_steps={gas} but optim.update_freq={o.update_freq}; they are "
            f"the same thing (micro-batches per step): make them equal or drop one"
        )
    ds["gradient_accumulation_steps"] = gas
    ds.setdefault("train_micro_batch_size_per_gpu", 1)
    ds.setdefault("gradient_clipping", float(o.clip_norm))
    ds.setdefault("steps_per_print", 10**9)  # megabranch logs the steps itself
    ds.setdefault("zero_allow_untested_optimizer", True)
    pipe = ds.setdefault("pipeline", {})
    pipe.setdefault("pipe_partitioned", False)
    pipe.setdefault("grad_partitioned", False)
    return ds
