"""torchscale EncoderDecoder / fairseq `transformer` parameter names <-> megabranch's, and what the source's
tensors say about its embeddings.

Maps Post-LN / Pre-LN / DeepNorm / Sub-LN encoder-decoders: self_attn / encoder_attn / the FFN (torchscale's
`ffn.fc1`, fairseq's `fc1`) and their layer norms, Sub-LN's inner norms (`self_attn.inner_attn_ln`,
`ffn.ffn_layernorm`), the token tables, learned positions (`embed_positions.weight`), the output projection, the
final norms. fairseq's non-parameter buffers (`embed_positions._float_tensor`, the sinusoidal positions' marker,
and `version`) are ignored. What has no counterpart (layernorm_embedding, MoE, relative position biases, ...) is
refused by name.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import UserError

_TS_SUBLAYERS = {
    "self_attn.": "self_attn.block.",
    "self_attn_layer_norm.": "self_attn.norm.",
    "encoder_attn.": "cross_attn.block.",
    "encoder_attn_layer_norm.": "cross_attn.norm.",
    "ffn.": "ffn.block.",
    "final_layer_norm.": "ffn.norm.",
}
_FAIRSEQ_FFN = {"fc1.": "ffn.block.fc1.", "fc2.": "ffn.block.fc2."}  # fairseq's layers hold fc1/fc2 directly
_TS_TOP = {
    "encoder.embed_tokens.weight": "encoder.embed.table.weight",
    "decoder.embed_tokens.weight": "decoder.embed.table.weight",
    "encoder.embed_positions.weight": "encoder.embed.learned_positions.weight",
    "decoder.embed_positions.weight": "decoder.embed.learned_positions.weight",
    "decoder.output_projection.weight": "decoder.output.weight",
    "encoder.layer_norm.weight": "encoder.final_norm.weight",
    "encoder.layer_norm.bias": "encoder.final_norm.bias",
    "decoder.layer_norm.weight": "decoder.final_norm.weight",
    "decoder.layer_norm.bias": "decoder.final_norm.bias",
}
_TS_PARAMS = (
    "q_proj.weight",
    "q_proj.bias",
    "k_proj.weight",
    "k_proj.bias",
    "v_proj.weight",
    "v_proj.bias",
    "out_proj.weight",
    "out_proj.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
    "weight",
    "bias",
    "inner_attn_ln.weight",
    "inner_attn_ln.bias",
    "ffn_layernorm.weight",
    "ffn_layernorm.bias",
)
_TS_INNER_NORMS = {"inner_attn_ln.": "inner_norm.", "ffn_layernorm.": "hidden_norm."}  # Sub-LN's, inside the block
SINUSOIDAL_MARK = "embed_positions._float_tensor"  # fairseq 0.12's sinusoidal positions: a buffer, no weights


def ignored(name: str) -> bool:
    """fairseq's non-parameter buffers: the sinusoidal positions' _float_tensor and the modules' version."""
    return name.endswith(("._float_tensor", ".version", "embed_positions.weights"))


def torchscale_name(name: str) -> str | None:
    """A torchscale (or fairseq transformer) parameter name -> megabranch's, or None where nothing maps."""
    if name in _TS_TOP:
        return _TS_TOP[name]
    parts = name.split(".")
    if len(parts) < 5 or parts[0] not in ("encoder", "decoder") or parts[1] != "layers" or not parts[2].isdigit():
        return None
    rest = ".".join(parts[3:])
    for ts, ours in {**_TS_SUBLAYERS, **_FAIRSEQ_FFN}.items():
        if rest.startswith(ts) and (
            rest[len(ts) :] in _TS_PARAMS or ts in _FAIRSEQ_FFN and rest[len(ts) :] in ("weight", "bias")
        ):
            if ts == "encoder_attn." and parts[0] == "encoder":
                return None
            tail = rest[len(ts) :]
            if ts.endswith("layer_norm.") and tail not in ("weight", "bias"):
                return None
            if ts in _TS_SUBLAYERS and not ts.endswith("layer_norm.") and tail in ("weight", "bias"):
                return None
            for inner, mine in _TS_INNER_NORMS.items():
                if tail.startswith(inner):
                    if (inner == "inner_attn_ln.") != (ts == "self_attn.") and not (
                        inner == "ffn_layernorm." and ts == "ffn."
                    ):
                        return None
                    tail = mine + tail[len(inner) :]
            return f"{parts[0]}.layers.{parts[2]}.{ours}{tail}"
    return None


