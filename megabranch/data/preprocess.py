"""megabranch-preprocess: train/apply SentencePiece and binarize parallel text into a destdir.

Input: PREFIX.LANG (or PREFIX.LANG.gz) per split and language, one sentence per line, the two
languages line-aligned. Output (in --destdir): spm.model (or spm.SRC.model + spm.TGT.model),
dict.txt (or dict.LANG.txt), {split}.{src}-{tgt}.{lang}.bin/.idx and meta.json (written last,
so its presence means the directory is complete).

With --pairs en-de,de-en,en-fr (instead of -s/-t) several directions go into one directory: one
joint sentencepiece model over every training file, with the target-language tags <2de>, <2en>,
<2fr> as user-defined pieces; each direction's splits are binarized as above, and meta.json lists
the directions and their tags. The tag is put before the source when the data is read
(megabranch.data.multilingual), not stored in the binarized files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from itertools import islice
from pathlib import Path

import numpy as np

from megabranch.data.indexed import IndexedDatasetBuilder, best_dtype
from megabranch.data.multilingual import tag_of
from megabranch.data.splits import META
from megabranch.data.tokenizer import UNK, Tokenizer, iter_lines, train_sentencepiece
from megabranch.errors import UserError, cli_main

SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1
_CHUNK = 10_000  # lines encoded per sentencepiece batch call
SKIP_REASONS = ("bad_utf8", "empty", "too_long")


def _log(msg: str) -> None:
    print(f"megabranch-preprocess: {msg}", file=sys.stderr, flush=True)


def input_path(prefix: str, lang: str) -> Path:
    """PREFIX.LANG, else PREFIX.LANG.gz; UserError naming both when neither exists."""
    plain = Path(f"{prefix}.{lang}")
    if plain.is_file():
        return plain
    gz = Path(f"{prefix}.{lang}.gz")
    if gz.is_file():
        return gz
    raise UserError(f"{plain}: input file not found (nor {gz.name})")


def _count_lines(path: Path) -> int:
    return sum(1 for _ in iter_lines(path))


def _aligned_paths(prefix: str, src: str, tgt: str) -> tuple[Path, Path]:
    """PREFIX.SRC and PREFIX.TGT, refused unless both exist and have as many lines."""
    paths = (input_path(prefix, src), input_path(prefix, tgt))
    n = [_count_lines(p) for p in paths]
    if n[0] != n[1]:
        raise UserError(f"{paths[0]} has {n[0]} lines but {paths[1]} has {n[1]}; parallel files must be line-aligned")
    return paths


def _write_meta(dest: Path, meta: dict) -> None:
    tmp = dest / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, dest / META)
    _log(f"wrote {dest}")


def _check_output_args(args) -> Path:
    if args.max_len < 1:
        raise UserError(f"--max-len {args.max_len}: must be >= 1")
    dest = Path(args.destdir)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--destdir {dest}: exists and is not a directory")
    return dest


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="megabranch-preprocess", description=__doc__.splitlines()[0])
    p.add_argument("--source-lang", "-s")
    p.add_argument("--target-lang", "-t")
    p.add_argument("--pairs", metavar="SRC-TGT,...",
                   help="several directions into one directory with target-language tags, e.g. en-de,de-en "
                        "(instead of -s/-t); a --{split}pref is then one prefix for every pair or one per pair")
    for split in SPLITS:
        p.add_argument(f"--{split}pref", metavar="PREFIX", help=f"{split} files: PREFIX.LANG[.gz]")
    p.add_argument("--destdir", default="data-bin")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--joint", action=argparse.BooleanOptionalAction, default=None,
                   help="one sentencepiece model for both languages (default) or one per language")
    p.add_argument("--spm-model", help="apply this existing model to both sides instead of training")
    p.add_argument("--src-spm-model", help="existing model for the source side (with --tgt-spm-model)")
    p.add_argument("--tgt-spm-model", help="existing model for the target side (with --src-spm-model)")
    p.add_argument("--max-len", type=int, default=256, help="skip pairs with a side longer than this (tokens)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1, help="seed for sentencepiece's training-line sample")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="max lines sentencepiece trains on (seeded sample)")
    p.add_argument("--workers", type=int, default=1, help="ignored (accepted for fairseq compatibility)")
    return p.parse_args(argv)


def _resolve_models(args, langs: tuple[str, str]) -> tuple[bool, dict[str, Path] | None]:
    """Decide joint/per-language and which existing models to copy in (None = train)."""
    per_lang = args.src_spm_model or args.tgt_spm_model
    if args.spm_model and per_lang:
        raise UserError("--spm-model: give either --spm-model or --src-spm-model/--tgt-spm-model, not both")
    if per_lang and not (args.src_spm_model and args.tgt_spm_model):
        raise UserError("--src-spm-model/--tgt-spm-model: give both (or --spm-model for one shared model)")
    if args.spm_model and args.joint is False:
        raise UserError("--spm-model applies one model to both sides; use --src-spm-model/--tgt-spm-model with --no-joint")
    if per_lang and args.joint:
        raise UserError("--joint contradicts --src-spm-model/--tgt-spm-model; use --spm-model for a joint model")
    joint = not per_lang and args.joint is not False
    given = {}
    if args.spm_model:
        given = {lang: Path(args.spm_model) for lang in langs}
    elif per_lang:
        given = dict(zip(langs, (Path(args.src_spm_model), Path(args.tgt_spm_model))))
    for p in given.values():
        if not p.is_file():
            raise UserError(f"{p}: sentencepiece model not found")
    return joint, given or None


def _spm_name(joint: bool, lang: str) -> str:
    return "spm.model" if joint else f"spm.{lang}.model"


def _binarize(split, src_path, tgt_path, toks, langs, max_len, out_prefix, counts):
    """Encode and write one split; returns its stats dict. `counts` (lang -> array) is updated."""
    src_tok, tgt_tok = toks
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    tokens, unks = [0, 0], [0, 0]
    builders = [IndexedDatasetBuilder(f"{out_prefix}.{lang}", best_dtype(tok.vocab_size))
                for lang, tok in zip(langs, toks)]
    total = 0
    try:
        pairs = zip(iter_lines(src_path), iter_lines(tgt_path))
        while chunk := list(islice(pairs, _CHUNK)):
            total += len(chunk)
            texts = []
            for raw_s, raw_t in chunk:
                try:
                    s, t = raw_s.decode("utf-8"), raw_t.decode("utf-8")
                except UnicodeDecodeError:
                    skipped["bad_utf8"] += 1
                    continue
                if not s.strip() or not t.strip():
                    skipped["empty"] += 1
                    continue
                texts.append((s, t))
            enc_s = src_tok.encode_batch([s for s, _ in texts])
            enc_t = tgt_tok.encode_batch([t for _, t in texts])
            kept_ids: tuple[list, list] = ([], [])
            for ids_s, ids_t in zip(enc_s, enc_t):
                if len(ids_s) > max_len or len(ids_t) > max_len:
                    skipped["too_long"] += 1
                    continue
                for side, ids in enumerate((ids_s, ids_t)):
                    builders[side].add_item(np.asarray(ids, dtype=np.int64))
                    kept_ids[side].extend(ids)
            for side, ids in enumerate(kept_ids):  # one bincount per chunk, not per line
                arr = np.asarray(ids, dtype=np.int64)
                tokens[side] += arr.size
                unks[side] += int(np.count_nonzero(arr == UNK))
                if counts is not None and arr.size:
                    c = counts[langs[side]]
                    c += np.bincount(arr, minlength=len(c))
    except BaseException:
        for b in builders:
            b.discard()
        raise
    for b in builders:
        b.finalize()
    kept = len(builders[0])
    stats = {
        "files": {langs[0]: src_path.name, langs[1]: tgt_path.name},
        "lines": total,
        "kept": kept,
        "skipped": skipped,
        "tokens": dict(zip(langs, tokens)),
        "unk": dict(zip(langs, unks)),
        "unk_pct": {lang: round(100.0 * u / max(n, 1), 4) for lang, u, n in zip(langs, unks, tokens)},
    }
    skip_txt = ", ".join(f"{k} {v}" for k, v in skipped.items())
    tok_txt = ", ".join(f"{lang} {n} ({stats['unk_pct'][lang]:.2f}% unk)" for lang, n in zip(langs, tokens))
    _log(f"{split}: kept {kept}/{total} pairs (skipped: {skip_txt}); tokens: {tok_txt}")
    if kept == 0:
        raise UserError(f"{src_path}: every pair of the {split} split was skipped ({skip_txt}); "
                        f"check the files or raise --max-len")
    return stats


def _write_dict(path: Path, tok: Tokenizer, counts: np.ndarray) -> None:
    """fairseq-style `piece count` lines for ids 4..V-1 in id order (specials 0-3 implicit),
    so line i describes id i + 4."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(4, tok.vocab_size):
            f.write(f"{tok.id_to_piece(i)} {int(counts[i])}\n")


