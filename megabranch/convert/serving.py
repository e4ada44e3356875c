"""What every serving export shares: the folded model and what goes beside it (sentencepiece models, the
vocabulary as pieces, the position table, the target-language tags), and writing the export's directory
so that a failure leaves nothing behind.

An export directory also holds `megabranch.json`: the source checkpoint's step and scheme, what was folded,
each direction's source prefix (a multilingual model's target-language tag, put before the source pieces) and
the comparison the export ran.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch

from .. import checkpoint
from ..config import Config
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..generate import meta_vocab_hash
from ..model.embeddings import embed_scale, sinusoidal_table
from ..vocab import PAD
from .folding import Folded, fold

SIDECAR = "megabranch.json"
# megabranch's sub-layer names -> fairseq's transformer layers' (which MarianMT's layers share)
FAIRSEQ_LAYER_NAMES = {
    "self_attn.block.": "self_attn.",
    "self_attn.norm.": "self_attn_layer_norm.",
    "cross_attn.block.": "encoder_attn.",
    "cross_attn.norm.": "encoder_attn_layer_norm.",
    "ffn.block.fc1.": "fc1.",
    "ffn.block.fc2.": "fc2.",
    "ffn.norm.": "final_layer_norm.",
}


@dataclasses.dataclass
class Export:
    """A model ready to leave megabranch: the folded weights and everything a target needs to run them."""

    cfg: Config
    params: dict  # the source's weights (megabranch's names), for megabranch's side of the checks
    folded: Folded
    vocab: int
    tgt_vocab: int
    step: int
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    directions: dict  # direction name -> the source prefix piece ("<2es>") or None

    @property
    def mc(self):
        return self.cfg.model

    @property
    def scale(self) -> float:
        return embed_scale(self.mc)

    def positions(self, stack: str) -> torch.Tensor:
        """The (max_positions, d) rows the stack adds to its i-th token, i = 0, 1, ...: megabranch's table from
        model.position_offset on (learned or sinusoidal)."""
        mc = self.mc
        lo = mc.position_offset
        learned = self.params.get(f"{stack}.embed.learned_positions.weight")
        if mc.positions == "learned":
            return learned[lo : lo + mc.max_positions].float()
        return sinusoidal_table(lo + mc.max_positions, mc.d_model)[lo:]

    def pieces(self, side: str, pad: str = "<pad>") -> list[str]:
        """The vocabulary of `side` ("source" / "target") as pieces in id order, the pad id's piece as `pad`."""
        tok = self.src_tok if side == "source" else self.tgt_tok
        out = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
        out[PAD] = pad
        return out

    def spm_files(self) -> dict:
        """{"source": path, "target": path} of the sentencepiece models (the same file for a joint vocabulary)."""
        return {"source": str(self.src_tok.path), "target": str(self.tgt_tok.path)}

    def sidecar(self, target: str, compared: dict) -> dict:
        return {
            "format": f"megabranch export to {target}",
            "step": self.step,
            "residual": self.mc.residual,
            "folded_branch_scale": self.folded.scale,
            "layer_norm_eps": self.folded.eps,
            "source_prefix": self.directions,
            "compared": compared,
        }


def fairseq_layers(params: dict, prefix: str = "") -> dict:
    """The encoder / decoder layers' tensors of `params` under fairseq's names, each led by `prefix`
    (encoder.layers.0.ffn.block.fc1.weight -> <prefix>encoder.layers.0.fc1.weight)."""
    out = {}
    for name, t in params.items():
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[1] == "layers":
            for ours, theirs in FAIRSEQ_LAYER_NAMES.items():
                if parts[3].startswith(ours):
                    out[f"{prefix}{parts[0]}.layers.{parts[2]}.{theirs}{parts[3][len(ours) :]}"] = t
                    break
    return out


def prepare(cfg: Config, meta: dict, params: dict, data_dir: str | None) -> Export:
    """The export of a loaded checkpoint: folded at its step, with the sentencepiece models of `data_dir`
    (default: the directory it was trained on), which must be the vocabulary it was trained with."""
    data_dir = data_dir or cfg.data.data_dir
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise UserError(
            f"{meta_path} not found: an export takes the sentencepiece model(s) from the model's data "
            "directory; pass --data-dir DIR (the megabranch-preprocess output it was trained on)"
        )
    try:
        with open(meta_path) as fh:
            data = json.load(fh)
        directions = data.get("directions") or [
            {"source_lang": data["source_lang"], "target_lang": data["target_lang"]}
        ]
        spm = data["spm"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path}: unreadable or incomplete ({e!s})") from None
    if meta.get("vocab_sha256") and meta["vocab_sha256"] != meta_vocab_hash(data):
        raise UserError(
            f"the vocabulary of {data_dir} differs from the one the checkpoint was trained with; pass "
            "--data-dir with the directory it was trained on"
        )
    first = directions[0]
    src_tok = Tokenizer(os.path.join(data_dir, spm[first["source_lang"]]))
    tgt_tok = Tokenizer(os.path.join(data_dir, spm[first["target_lang"]]))
    vocab, tgt = meta["vocab_size"], meta.get("tgt_vocab_size") or meta["vocab_size"]
    if (src_tok.vocab_size, tgt_tok.vocab_size) != (vocab, tgt):
        raise UserError(
            f"the sentencepiece models of {data_dir} have {src_tok.vocab_size} / {tgt_tok.vocab_size} "
            f"pieces but the model {vocab} / {tgt}"
        )
    step = int(meta.get("step", 0))
    names = {f"{d['source_lang']}-{d['target_lang']}": d.get("tag") for d in directions}
    return Export(cfg, params, fold(params, cfg.model, step), vocab, tgt, step, src_tok, tgt_tok, names)


def write_directory(out: str, fill) -> None:
    """fill(tmp) writes the export into a new directory next to `out`, renamed to `out` once it returns:
    a failure (a refused field, a failed check) leaves nothing."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"{out}: directory {parent} does not exist")
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        if os.path.isdir(out):  # an empty directory given as the destination
            os.rmdir(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_sidecar(directory: str, info: dict) -> None:
    checkpoint.atomic_write_bytes((json.dumps(info, indent=1) + "\n").encode(), os.path.join(directory, SIDECAR))