def source_embeddings(state: dict, pad: int) -> dict:
    """What the source's tensors say about its positions: {"positions", "position_offset", "max_positions"
    (learned: the table's rows less the offset; sinusoidal: None)}. torchscale's learned table is indexed from 2;
    fairseq's sinusoidal positions start at the token pad id + 1. A model without positions is refused."""
    if "encoder.embed_positions.weight" in state:
        rows = state["encoder.embed_positions.weight"].shape[0]
        return {"positions": "learned", "position_offset": 2, "max_positions": rows - 2}
    if "encoder." + SINUSOIDAL_MARK in state:
        return {"positions": "sinusoidal", "position_offset": pad + 1, "max_positions": None}
    raise UserError(
        "the source has no encoder.embed_positions (learned weight or fairseq's sinusoidal "
        "_float_tensor): megabranch always adds positions"
    )


def import_torchscale(state: dict, mc: ModelConfig) -> dict:
    """torchscale / fairseq state dict -> megabranch single-process parameters; refuses what does not map."""
    state = state.get("model", state) if isinstance(state.get("model", None), dict) else state
    out, unmapped = {}, []
    for name, t in state.items():
        if not torch.is_tensor(t) or ignored(name):
            continue
        ours = torchscale_name(name)
        if ours is None:
            unmapped.append(name)
        else:
            out[ours] = t.float()
    if unmapped:
        raise UserError(
            f"{len(unmapped)} source tensors have no megabranch counterpart (first: {unmapped[0]}); "
            "megabranch maps Post-LN / Pre-LN / DeepNorm encoder-decoders with sinusoidal or learned "
            "positions, no layernorm_embedding, sub-LN, MoE or relative positions"
        )
    if mc.share_all_embeddings:
        dec = out.pop("decoder.embed.table.weight", None)
        if dec is not None and not torch.equal(dec, out["encoder.embed.table.weight"]):
            raise UserError(
                "model.share_all_embeddings=true but the source's encoder and decoder tables differ; "
                "pass --set model.share_all_embeddings=false"
            )
    if mc.share_decoder_input_output_embed:
        outp = out.pop("decoder.output.weight", None)
        table = out.get("decoder.embed.table.weight", out.get("encoder.embed.table.weight"))
        if outp is not None and not torch.equal(outp, table):
            raise UserError(
                "model.share_decoder_input_output_embed=true but the source's output projection differs "
                "from its decoder table; pass --set model.share_decoder_input_output_embed=false"
            )
    return out


def export_torchscale(params: dict, mc: ModelConfig) -> dict:
    """megabranch parameters -> torchscale EncoderDecoder names (sinusoidal positions: fairseq's marker buffer)."""
    back = {}
    inv_top = {v: k for k, v in _TS_TOP.items()}
    inv_sub = {v: k for k, v in _TS_SUBLAYERS.items()}
    for name, t in params.items():
        if name in inv_top:
            back[inv_top[name]] = t
            continue
        parts = name.split(".")
        rest = ".".join(parts[3:])
        for ours, ts in inv_sub.items():
            if rest.startswith(ours):
                tail = rest[len(ours) :]
                for inner, mine in _TS_INNER_NORMS.items():
                    if tail.startswith(mine):
                        tail = inner + tail[len(mine) :]
                back[f"{parts[0]}.layers.{parts[2]}.{ts}{tail}"] = t
                break
    if mc.share_all_embeddings:
        back["decoder.embed_tokens.weight"] = back["encoder.embed_tokens.weight"]
    if mc.share_decoder_input_output_embed:
        back["decoder.output_projection.weight"] = back["decoder.embed_tokens.weight"]
    if mc.positions == "sinusoidal":
        for stack in ("encoder", "decoder"):
            back[f"{stack}.{SINUSOIDAL_MARK}"] = torch.zeros(1)
    return back
