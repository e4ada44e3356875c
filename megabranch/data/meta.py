"""meta.json, the description of a preprocessed data directory: written last by megabranch-preprocess (so its
presence means the directory is complete), read by everything that opens the directory.

One shape (format_version 2), whatever the number of directions:

    directions    [{"source_lang", "target_lang"[, "tag"]}]: the translation directions, in order; a "tag"
                  (e.g. "<2de>", --pairs) is put before each source when the data is read
    joint         one sentencepiece model for every language (or one per language: one direction only)
    vocab_size, spm, spm_sha256, dict     per language: its vocabulary size, model file, the model's sha256,
                  its fairseq-style dict file (dict None without a train split)
    model_type, max_len                   how sentencepiece was trained (None: a given model), the length cap
    splits        {split: {"SRC-TGT": stats}}: per direction, the input files, lines read, pairs kept, skips,
                  and per language the tokens, unknown pieces and the largest token id written ("max_id")

Directories written before it (format_version 1) still load: `read_meta` gives them this shape. A one-direction
directory then had source_lang / target_lang at the top and its splits' stats unnested; a --pairs directory had
this shape; neither recorded max_id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megabranch.errors import UserError

META = "meta.json"
FORMAT_VERSION = 2


def direction_name(direction: dict) -> str:
    """"en-de" for {"source_lang": "en", "target_lang": "de"}."""
    return f"{direction['source_lang']}-{direction['target_lang']}"


def write_meta(dest: Path, meta: dict) -> None:
    """Publish meta.json atomically (a crash leaves the old one or none, never half of one)."""
    tmp = dest / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, dest / META)


def read_meta(dest: str | os.PathLike) -> dict:
    """meta.json of `dest` in the current shape; UserError when it is missing or not one megabranch wrote."""
    path = Path(dest) / META
    hint = f"run megabranch-preprocess --destdir {dest}"
    if not path.is_file():
        raise UserError(f"{path}: not found; {hint} first")
    try:
        meta = upgrade(json.loads(path.read_text(encoding="utf-8")))
        for d in meta["directions"]:
            direction_name(d)
        for key in ("splits", "spm", "spm_sha256", "vocab_size"):
            if not isinstance(meta[key], dict):
                raise TypeError(f"{key} is not a mapping")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: unreadable or incomplete ({e!s}); {hint} again") from None
    return meta


def upgrade(meta: dict) -> dict:
    """A format_version 1 meta.json in the current shape (a current one unchanged)."""
    if "directions" in meta:  # --pairs directories already had it
        return {**meta, "format_version": FORMAT_VERSION}
    direction = {"source_lang": meta["source_lang"], "target_lang": meta["target_lang"]}
    name = direction_name(direction)
    rest = {k: v for k, v in meta.items() if k not in ("source_lang", "target_lang", "format_version", "splits")}
    return {"format_version": FORMAT_VERSION, "directions": [direction], **rest,
            "splits": {split: {name: stats} for split, stats in meta["splits"].items()}}
