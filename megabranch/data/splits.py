"""Opening a preprocessed data directory (what megabranch-preprocess wrote): a split as a dataset with its
tokenizers, every file checked against meta.json."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megabranch.data.indexed import IndexedDataset
from megabranch.data.meta import direction_name, read_meta
from megabranch.data.multilingual import MultilingualDataset, check_temperature
from megabranch.data.pair_dataset import LanguagePairDataset
from megabranch.data.tokenizer import Tokenizer
from megabranch.errors import UserError


@dataclass(frozen=True)
class Split:
    """One split of a data directory: the dataset (a LanguagePairDataset for one untagged direction, else a
    MultilingualDataset over every direction: both index, collate and size the same way), the source and target
    tokenizers of its first direction (the same object with a joint vocabulary) and the directory's meta.json
    (megabranch/data/meta.py's shape, whatever version wrote it)."""

    dataset: LanguagePairDataset | MultilingualDataset
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    meta: dict


def load_split(destdir: str | os.PathLike, split: str, sampling_temperature: float = 1.0) -> Split:
    """Open a preprocessed split.

    A directory with tagged directions (--pairs) gives a MultilingualDataset whose training epochs draw directions
    with `sampling_temperature` (1: every pair once an epoch). Refuses (UserError) when anything is missing, a
    sentencepiece model no longer matches the hash in meta.json, or a binarized file is not the one meta.json
    describes (its items or tokens differ) or holds a token id outside its side's vocabulary (files from another
    directory).
    """
    check_temperature(sampling_temperature)
    dest = Path(destdir)
    meta = read_meta(dest)
    hint = f"run megabranch-preprocess --destdir {dest}"
    directions, splits = meta["directions"], meta["splits"]
    if split not in splits:
        have = ", ".join(splits) or "none"
        raise UserError(f"{dest / 'meta.json'}: no '{split}' split (have: {have}); {hint} with --{split}pref")
    toks = _tokenizers(dest, meta, hint)
    parts = []
    for d in directions:
        name, src, tgt = direction_name(d), d["source_lang"], d["target_lang"]
        stats = splits[split].get(name)
        if stats is None:
            raise UserError(f"{dest / 'meta.json'}: the '{split}' split has no direction {name}; {hint} again")
        prefix = dest / f"{split}.{name}"
        sides = [_checked_side(f"{prefix}.{lang}", lang, stats, toks[lang], hint) for lang in (src, tgt)]
        tag = None
        if "tag" in d:
            tag = toks[src].piece_id(d["tag"])
            if tag is None:
                raise UserError(f"{toks[src].path}: the language tag {d['tag']} of direction {name} "
                                f"(meta.json) is not in the vocabulary; {hint} again")
        tok_s, tok_t = toks[src], toks[tgt]
        parts.append((name, LanguagePairDataset(sides[0], sides[1], pad=tok_s.pad, bos=tok_t.bos, eos=tok_t.eos,
                                                src_prefix=tag)))
    first = directions[0]
    src_tok, tgt_tok = toks[first["source_lang"]], toks[first["target_lang"]]
    if len(parts) == 1 and "tag" not in first:
        return Split(parts[0][1], src_tok, tgt_tok, meta)
    return Split(MultilingualDataset(parts, sampling_temperature), src_tok, tgt_tok, meta)


def _tokenizers(dest: Path, meta: dict, hint: str) -> dict[str, Tokenizer]:
    """lang -> its Tokenizer (joint: one object for every language), each model checked against meta.json."""
    toks, by_path = {}, {}
    for lang, file in meta["spm"].items():
        path = dest / file
        if path not in by_path:
            by_path[path] = Tokenizer(path)
        if by_path[path].sha256 != meta["spm_sha256"][lang]:
            raise UserError(f"{path}: sha256 differs from meta.json (model replaced after binarizing); {hint} again")
        toks[lang] = by_path[path]
    return toks


def _checked_side(prefix: str, lang: str, stats: dict, tok: Tokenizer, hint: str) -> IndexedDataset:
    """One side's binarized file, refused unless it holds the items and tokens meta.json recorded and its largest
    token id (recorded by megabranch-preprocess; read from the file for directories from before it was) is inside
    the vocabulary."""
    ds = IndexedDataset(prefix)
    kept, tokens = stats.get("kept"), stats.get("tokens", {}).get(lang)
    if kept is not None and len(ds) != kept:
        raise UserError(f"{prefix}.idx: {len(ds)} items but meta.json says {kept}; {hint} again")
    if tokens is not None and ds.num_tokens != tokens:
        raise UserError(f"{prefix}.bin: {ds.num_tokens} tokens but meta.json says {tokens} (the file is not the one "
                        f"preprocessed here); {hint} again")
    max_id = stats.get("max_id", {}).get(lang)
    if max_id is None:
        max_id = ds.max_id()
    if max_id >= tok.vocab_size:
        raise UserError(f"{prefix}.bin: token id {max_id} is outside the vocabulary of {tok.path.name} "
                        f"({tok.vocab_size} pieces): the binarized files come from another vocabulary; {hint} again")
    return ds
