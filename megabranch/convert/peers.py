"""The real source packages, for the conversions' checks: torchscale 0.3.0's EncoderDecoder and fairseq 0.12's
`transformer`, built from a converted model's config, loaded with the source weights and run.

Both are optional (test extras, requirements-dev.txt; installed with --no-deps next to the project's torch).
torchscale imports timm only for `drop_path`, and timm's package __init__ imports torchvision, which does not
load beside a CPU torch: when that import fails, timm's own drop.py is loaded from its file and put where
torchscale looks for it (nothing else of timm is needed). A missing package is a one-line UserError.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types

import torch

from ..checkpoint import safe_load
from ..config import ModelConfig
from ..errors import UserError
from ..model.embeddings import embed_scale

TORCHSCALE_RESIDUALS = {
    "deepnorm": dict(deepnorm=True, subln=False),
    "post_ln": dict(deepnorm=False, subln=False),
    "pre_ln": dict(deepnorm=False, subln=False, normalize_before=True),
    "subln": dict(deepnorm=False, subln=True, normalize_before=True),
}


def check_torchscale_scheme(mc: ModelConfig) -> None:
    """One line naming the scheme when torchscale's EncoderDecoder cannot hold it."""
    if mc.residual not in TORCHSCALE_RESIDUALS:
        raise UserError(
            f"model.residual={mc.residual}: torchscale has no counterpart (valid: {', '.join(TORCHSCALE_RESIDUALS)})"
        )


