"""Dynamic loss scaling for fp16 over a process grid, one process included (training/precision.py). It follows
torch.amp.GradScaler's rules and checkpoint format, so fp16 checkpoints written with GradScaler still resume.

The loss is multiplied by `scale` before backward, so small fp16 gradients do not flush to zero; the gradients are
divided by it again before clipping and the update. An overflow (an inf or nan gradient anywhere) skips the step
and multiplies the scale by `backoff_factor`; `growth_interval` steps in a row without one multiply it by
`growth_factor`. The engine decides "overflow" once for the whole grid (training/engine.py), and every rank calls
`update` with that decision, so every rank's scaler holds the same state and every rank skips together.

`state_dict()` has GradScaler's keys.
"""

from __future__ import annotations

import torch


class DynamicLossScaler:
    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.growth_tracker = 0  # steps without overflow since the last change of scale

    @torch.no_grad()
    def unscale_(self, params) -> None:
        """Divide every gradient of `params` by the scale (in place; each tensor once)."""
        grads = list({id(p): p.grad for p in params if p.grad is not None}.values())
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        """After a step: back off on overflow, grow after growth_interval clean steps (GradScaler's rule)."""
        if overflow:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": self.growth_tracker,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
        self.growth_tracker = int(state.get("_growth_tracker", 0))
