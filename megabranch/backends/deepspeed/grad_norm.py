"""Keep DeepSpeed's fp32 gradient norm, which it computes and drops, and count it as the native engine does."""

from __future__ import annotations

from ...parallel.clip import clip_grad_norm_


def keep_fp32_grad_norm(engine, grid) -> None:
    """DeepSpeed reports the global gradient norm only from its fp16 / bf16 / ZeRO optimizers; on the plain fp32
    path it computes the norm in clip_fp32_gradients and drops it (and skips the call when clipping is off), and
    counts a parameter not marked `model_parallel` on the first pipeline stage's rank 0 only, which under tensor
    parallelism drops the replicated parameters of every later stage. Measure and clip there with megabranch's
    parallel/clip.py over `grid` instead (each element once: tensor-parallel shards on every rank, replicated
    parameters on tp rank 0, tied copies (`pp_duplicate`) by their owner), with an infinite threshold when
    clipping is off (a no-op that still measures), and record the norm."""
    if engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization():
        return
    if engine.gradient_clipping() <= 0.0:
        engine._config.gradient_clipping = float("inf")

    def clip_and_keep():
        engine._global_grad_norm = clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(), grid)

    engine.clip_fp32_gradients = clip_and_keep
