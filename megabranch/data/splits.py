"""Opening a preprocessed data directory (what megabranch-preprocess wrote): a split as a LanguagePairDataset with
its tokenizers, every file checked against meta.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megabranch.data.indexed import IndexedDataset
from megabranch.data.pair_dataset import LanguagePairDataset
from megabranch.data.tokenizer import Tokenizer
from megabranch.errors import UserError

META = "meta.json"


def load_split(destdir: str | os.PathLike, split: str):
    """Open a preprocessed split: returns (LanguagePairDataset, (src_tokenizer, tgt_tokenizer), meta).

    With a joint vocabulary both tokenizers are the same object. Refuses (UserError) when
    anything is missing or a sentencepiece model no longer matches the hash in meta.json.
    """
    dest = Path(destdir)
    meta_path = dest / META
    hint = f"run megabranch-preprocess --destdir {dest}"
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: not found; {hint} first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        src, tgt = meta["source_lang"], meta["target_lang"]
        splits, spm_files, hashes = meta["splits"], meta["spm"], meta["spm_sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path}: unreadable or incomplete ({e!s}); {hint} again") from None
    if split not in splits:
        have = ", ".join(splits) or "none"
        raise UserError(f"{meta_path}: no '{split}' split (have: {have}); {hint} with --{split}pref")
    toks, by_path = {}, {}
    for lang in (src, tgt):
        path = dest / spm_files[lang]
        if path not in by_path:  # joint: one Tokenizer object for both sides
            by_path[path] = Tokenizer(path)
        if by_path[path].sha256 != hashes[lang]:
            raise UserError(f"{path}: sha256 differs from meta.json (model replaced after binarizing); {hint} again")
        toks[lang] = by_path[path]
    prefix = dest / f"{split}.{src}-{tgt}"
    sides = [IndexedDataset(f"{prefix}.{lang}") for lang in (src, tgt)]
    kept = splits[split].get("kept")
    for lang, ds in zip((src, tgt), sides):
        if kept is not None and len(ds) != kept:
            raise UserError(f"{prefix}.{lang}.idx: {len(ds)} items but meta.json says {kept}; {hint} again")
    tok_s, tok_t = toks[src], toks[tgt]
    dataset = LanguagePairDataset(sides[0], sides[1], pad=tok_s.pad, bos=tok_t.bos, eos=tok_t.eos)
    return dataset, (tok_s, tok_t), meta
