"""How a step's arithmetic is done (optim.precision), for every native layout: fp32; bf16 autocast; fp16
autocast with dynamic loss scaling (training/loss_scaler.py: one scaler for every layout, one process included).

bf16 / fp16 run the model's forward under torch.autocast; the parameters, gradients and optimizer state stay
fp32. fp16 needs a CUDA device (the CPU's autocast has no fp16 matmul worth using, and GradScaler-style scaling
is only needed where fp16 gradients underflow).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError
from .loss_scaler import DynamicLossScaler

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """optim.precision on one device: the autocast context, the dtype activations travel in, the loss scaler."""

    def __init__(self, name: str, device: torch.device):
        if name == "fp16" and device.type != "cuda":
            raise UserError("optim.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        self.name, self.device_type = name, device.type
        self.amp_dtype = AMP_DTYPES[name]
        self.scaler = DynamicLossScaler() if name == "fp16" else None

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype activations and their gradients cross pipeline stages in."""
        return self.amp_dtype or torch.float32

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def unscale_(self, params) -> None:
        """Undo the loss scale on the gradients (before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(params)

    def update(self, skipped: bool) -> None:
        """After the step: the scaler learns whether it overflowed (the one decision every rank shares)."""
        if self.scaler is not None:
            self.scaler.update(skipped)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