@cli_main
def main(argv=None):
    args = _parse_args(argv)
    if args.pairs:
        if args.source_lang or args.target_lang:
            raise UserError("--pairs replaces --source-lang/--target-lang: give one or the other")
        return _main_pairs(args)
    if not (args.source_lang and args.target_lang):
        raise UserError("give --source-lang and --target-lang (or --pairs SRC-TGT,... for several directions)")
    src, tgt = langs = (args.source_lang, args.target_lang)
    if src == tgt:
        raise UserError(f"--source-lang and --target-lang are both {src!r}; they must differ")
    dest = _check_output_args(args)
    joint, given = _resolve_models(args, langs)

    # Validate every input before any slow work: existence and equal line counts.
    splits = {}
    for split in SPLITS:
        prefix = getattr(args, f"{split}pref")
        if prefix:
            splits[split] = _aligned_paths(prefix, src, tgt)
    if not splits:
        raise UserError("no input: give at least one of --trainpref, --validpref, --testpref")
    if given is None and "train" not in splits:
        raise UserError("--trainpref is required to train sentencepiece (or pass --spm-model)")

    dest.mkdir(parents=True, exist_ok=True)
    (dest / META).unlink(missing_ok=True)  # an interrupted rerun must not look complete

    models: dict[str, Path] = {}
    for lang in langs:
        out = dest / _spm_name(joint, lang)
        if joint and lang == tgt:
            models[lang] = models[src]
        elif given is not None:
            if not (out.exists() and os.path.samefile(given[lang], out)):
                shutil.copyfile(given[lang], out)  # destdir stays self-contained
            models[lang] = out
        else:
            files = list(splits["train"]) if joint else [splits["train"][langs.index(lang)]]
            _log(f"training sentencepiece ({args.model_type}, vocab {args.vocab_size}) on "
                 + ", ".join(str(p) for p in files))
            models[lang] = train_sentencepiece(files, out.with_suffix(""), args.vocab_size, args.model_type,
                                               args.character_coverage, args.seed, args.input_sentence_size)
    toks = {lang: Tokenizer(models[lang]) for lang in langs}
    if joint:
        toks[tgt] = toks[src]

    counts = None
    stats = {}
    for split, (src_path, tgt_path) in splits.items():
        _log(f"{split}: binarizing {src_path} + {tgt_path}")
        if split == "train":
            counts = {lang: np.zeros(toks[lang].vocab_size, dtype=np.int64) for lang in langs}
            if joint:
                counts[tgt] = counts[src]  # one shared table for the shared vocabulary
        stats[split] = _binarize(split, src_path, tgt_path, (toks[src], toks[tgt]), langs, args.max_len,
                                 dest / f"{split}.{src}-{tgt}", counts if split == "train" else None)

    dicts = None
    if counts is not None:
        dicts = {lang: "dict.txt" if joint else f"dict.{lang}.txt" for lang in langs}
        for lang in (src,) if joint else langs:
            _write_dict(dest / dicts[lang], toks[lang], counts[lang])

    meta = {
        "format_version": FORMAT_VERSION,
        "source_lang": src,
        "target_lang": tgt,
        "joint": joint,
        "vocab_size": {lang: toks[lang].vocab_size for lang in langs},
        "spm": {lang: models[lang].name for lang in langs},
        "spm_sha256": {lang: toks[lang].sha256 for lang in langs},
        "dict": dicts,
        "model_type": None if given else args.model_type,
        "max_len": args.max_len,
        "splits": stats,
    }
    _write_meta(dest, meta)
    return 0


