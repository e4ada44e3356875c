"""Keep DeepSpeed's fp32 gradient norm, which it computes and drops."""

from __future__ import annotations


def keep_fp32_grad_norm(engine) -> None:
    """DeepSpeed reports the global gradient norm only from its fp16 / bf16 / ZeRO optimizers; on the plain fp32
    path it computes the norm in clip_fp32_gradients and drops it (and skips the call when clipping is off).
    Keep it, as the native engines log it: clip with an infinite threshold when clipping is off (a no-op that
    still measures) and record what DeepSpeed's clip_grad_norm_ returns."""
    if engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization():
        return
    from deepspeed.runtime.utils import clip_grad_norm_  # optional dependency

    if engine.gradient_clipping() <= 0.0:
        engine._config.gradient_clipping = float("inf")

    def clip_and_keep():
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_and_keep
