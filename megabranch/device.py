"""The device a command runs on: `--device` checked once, in one place, for megabranch-train and
megabranch-generate alike (cpu, cuda, cuda:N; default cuda where torch sees a GPU)."""

from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(name: str | None) -> torch.device:
    """--device -> a torch.device, or a one-line UserError saying why it cannot be used here; None: cuda where
    torch sees a GPU, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"--device {name}: megabranch runs on cpu or cuda (cuda:N), not {dev.type}")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if not torch.version.cuda else "no CUDA device is visible"
        raise UserError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise UserError(
            f"--device {name}: {count} CUDA device{'s are' if count > 1 else ' is'} visible "
            f"(cuda:0 .. cuda:{count - 1})"
        )
    return dev
