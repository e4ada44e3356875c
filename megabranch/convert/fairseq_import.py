"""A fairseq 0.12 `transformer` checkpoint -> megabranch's model config and parameters, on a sentencepiece vocabulary.

fairseq numbers its dictionary <s> 0, <pad> 1, </s> 2, <unk> 3, then dict.txt's symbols in their order;
megabranch's sentencepiece ids are pad 0, unk 1, bos 2, eos 3, then the pieces (megabranch.vocab). The token
tables (and an untied output projection) are re-ordered row by row onto the sentencepiece ids; a piece the
dictionary lacks, or a dictionary symbol that is not a piece (fairseq's `madeupword` fillers aside), is refused
in one line naming it. The architecture arguments become ModelConfig fields; an argument megabranch cannot
represent is refused naming it.
"""

from __future__ import annotations

import argparse

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..vocab import BOS, EOS, PAD, UNK

_SPECIALS = {PAD: "<pad>", UNK: "<unk>", BOS: "<s>", EOS: "</s>"}
_TABLES = ("encoder.embed.table.weight", "decoder.embed.table.weight", "decoder.output.weight")


def vocabulary_map(symbols: list[str], indices: dict, tokenizer, where: str) -> list[int]:
    """megabranch id -> fairseq index, for every id of `tokenizer` (sentencepiece, megabranch's special ids)."""
    out = []
    for i in range(tokenizer.vocab_size):
        piece = _SPECIALS.get(i) or tokenizer.id_to_piece(i)
        if piece not in indices:
            raise UserError(
                f"{where} has no entry for the sentencepiece piece {piece!r} (id {i}); the dictionary "
                "and the sentencepiece vocabulary cannot be matched"
            )
        out.append(indices[piece])
    used = set(out)
    extra = [s for j, s in enumerate(symbols) if j not in used and not s.startswith("madeupword")]
    if extra:
        raise UserError(
            f"{where} has {len(extra)} symbols that are not sentencepiece pieces (first: {extra[0]!r}); "
            "the dictionary and the sentencepiece vocabulary cannot be matched"
        )
    return out


def remap_tables(params: dict, to_fairseq: list[int]) -> dict:
    """The token tables (and an untied output projection) with their rows in megabranch's id order."""
    index = torch.tensor(to_fairseq)
    return {k: v.index_select(0, index) if k in _TABLES else v for k, v in params.items()}


def _arg(args: argparse.Namespace, name: str, default=None):
    return getattr(args, name, default)


def model_config(args: argparse.Namespace, base: ModelConfig, learned_rows: int | None) -> ModelConfig:
    """A fairseq transformer's arguments (after base_architecture filled them) -> ModelConfig."""
    if _arg(args, "arch", "transformer") != "transformer" and not str(_arg(args, "arch", "")).startswith("transformer"):
        raise UserError(f"fairseq arch {_arg(args, 'arch')!r}: megabranch imports the `transformer` family only")
    refuse = {
        "layernorm_embedding": False,
        "no_token_positional_embeddings": False,
        "cross_self_attention": False,
        "adaptive_softmax_cutoff": None,
        "encoder_layers_to_keep": None,
        "decoder_layers_to_keep": None,
        "no_decoder_final_norm": False,
        "tie_adaptive_weights": False,
        "quant_noise_pq": 0,
    }
    for name, fine in refuse.items():
        value = _arg(args, name, fine)
        if value not in (fine, None, 0, False, ""):
            raise UserError(f"fairseq argument {name}={value!r} has no megabranch counterpart")
    if _arg(args, "encoder_embed_dim") != _arg(args, "decoder_embed_dim"):
        raise UserError(
            f"fairseq encoder_embed_dim={_arg(args, 'encoder_embed_dim')} != decoder_embed_dim="
            f"{_arg(args, 'decoder_embed_dim')}: megabranch has one model.d_model"
        )
    for a, b in (
        ("encoder_ffn_embed_dim", "decoder_ffn_embed_dim"),
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_normalize_before", "decoder_normalize_before"),
    ):
        if _arg(args, a) != _arg(args, b):
            raise UserError(f"fairseq {a}={_arg(args, a)} != {b}={_arg(args, b)}: megabranch uses one value")
    act = _arg(args, "activation_fn", "relu")
    if act not in ("relu", "gelu"):
        raise UserError(f"fairseq activation_fn={act!r}: megabranch has relu and gelu")
    d = int(args.encoder_embed_dim)
    learned = bool(_arg(args, "encoder_learned_pos", False))
    if learned != bool(_arg(args, "decoder_learned_pos", False)):
        raise UserError("fairseq encoder_learned_pos != decoder_learned_pos: megabranch uses one model.positions")
    fields = dict(vars(base))
    fields.update(
        residual="pre_ln" if _arg(args, "encoder_normalize_before", False) else "post_ln",
        encoder_layers=int(args.encoder_layers),
        decoder_layers=int(args.decoder_layers),
        d_model=d,
        n_heads=int(args.encoder_attention_heads),
        ffn_dim=int(args.encoder_ffn_embed_dim),
        activation=act,
        dropout=float(_arg(args, "dropout", 0.1)),
        attention_dropout=float(_arg(args, "attention_dropout", 0.0)),
        activation_dropout=float(_arg(args, "activation_dropout", 0.0)),
        share_all_embeddings=bool(_arg(args, "share_all_embeddings", False)),
        share_decoder_input_output_embed=bool(_arg(args, "share_decoder_input_output_embed", False)),
        embed_scale=1.0 if _arg(args, "no_scale_embedding", False) else d**0.5,
        positions="learned" if learned else "sinusoidal",
        position_offset=2,  # fairseq's <pad> is 1: from 2
        max_positions=(learned_rows - 2)
        if learned
        else max(int(_arg(args, "max_source_positions", 1024)), int(_arg(args, "max_target_positions", 1024))),
        deepnorm_init=None,
    )
    return ModelConfig(**fields)
