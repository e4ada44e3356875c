"""Opening a preprocessed data directory (what megabranch-preprocess wrote): a split as a LanguagePairDataset with
its tokenizers, every file checked against meta.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megabranch.data.indexed import IndexedDataset
from megabranch.data.multilingual import MultilingualDataset, check_temperature
from megabranch.data.pair_dataset import LanguagePairDataset
from megabranch.data.tokenizer import Tokenizer
from megabranch.errors import UserError

META = "meta.json"


def load_split(destdir: str | os.PathLike, split: str, sampling_temperature: float = 1.0):
    """Open a preprocessed split: returns (dataset, (src_tokenizer, tgt_tokenizer), meta).

    The dataset is a LanguagePairDataset, or for a --pairs directory a MultilingualDataset (every
    direction, each source led by its target-language tag) whose training epochs draw directions with
    `sampling_temperature` (1: every pair once an epoch). With a joint vocabulary both tokenizers are
    the same object. Refuses (UserError) when anything is missing or a sentencepiece model no longer
    matches the hash in meta.json.
    """
    check_temperature(sampling_temperature)
    dest = Path(destdir)
    meta_path = dest / META
    hint = f"run megabranch-preprocess --destdir {dest}"
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: not found; {hint} first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        directions = meta.get("directions") or [{"source_lang": meta["source_lang"], "target_lang": meta["target_lang"]}]
        names = [f"{d['source_lang']}-{d['target_lang']}" for d in directions]
        splits, spm_files, hashes = meta["splits"], meta["spm"], meta["spm_sha256"]
        langs = list(dict.fromkeys(lang for d in directions for lang in (d["source_lang"], d["target_lang"])))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{meta_path}: unreadable or incomplete ({e!s}); {hint} again") from None
    if split not in splits:
        have = ", ".join(splits) or "none"
        raise UserError(f"{meta_path}: no '{split}' split (have: {have}); {hint} with --{split}pref")
    toks, by_path = {}, {}
    for lang in langs:
        path = dest / spm_files[lang]
        if path not in by_path:  # joint: one Tokenizer object for both sides
            by_path[path] = Tokenizer(path)
        if by_path[path].sha256 != hashes[lang]:
            raise UserError(f"{path}: sha256 differs from meta.json (model replaced after binarizing); {hint} again")
        toks[lang] = by_path[path]
    parts = []
    for name, d in zip(names, directions):
        src, tgt = d["source_lang"], d["target_lang"]
        prefix = dest / f"{split}.{src}-{tgt}"
        sides = [IndexedDataset(f"{prefix}.{lang}") for lang in (src, tgt)]
        kept = (splits[split][name] if "directions" in meta else splits[split]).get("kept")
        for lang, ds in zip((src, tgt), sides):
            if kept is not None and len(ds) != kept:
                raise UserError(f"{prefix}.{lang}.idx: {len(ds)} items but meta.json says {kept}; {hint} again")
        tag = None
        if "tag" in d:
            tag = toks[src].piece_id(d["tag"])
            if tag is None:
                raise UserError(f"{dest / spm_files[src]}: the language tag {d['tag']} of direction {name} "
                                f"(meta.json) is not in the vocabulary; {hint} again")
        tok_s, tok_t = toks[src], toks[tgt]
        parts.append((name, LanguagePairDataset(sides[0], sides[1], pad=tok_s.pad, bos=tok_t.bos, eos=tok_t.eos,
                                                src_prefix=tag)))
    first = directions[0]
    tok_pair = (toks[first["source_lang"]], toks[first["target_lang"]])
    if "directions" not in meta:
        return parts[0][1], tok_pair, meta
    return MultilingualDataset(parts, sampling_temperature), tok_pair, meta
