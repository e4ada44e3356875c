"""The single-process model from a checkpoint, or from a set of weights: what megabranch-generate decodes, the
analysis measures and every conversion's self-check runs. It lives here, not beside model.build_model_from,
because reading a checkpoint of any layout needs this package, and model/ imports nothing above it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import Config, ModelConfig
from ..errors import UserError
from ..model import Transformer, build_model_from
from .resharding import load_checkpoint


def model_from_weights(
    mc: ModelConfig,
    vocab_size: int,
    tgt_vocab_size: int | None,
    params: dict,
    step: int,
    where: str,
    fused_kernels: bool | None = None,
) -> Transformer:
    """The single-process model holding `params` (by single-process name) at the alpha of `step`, in eval mode.
    fused_kernels, when given, overrides the config's (False: the eager residual LayerNorm, which forward hooks
    can read and which matches another implementation exactly). Weights that do not fit the config are a
    UserError naming `where`."""
    if fused_kernels is not None:
        mc = dataclasses.replace(mc, fused_kernels=fused_kernels)
    try:
        return build_model_from(mc, vocab_size, tgt_vocab_size, params, step, where).eval()
    except RuntimeError as e:  # load_state_dict refuses a tensor of another shape (a name is checked by it)
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("size mismatch")), None)
        if first is None:
            raise
        raise UserError(f"{where} does not match its model config ({first})") from None


@dataclass
class LoadedModel:
    """A checkpoint's model with what its users check it against."""

    model: Transformer
    config: Config  # the run's config; model.fused_kernels as the model was built
    step: int
    step_dir: str  # the step directory it was read from
    vocab_sha256: str | None  # the vocabulary it was trained with (None: the checkpoint does not say)


def load_model(path: str, prefer: str = "latest", fused_kernels: bool | None = None) -> LoadedModel:
    """Any checkpoint load_checkpoint reads (a save directory: its `prefer` pointer; a step_<N> directory of any
    parallel layout; a latest/best pointer file) as the single-process model of model_from_weights."""
    state = load_checkpoint(path, prefer)
    cfg = Config.from_dict(state["config"], where=path)
    if fused_kernels is not None:
        cfg.model.fused_kernels = fused_kernels
    model = model_from_weights(
        cfg.model, state["vocab_size"], state["tgt_vocab_size"], state["model"], state["step"], state["step_dir"]
    )
    return LoadedModel(model, cfg, state["step"], state["step_dir"], state["vocab_sha256"])
