"""How `megabranch-generate` decodes: its device arguments (checked by device.resolve_device), the precision of the
weights (fp32, or bf16: half the memory, tensor-core speed on a GPU), and batches cut by a token budget.

bf16 casts the parameters, not autocast: a 1000-layer model then needs half the device memory. The residual
coefficients (r, s) stay float32, so DeepNorm's alpha and BranchNorm's alpha_t are not rounded; the logits are
scored in float32 by the beam search.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from .data import make_batches
from .residual import ResidualCoefficients

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_device_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", help="where to decode: cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                    help="the weights' precision: fp32, or bf16 (half the memory)")
    ap.add_argument("--max-tokens", type=int, default=4096,
                    help="source tokens (padding included) per batch, at most --max-sentences sentences each; "
                         "0: batches of --max-sentences")


def prepare(model: nn.Module, device: torch.device, precision: str = "fp32") -> nn.Module:
    """The model on `device` with its weights in `precision`, in eval mode; residual coefficients in float32."""
    model = model.to(device=device, dtype=PRECISIONS[precision])
    for m in model.modules():
        if isinstance(m, ResidualCoefficients):
            m.r, m.s = m.r.float(), m.s.float()
            m.reset()  # recomputed from the step, not rounded through the cast
    return model.eval()


def sentence_batches(src_sizes, n: int, max_tokens: int, max_sentences: int) -> list[list[int]]:
    """The first n sentences, sorted by source length, cut into batches of at most max_tokens padded source
    tokens (0: no token budget) and max_sentences sentences; every sentence once."""
    if n == 0:
        return []
    sizes = np.asarray(src_sizes[:n], dtype=np.int64)
    budget = max_tokens if max_tokens > 0 else int(sizes.max()) * max(1, max_sentences)
    sizes = np.minimum(sizes, budget)  # a sentence longer than the budget is decoded alone, not refused
    batches = make_batches(sizes, sizes, budget, max_sentences or None, shuffle=False)
    return [b.tolist() for b in batches]
