"""Where and how `megabranch-generate` decodes: the device (cuda where torch sees one) and the precision of the
weights (fp32, or bf16: half the memory, tensor-core speed on a GPU). Its batches are data.sentence_batches.

bf16 casts the parameters, not autocast: a 1000-layer model then needs half the device memory. The residual
coefficients (r, s) stay float32, so DeepNorm's alpha and BranchNorm's alpha_t are not rounded; the logits are
scored in float32 by the beam search.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from .errors import UserError
from .residual import ResidualCoefficients

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_device_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=("cpu", "cuda"), help="where to decode (default: cuda when available)")
    ap.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                    help="the weights' precision: fp32, or bf16 (half the memory)")
    ap.add_argument("--max-tokens", type=int, default=4096,
                    help="source tokens (padding included) per batch, at most --max-sentences sentences each; "
                         "0: batches of --max-sentences")


def resolve_device(name: str | None) -> torch.device:
    """--device -> a torch.device; None: cuda where torch sees a GPU, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if not torch.version.cuda else "no CUDA device is visible"
        raise UserError(f"--device cuda: {why} (torch {torch.__version__}); use --device cpu")
    return torch.device(name)


def prepare(model: nn.Module, device: torch.device, precision: str = "fp32") -> nn.Module:
    """The model on `device` with its weights in `precision`, in eval mode; residual coefficients in float32."""
    model = model.to(device=device, dtype=PRECISIONS[precision])
    for m in model.modules():
        if isinstance(m, ResidualCoefficients):
            m.shortcut_scale, m.branch_scale = m.shortcut_scale.float(), m.branch_scale.float()
            m.reset()  # recomputed from the step, not rounded through the cast
    return model.eval()
