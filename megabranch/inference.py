"""How `megabranch-generate` decodes: its device arguments (checked by device.resolve_device) and the precision of
the weights (fp32, or bf16: half the memory, tensor-core speed on a GPU). Its batches are data.sentence_batches.

bf16 casts the parameters, not autocast: a 1000-layer model then needs half the device memory. The residual
coefficients (r, s) stay float32, so DeepNorm's alpha and BranchNorm's alpha_t are not rounded; the logits are
scored in float32 by the beam search.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from .residual import ResidualCoefficients

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_device_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", help="where to decode: cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="fp32",
        help="the weights' precision: fp32, or bf16 (half the memory)",
    )
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=4096,
        help="source tokens (padding included) per batch, at most --max-sentences sentences each; "
        "0: batches of --max-sentences",
    )


def prepare(model: nn.Module, device: torch.device, precision: str = "fp32") -> nn.Module:
    """The model on `device` with its weights in `precision`, in eval mode; residual coefficients in float32."""
    model = model.to(device=device, dtype=PRECISIONS[precision])
    for m in model.modules():
        if isinstance(m, ResidualCoefficients):
            m.shortcut_scale, m.branch_scale = m.shortcut_scale.float(), m.branch_scale.float()
            m.reset()  # recomputed from the step, not rounded through the cast
    return model.eval()