def _timm_drop_path() -> None:
    """Make `from timm.models.layers import drop_path` work from timm's drop.py alone."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        raise UserError("torchscale needs timm's drop_path: pip install --no-deps timm==0.6.13")
    root = os.path.dirname(spec.origin)
    path = next(
        (
            p
            for p in (os.path.join(root, "models", "layers", "drop.py"), os.path.join(root, "layers", "drop.py"))
            if os.path.isfile(p)
        ),
        None,
    )
    if path is None:
        raise UserError(f"timm at {root} has no layers/drop.py (torchscale needs its drop_path)")
    drop_spec = importlib.util.spec_from_file_location("timm.models.layers.drop", path)
    drop = importlib.util.module_from_spec(drop_spec)
    drop_spec.loader.exec_module(drop)
    for name in ("timm", "timm.models", "timm.models.layers"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["timm.models.layers"].drop_path = drop.drop_path


def torchscale():
    """-> (EncoderDecoder, EncoderDecoderConfig, TextEmbedding, PositionalEmbedding) of the installed torchscale."""
    try:
        import torchscale.component.droppath  # noqa: F401
    except ImportError as e:
        if "torchscale" in str(e) and "timm" not in str(e):
            raise UserError(
                "the torchscale check needs torchscale 0.3.0: pip install --no-deps torchscale==0.3.0 "
                "fairscale==0.4.0 timm==0.6.13"
            ) from None
        _timm_drop_path()
    from torchscale.architecture.config import EncoderDecoderConfig
    from torchscale.architecture.encoder_decoder import EncoderDecoder
    from torchscale.component.embedding import PositionalEmbedding, TextEmbedding

    return EncoderDecoder, EncoderDecoderConfig, TextEmbedding, PositionalEmbedding


def fairseq_sinusoidal(dim: int, pad: int, rows: int):
    try:
        from fairseq.modules import SinusoidalPositionalEmbedding
    except ImportError:
        raise UserError(
            "fairseq-style sinusoidal positions need fairseq to check against: pip install "
            "--no-deps fairseq-fixed==0.12.3.1 (see requirements-dev.txt)"
        ) from None
    return SinusoidalPositionalEmbedding(dim, pad, init_size=rows)


def torchscale_model(
    mc: ModelConfig, vocab: int, tgt_vocab: int, state: dict, pad: int, source_args: dict | None = None
) -> torch.nn.Module:
    """torchscale's EncoderDecoder of the same shape as `mc` (`source_args`, the EncoderDecoderConfig arguments
    the source was built with, override what `mc` says), holding the torchscale-named `state`, in eval mode."""
    EncoderDecoder, EncoderDecoderConfig, TextEmbedding, PositionalEmbedding = torchscale()
    check_torchscale_scheme(mc)
    scale = embed_scale(mc)
    if scale not in (1.0, mc.d_model**0.5):
        raise UserError(f"model.embed_scale={mc.embed_scale}: torchscale scales embeddings by 1 or sqrt(d_model) only")
    flags = dict(TORCHSCALE_RESIDUALS[mc.residual])
    before = flags.pop("normalize_before", False)
    kw = dict(
        encoder_embed_dim=mc.d_model,
        decoder_embed_dim=mc.d_model,
        encoder_attention_heads=mc.n_heads,
        decoder_attention_heads=mc.n_heads,
        encoder_ffn_embed_dim=mc.ffn_dim,
        decoder_ffn_embed_dim=mc.ffn_dim,
        encoder_layers=mc.encoder_layers,
        decoder_layers=mc.decoder_layers,
        activation_fn=mc.activation,
        no_scale_embedding=scale == 1.0,
        share_all_embeddings=mc.share_all_embeddings,
        share_decoder_input_output_embed=mc.share_decoder_input_output_embed,
        vocab_size=vocab,
        layernorm_eps=mc.ln_eps,
        encoder_normalize_before=before,
        decoder_normalize_before=before,
        **flags,
    )
    kw.update(source_args or {})
    kw.update(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, drop_path_rate=0.0)  # eval: off
    args = EncoderDecoderConfig(**kw)
    rows = mc.position_offset + mc.max_positions

    def positions():
        if mc.positions == "learned":  # torchscale's own: rows indexed from 2
            return PositionalEmbedding(rows, mc.d_model)
        # fairseq's (torchscale's fairseq models use it): the first token at padding_idx + 1
        return fairseq_sinusoidal(mc.d_model, mc.position_offset - 1, rows)

    src_table = TextEmbedding(vocab, mc.d_model, pad)
    tgt_table = src_table if mc.share_all_embeddings else TextEmbedding(tgt_vocab, mc.d_model, pad)
    model = EncoderDecoder(args, src_table, positions(), tgt_table, positions())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_float_tensor")]
    unexpected = [k for k in unexpected if not k.endswith("_float_tensor")]
    if missing or unexpected:
        raise UserError(
            f"the torchscale weights do not fit a torchscale EncoderDecoder of this config (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()


@torch.no_grad()
def torchscale_logits(model, src: torch.Tensor, prev: torch.Tensor, pad: int) -> torch.Tensor:
    """The real forward, with the source padding mask (torchscale's EncoderDecoder.forward passes none)."""
    enc = model.encoder(src, encoder_padding_mask=src.eq(pad))
    logits, _ = model.decoder(prev, encoder_out=enc)
    return logits.float()


# --- fairseq ---------------------------------------------------------------------------------------------------


def _fairseq():
    try:
        import fairseq  # noqa: F401
        from fairseq.data import Dictionary
        from fairseq.models.transformer import TransformerModel
    except ImportError:
        raise UserError(
            "--from fairseq needs fairseq 0.12: pip install --no-deps fairseq-fixed==0.12.3.1 "
            "(see requirements-dev.txt)"
        ) from None
    return Dictionary, TransformerModel


def fairseq_dictionary(path: str):
    Dictionary, _ = _fairseq()
    if not os.path.isfile(path):
        raise UserError(f"fairseq dictionary not found: {path}")
    return Dictionary.load(path)


def fairseq_checkpoint(path: str) -> tuple[dict, argparse.Namespace]:
    """A fairseq checkpoint -> (its model state dict, its model args). Loaded by checkpoint.safe_load, allowing
    only the plain classes fairseq's checkpoints hold besides tensors (argparse.Namespace, fairseq's meters)."""
    _fairseq()
    from fairseq.logging import meters

    allowed = [argparse.Namespace] + [
        getattr(meters, n)
        for n in dir(meters)
        if isinstance(getattr(meters, n), type) and n.endswith(("Meter", "MetersDict"))
    ]
    if not os.path.isfile(path):
        raise UserError(f"fairseq checkpoint not found: {path}")
    state = safe_load(path, allowed=tuple(allowed))
    cfg = state.get("cfg") or {}
    args = cfg.get("model") if isinstance(cfg, dict) else None
    args = args if args is not None else state.get("args")
    if isinstance(args, dict):
        args = argparse.Namespace(**args)
    if not isinstance(args, argparse.Namespace) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path} is not a fairseq checkpoint (no cfg.model / args and model)")
    return state["model"], args


def fairseq_model(args: argparse.Namespace, src_dict, tgt_dict, state: dict):
    """fairseq's TransformerModel built from the checkpoint's args, holding its weights, in eval mode."""
    _, TransformerModel = _fairseq()
    task = types.SimpleNamespace(source_dictionary=src_dict, target_dictionary=tgt_dict)
    model = TransformerModel.build_model(args, task)  # fills in the architecture's defaults on `args`
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise UserError(
            f"the fairseq checkpoint does not fit its own arguments and dictionary: {(lines[1:] or lines)[0][:200]}"
        ) from None
    return model.eval()


@torch.no_grad()
def fairseq_logits(model, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    src_lengths = src.ne(model.encoder.padding_idx).sum(1)
    logits, _ = model(src, src_lengths, prev)
    return logits.float()