_PAIR_RE = re.compile(r"([A-Za-z0-9_]+)-([A-Za-z0-9_]+)")


def _parse_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        m = _PAIR_RE.fullmatch(item.strip())
        if not m or m.group(1) == m.group(2):
            raise UserError(f"--pairs: {item.strip()!r} is not SRC-TGT with two different language codes "
                            f"(letters, digits, _), e.g. en-de,de-en")
        if m.groups() in pairs:
            raise UserError(f"--pairs: {item.strip()} is given twice")
        pairs.append(m.groups())
    return pairs


def _main_pairs(args) -> int:
    """--pairs: every direction into one directory, one joint sentencepiece model with the language tags."""
    pairs = _parse_pairs(args.pairs)
    if args.joint is False or args.src_spm_model or args.tgt_spm_model:
        raise UserError("--pairs uses one joint sentencepiece model for every language: drop --no-joint and "
                        "--src-spm-model/--tgt-spm-model (--spm-model is fine)")
    dest = _check_output_args(args)
    names = [f"{s}-{t}" for s, t in pairs]
    langs = list(dict.fromkeys(lang for pair in pairs for lang in pair))
    tags = list(dict.fromkeys(tag_of(t) for _, t in pairs))

    inputs: dict[str, list[tuple[Path, Path]]] = {}  # split -> one (src, tgt) path pair per direction
    for split in SPLITS:
        spec = getattr(args, f"{split}pref")
        if not spec:
            continue
        prefixes = [x.strip() for x in spec.split(",")]
        if len(prefixes) == 1:
            prefixes *= len(pairs)
        if len(prefixes) != len(pairs):
            raise UserError(f"--{split}pref: {len(prefixes)} prefixes for {len(pairs)} pairs; give one prefix "
                            f"for every pair or one per pair, comma-separated in the order of --pairs")
        inputs[split] = [_aligned_paths(prefix, s, t) for prefix, (s, t) in zip(prefixes, pairs)]
    if not inputs:
        raise UserError("no input: give at least one of --trainpref, --validpref, --testpref")
    given = Path(args.spm_model) if args.spm_model else None
    if given is not None and not given.is_file():
        raise UserError(f"{given}: sentencepiece model not found")
    if given is None and "train" not in inputs:
        raise UserError("--trainpref is required to train sentencepiece (or pass --spm-model)")

    dest.mkdir(parents=True, exist_ok=True)
    (dest / META).unlink(missing_ok=True)  # an interrupted rerun must not look complete
    model = dest / _spm_name(True, "")
    if given is not None:
        if not (model.exists() and os.path.samefile(given, model)):
            shutil.copyfile(given, model)
    else:
        files = list(dict.fromkeys(p for paths in inputs["train"] for p in paths))
        _log(f"training sentencepiece ({args.model_type}, vocab {args.vocab_size}, tags {' '.join(tags)}) on "
             + ", ".join(str(p) for p in files))
        train_sentencepiece(files, model.with_suffix(""), args.vocab_size, args.model_type, args.character_coverage,
                            args.seed, args.input_sentence_size, user_defined_symbols=tags)
    tok = Tokenizer(model)
    for tag in tags:
        if tok.piece_id(tag) is None:
            raise UserError(f"{given or model}: the language tag {tag} is not in its vocabulary; train the model "
                            f"with the tags as user-defined symbols, or leave out --spm-model to train one here")

    counts = np.zeros(tok.vocab_size, dtype=np.int64)  # one table: the vocabulary is shared
    stats: dict[str, dict] = {}
    for split, paths in inputs.items():
        stats[split] = {}
        for name, (s, t), (src_path, tgt_path) in zip(names, pairs, paths):
            _log(f"{split} {name}: binarizing {src_path} + {tgt_path}")
            stats[split][name] = _binarize(f"{split} {name}", src_path, tgt_path, (tok, tok), (s, t), args.max_len,
                                           dest / f"{split}.{name}", {s: counts, t: counts} if split == "train" else None)
    if "train" in inputs:
        _write_dict(dest / "dict.txt", tok, counts)
    _write_meta(dest, {
        "format_version": FORMAT_VERSION,
        "directions": [{"source_lang": s, "target_lang": t, "tag": tag_of(t)} for s, t in pairs],
        "joint": True,
        "vocab_size": {lang: tok.vocab_size for lang in langs},
        "spm": {lang: model.name for lang in langs},
        "spm_sha256": {lang: tok.sha256 for lang in langs},
        "dict": {lang: "dict.txt" for lang in langs} if "train" in inputs else None,
        "model_type": None if given else args.model_type,
        "max_len": args.max_len,
        "splits": stats,
    })
    return 0


if __name__ == "__main__":
    main()
