"""Conversions from and to the real torchscale and fairseq, each checked against that package's own model.

    load_torchscale(path, cfg)          a torchscale EncoderDecoder state dict (token ids: megabranch's)
    load_fairseq(path, cfg, dict, spm)  a fairseq 0.12 `transformer` checkpoint, its dictionary mapped onto the
                                        sentencepiece vocabulary
    export_torchscale_file(...)         megabranch weights under torchscale's names, as a .pt state dict

Each returns or takes `against(what, params)`: the converted weights' logits next to the source model's own
forward on a fixed batch (check.check_against_source). What the source's tensors and arguments say about its
embeddings (positions, their offset, the embedding scale) is written into the model config, and printed.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import checkpoint
from ..config import Config, ModelConfig
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..vocab import PAD
from . import peers
from .check import build_single, check_against_source
from .fairseq_import import model_config, remap_tables, vocabulary_map
from .torchscale_names import export_torchscale, import_torchscale, source_embeddings


def _sizes(params: dict) -> tuple[int, int]:
    vocab = params["encoder.embed.table.weight"].shape[0]
    return vocab, params.get("decoder.embed.table.weight", params["encoder.embed.table.weight"]).shape[0]


def _say(what: str, mc: ModelConfig) -> None:
    scale = "sqrt(d_model)" if mc.embed_scale is None else f"{mc.embed_scale:g}"
    print(
        f"{what}: model.positions={mc.positions} model.position_offset={mc.position_offset} "
        f"model.max_positions={mc.max_positions} model.embed_scale={scale} model.residual={mc.residual}"
    )


def _torchscale_scale(mc: ModelConfig, source_args: dict | None) -> float:
    """The source's embedding scale: its no_scale_embedding argument (torchscale's default True: 1), which a
    model.embed_scale set in the config must agree with; without the arguments, model.embed_scale if set."""
    if source_args is None:
        return 1.0 if mc.embed_scale is None else mc.embed_scale
    scale = 1.0 if source_args.get("no_scale_embedding", True) else mc.d_model**0.5
    if mc.embed_scale is not None and abs(mc.embed_scale - scale) > 1e-12 * scale:
        raise UserError(
            f"model.embed_scale={mc.embed_scale:g} but the torchscale arguments say no_scale_embedding="
            f"{source_args.get('no_scale_embedding', True)} (a scale of {scale:g})"
        )
    return scale


def load_torchscale(path: str, cfg: Config, source_args: dict | None = None):
    """-> (config, parameters, against). The source's positions come from its tensors (learned table: from 2;
    fairseq's sinusoidal marker: from pad + 1); its embedding scale from `source_args` (the EncoderDecoderConfig
    arguments it was built with; a state dict does not record them), else model.embed_scale, else torchscale's
    default (no_scale_embedding=True: 1). The check runs torchscale built with `source_args`."""
    raw = checkpoint.safe_load(path)
    state = raw.get("model", raw) if isinstance(raw.get("model", None), dict) else raw
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    found = source_embeddings(state, PAD)
    mc = dataclasses.replace(
        cfg.model,
        positions=found["positions"],
        position_offset=found["position_offset"],
        max_positions=found["max_positions"] or cfg.model.max_positions,
        embed_scale=_torchscale_scale(cfg.model, source_args),
    )
    cfg = dataclasses.replace(cfg, model=mc)
    _say(
        f"read torchscale state dict {path} ({len(state)} tensors"
        f"{'; no --source-args: torchscale' + chr(39) + 's defaults assumed' if source_args is None else ''})",
        mc,
    )
    params = import_torchscale(state, mc)
    vocab, tgt = _sizes(params)
    build_single(mc, vocab, tgt, params)  # the config fits the weights (a one-line error naming them if not)
    source = peers.torchscale_model(mc, vocab, tgt, state, PAD, source_args)

    def against(what: str, converted: dict) -> float:
        return check_against_source(
            what, mc, vocab, tgt, converted, 0, lambda s, p: peers.torchscale_logits(source, s, p, PAD)
        )

    return cfg, params, against


def load_fairseq(path: str, cfg: Config, dict_path: str, spm_path: str, tgt_dict_path: str | None = None):
    """-> (config, parameters, against): a fairseq `transformer` checkpoint on the sentencepiece vocabulary."""
    state, args = peers.fairseq_checkpoint(path)
    src_dict = peers.fairseq_dictionary(dict_path)
    tgt_dict = peers.fairseq_dictionary(tgt_dict_path) if tgt_dict_path else src_dict
    tokenizer = Tokenizer(spm_path)
    to_src = vocabulary_map(src_dict.symbols, src_dict.indices, tokenizer, dict_path)
    to_tgt = vocabulary_map(tgt_dict.symbols, tgt_dict.indices, tokenizer, tgt_dict_path or dict_path)
    if to_src != to_tgt:
        raise UserError(
            f"{tgt_dict_path}: a target dictionary ordered differently from the source one cannot share "
            "megabranch's one sentencepiece vocabulary here; pass the joint dictionary"
        )
    source = peers.fairseq_model(args, src_dict, tgt_dict, state)  # base_architecture fills the defaults
    learned = state.get("encoder.embed_positions.weight")
    mc = model_config(args, cfg.model, None if learned is None else learned.shape[0])
    cfg = dataclasses.replace(cfg, model=mc)
    _say(
        f"read fairseq checkpoint {path} (arch {getattr(args, 'arch', '?')}, {len(state)} tensors, dictionary "
        f"{len(src_dict)} symbols -> {tokenizer.vocab_size} sentencepiece ids)",
        mc,
    )
    params = remap_tables(import_torchscale(state, mc), to_src)
    vocab, tgt = _sizes(params)
    build_single(mc, vocab, tgt, params)

    def against(what: str, converted: dict) -> float:
        return check_against_source(
            what, mc, vocab, tgt, converted, 0, lambda s, p: peers.fairseq_logits(source, s, p), to_source=to_src
        )

    return cfg, params, against


def export_torchscale_file(params: dict, cfg: Config, out: str, step: int) -> None:
    """megabranch weights -> a torchscale EncoderDecoder state dict at `out`, read back and run in torchscale
    next to the megabranch model (token ids unchanged: megabranch's)."""
    mc = cfg.model
    peers.check_torchscale_scheme(mc)  # before anything is written
    if mc.positions == "sinusoidal" and mc.position_offset == 0:
        raise UserError(
            "model.position_offset=0 with sinusoidal positions: torchscale (fairseq's sinusoids) starts "
            "at pad + 1 >= 1; only models trained with model.position_offset >= 1 export"
        )
    checkpoint.atomic_write(out, lambda tmp: torch.save(export_torchscale(params, mc), tmp))
    state = checkpoint.safe_load(out)
    vocab, tgt = _sizes(params)
    pad = mc.position_offset - 1 if mc.positions == "sinusoidal" else PAD
    if pad != PAD:
        raise UserError(
            f"model.position_offset={mc.position_offset} with sinusoidal positions: fairseq's sinusoids "
            f"start at pad + 1 = {PAD + 1} for megabranch's pad id"
        )
    source = peers.torchscale_model(mc, vocab, tgt, state, PAD)
    check_against_source(
        "export -> torchscale", mc, vocab, tgt, params, step, lambda s, p: peers.torchscale_logits(source, s, p, PAD)
    )
