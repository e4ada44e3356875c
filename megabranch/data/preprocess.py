"""megabranch-preprocess: train/apply SentencePiece and binarize parallel text into a destdir.

Input: PREFIX.LANG (or PREFIX.LANG.gz) per split and language, one sentence per line, the two
languages line-aligned. Output (in --destdir): spm.model (or spm.SRC.model + spm.TGT.model),
dict.txt (or dict.LANG.txt), {split}.{src}-{tgt}.{lang}.bin/.idx and meta.json (written last,
so its presence means the directory is complete; its shape: megabranch/data/meta.py).

One direction with -s/-t, or several with --pairs en-de,de-en,en-fr: one joint sentencepiece model
over every training file, with the target-language tags <2de>, <2en>, <2fr> as user-defined pieces;
each direction's splits are binarized as above, and meta.json lists the directions and their tags.
The tag is put before the source when the data is read (megabranch.data.multilingual), not stored
in the binarized files.

A directory that already holds preprocessed data is refused unless --overwrite. Memory stays flat in
the corpus size (lines are read, encoded and written a chunk at a time); --workers N encodes chunks in
N processes, the output byte-identical to one worker's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import sys
from collections import deque
from itertools import chain
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from megabranch.config import ints
from megabranch.data.indexed import IndexedDatasetBuilder, best_dtype
from megabranch.data.meta import FORMAT_VERSION, META, direction_name, write_meta
from megabranch.data.multilingual import tag_of
from megabranch.data.tokenizer import UNK, Tokenizer, count_lines, iter_line_chunks, train_sentencepiece
from megabranch.errors import UserError, cli_main
from megabranch.progress import ProgressBar, bar_wanted

SPLITS = ("train", "valid", "test")
_CHUNK = 10_000  # line pairs read, encoded and written at a time
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


class Inputs(NamedTuple):
    """One split of one direction: its two files and their (equal) line count."""

    src: Path
    tgt: Path
    lines: int


def _aligned_paths(prefix: str, src: str, tgt: str) -> Inputs:
    """PREFIX.SRC and PREFIX.TGT, refused unless both exist and have as many lines."""
    paths = (input_path(prefix, src), input_path(prefix, tgt))
    n = [count_lines(p) for p in paths]
    if n[0] != n[1]:
        raise UserError(f"{paths[0]} has {n[0]} lines but {paths[1]} has {n[1]}; parallel files must be line-aligned")
    return Inputs(*paths, n[0])


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
    p.add_argument("--overwrite", action="store_true",
                   help="replace the preprocessed data --destdir already holds (refused without it)")
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
    p.add_argument("--workers", type=int, default=1,
                   help="processes that encode (the output is byte-identical for any number)")
    p.add_argument("--progress", choices=("auto", "bar", "none"), default="auto",
                   help="a progress bar with the time left: auto (on a terminal), bar or none")
    return p.parse_args(argv)


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


def _directions(args) -> list[dict]:
    """The directions asked for: -s/-t (one, untagged) or --pairs (each tagged with its target language)."""
    if args.pairs:
        if args.source_lang or args.target_lang:
            raise UserError("--pairs replaces --source-lang/--target-lang: give one or the other")
        pairs = _parse_pairs(args.pairs)
        if args.joint is False or args.src_spm_model or args.tgt_spm_model:
            raise UserError("--pairs uses one joint sentencepiece model for every language: drop --no-joint and "
                            "--src-spm-model/--tgt-spm-model (--spm-model is fine)")
        return [{"source_lang": s, "target_lang": t, "tag": tag_of(t)} for s, t in pairs]
    if not (args.source_lang and args.target_lang):
        raise UserError("give --source-lang and --target-lang (or --pairs SRC-TGT,... for several directions)")
    if args.source_lang == args.target_lang:
        raise UserError(f"--source-lang and --target-lang are both {args.source_lang!r}; they must differ")
    return [{"source_lang": args.source_lang, "target_lang": args.target_lang}]


def _check_output_args(args) -> Path:
    if args.max_len < 1:
        raise UserError(f"--max-len {args.max_len}: must be >= 1")
    ints(1).check_flag("--workers", args.workers)
    dest = Path(args.destdir)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--destdir {dest}: exists and is not a directory")
    return dest


def _resolve_models(args, langs: list[str]) -> tuple[bool, dict[str, Path] | None]:
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


def _inputs(args, directions: list[dict]) -> dict[str, list[Inputs]]:
    """split -> one Inputs per direction, every file checked (it exists, the pair is line-aligned) before any
    slow work. With --pairs a --{split}pref is one prefix for every direction or one per direction."""
    inputs = {}
    for split in SPLITS:
        spec = getattr(args, f"{split}pref")
        if not spec:
            continue
        prefixes = [x.strip() for x in spec.split(",")] if args.pairs else [spec]
        if len(prefixes) == 1:
            prefixes *= len(directions)
        if len(prefixes) != len(directions):
            raise UserError(f"--{split}pref: {len(prefixes)} prefixes for {len(directions)} pairs; give one prefix "
                            f"for every pair or one per pair, comma-separated in the order of --pairs")
        inputs[split] = [_aligned_paths(prefix, d["source_lang"], d["target_lang"])
                         for prefix, d in zip(prefixes, directions)]
    if not inputs:
        raise UserError("no input: give at least one of --trainpref, --validpref, --testpref")
    return inputs


def _spm_name(joint: bool, lang: str) -> str:
    return "spm.model" if joint else f"spm.{lang}.model"


def _dict_name(joint: bool, lang: str) -> str:
    return "dict.txt" if joint else f"dict.{lang}.txt"


def _refuse_existing_data(dest: Path, outputs: list[Path], given, overwrite: bool) -> None:
    """fairseq-preprocess's rule: a directory holding preprocessed data is not written over unless asked (a given
    model that already is the output file is not written over)."""
    keep = list(given.values()) if given else []
    there = [p for p in outputs if p.exists() and not any(os.path.samefile(p, g) for g in keep)]
    if there and not overwrite:
        more = f" and {len(there) - 1} more of its files" if len(there) > 1 else ""
        raise UserError(f"--destdir {dest} already holds preprocessed data ({there[0].name}{more}); pass "
                        f"--overwrite to replace it, or choose another directory")


class Encoded(NamedTuple):
    """One chunk of line pairs, encoded: the kept pairs' ids end to end and their lengths, per side, and how many
    pairs were skipped for each reason."""

    ids: tuple[np.ndarray, np.ndarray]
    sizes: tuple[np.ndarray, np.ndarray]
    skipped: dict


def encode_chunk(pairs: list[tuple[bytes, bytes]], toks: tuple[Tokenizer, Tokenizer], max_len: int,
                 threads: int | None = None) -> Encoded:
    """Decode, filter (bad UTF-8, empty, longer than max_len on a side) and encode a chunk of raw line pairs."""
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    texts = []
    for raw_s, raw_t in pairs:
        try:
            s, t = raw_s.decode("utf-8"), raw_t.decode("utf-8")
        except UnicodeDecodeError:
            skipped["bad_utf8"] += 1
            continue
        if not s.strip() or not t.strip():
            skipped["empty"] += 1
            continue
        texts.append((s, t))
    enc = [toks[side].encode_batch([pair[side] for pair in texts], threads) for side in (0, 1)]
    keep = [len(a) <= max_len and len(b) <= max_len for a, b in zip(*enc)]
    skipped["too_long"] = len(keep) - sum(keep)
    ids, sizes = [], []
    for side in (0, 1):
        kept = [x for x, k in zip(enc[side], keep) if k]
        lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
        ids.append(np.fromiter(chain.from_iterable(kept), dtype=np.int64, count=int(lengths.sum())))
        sizes.append(lengths)
    return Encoded(tuple(ids), tuple(sizes), skipped)


_worker_state: dict = {}  # a pool worker's tokenizers and max_len (set once by _start_worker)


def _start_worker(models: tuple[str, str], max_len: int) -> None:
    toks = {m: Tokenizer(m) for m in dict.fromkeys(models)}
    _worker_state.update(toks=(toks[models[0]], toks[models[1]]), max_len=max_len)


def _worker_encode(pairs: list[tuple[bytes, bytes]]) -> Encoded:
    return encode_chunk(pairs, _worker_state["toks"], _worker_state["max_len"], threads=1)


class Encoder:
    """Encodes chunks of line pairs in this process (workers=1) or a pool of `workers` processes, handing the
    results back in input order, at most 2 x workers chunks in flight (so memory stays flat)."""

    def __init__(self, toks: tuple[Tokenizer, Tokenizer], max_len: int, workers: int):
        self.toks, self.max_len, self.workers = toks, max_len, workers
        self.pool = None
        if workers > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(workers, _start_worker, ((str(toks[0].path), str(toks[1].path)), max_len))

    def map(self, chunks: Iterator[list[tuple[bytes, bytes]]]) -> Iterator[tuple[int, Encoded]]:
        """(pairs read, their Encoded) for each chunk, in order."""
        if self.pool is None:
            for chunk in chunks:
                yield len(chunk), encode_chunk(chunk, self.toks, self.max_len)
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append((len(chunk), self.pool.apply_async(_worker_encode, (chunk,))))
            if len(pending) >= 2 * self.workers:
                n, result = pending.popleft()
                yield n, result.get()
        while pending:
            n, result = pending.popleft()
            yield n, result.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _pair_chunks(inp: Inputs) -> Iterator[list[tuple[bytes, bytes]]]:
    for s, t in zip(iter_line_chunks(inp.src, _CHUNK), iter_line_chunks(inp.tgt, _CHUNK)):
        yield list(zip(s, t))


def _binarize(label: str, inp: Inputs, toks, langs, encoder: Encoder, out_prefix: Path, counts, bar: ProgressBar,
              done: int) -> dict:
    """Encode and write one split of one direction; returns its stats. `counts` (lang -> array of piece counts,
    train only) is updated. `done`: lines of earlier splits, for the bar."""
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    tokens, unks = [0, 0], [0, 0]
    builders = [IndexedDatasetBuilder(f"{out_prefix}.{lang}", best_dtype(tok.vocab_size))
                for lang, tok in zip(langs, toks)]
    total = 0
    try:
        for n, enc in encoder.map(_pair_chunks(inp)):
            total += n
            for reason, k in enc.skipped.items():
                skipped[reason] += k
            for side, (ids, sizes) in enumerate(zip(enc.ids, enc.sizes)):
                builders[side].add_items(ids, sizes)
                tokens[side] += ids.size
                unks[side] += int(np.count_nonzero(ids == UNK))
                if counts is not None and ids.size:
                    c = counts[langs[side]]
                    c += np.bincount(ids, minlength=len(c))
            bar.show(done + total, label)
    except BaseException:
        for b in builders:
            b.discard()
        raise
    for b in builders:
        b.finalize()
    bar.clear()
    kept = len(builders[0])
    stats = {
        "files": {langs[0]: inp.src.name, langs[1]: inp.tgt.name},
        "lines": total,
        "kept": kept,
        "skipped": skipped,
        "tokens": dict(zip(langs, tokens)),
        "unk": dict(zip(langs, unks)),
        "unk_pct": {lang: round(100.0 * u / max(n, 1), 4) for lang, u, n in zip(langs, unks, tokens)},
        "max_id": {lang: b.max_id for lang, b in zip(langs, builders)},
    }
    skip_txt = ", ".join(f"{k} {v}" for k, v in skipped.items())
    tok_txt = ", ".join(f"{lang} {n} ({stats['unk_pct'][lang]:.2f}% unk)" for lang, n in zip(langs, tokens))
    _log(f"{label}: kept {kept}/{total} pairs (skipped: {skip_txt}); tokens: {tok_txt}")
    if kept == 0:
        raise UserError(f"{inp.src}: every pair of the {label} split was skipped ({skip_txt}); "
                        f"check the files or raise --max-len")
    return stats


def _write_dict(path: Path, tok: Tokenizer, counts: np.ndarray) -> None:
    """fairseq-style `piece count` lines for ids 4..V-1 in id order (specials 0-3 implicit),
    so line i describes id i + 4."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(4, tok.vocab_size):
            f.write(f"{tok.id_to_piece(i)} {int(counts[i])}\n")


def _models(args, dest: Path, joint: bool, given, langs: list[str], directions: list[dict],
            inputs: dict[str, list[Inputs]]) -> dict[str, Path]:
    """lang -> its sentencepiece model in dest: the given one copied in, or one trained on the train split (joint:
    one over every training file, with the directions' tags as pieces)."""
    tags = list(dict.fromkeys(d["tag"] for d in directions if "tag" in d))
    models: dict[str, Path] = {}
    for lang in langs:
        out = dest / _spm_name(joint, lang)
        if joint and models:
            models[lang] = next(iter(models.values()))
        elif given is not None:
            if not (out.exists() and os.path.samefile(given[lang], out)):
                shutil.copyfile(given[lang], out)  # destdir stays self-contained
            models[lang] = out
        else:
            train = list(zip(directions, inputs["train"]))
            files = list(dict.fromkeys(p for d, inp in train for p, side in ((inp.src, d["source_lang"]),
                                                                                 (inp.tgt, d["target_lang"]))
                                       if joint or side == lang))
            with_tags = f", tags {' '.join(tags)}" if tags else ""
            _log(f"training sentencepiece ({args.model_type}, vocab {args.vocab_size}{with_tags}) on "
                 + ", ".join(str(p) for p in files))
            models[lang] = train_sentencepiece(files, out.with_suffix(""), args.vocab_size, args.model_type,
                                               args.character_coverage, args.seed, args.input_sentence_size,
                                               user_defined_symbols=tags)
    return models


@cli_main
def main(argv=None):
    args = _parse_args(argv)
    directions = _directions(args)
    dest = _check_output_args(args)
    langs = list(dict.fromkeys(lang for d in directions for lang in (d["source_lang"], d["target_lang"])))
    joint, given = _resolve_models(args, langs)
    inputs = _inputs(args, directions)
    if given is None and "train" not in inputs:
        raise UserError("--trainpref is required to train sentencepiece (or pass --spm-model)")
    names = [direction_name(d) for d in directions]
    outputs = [dest / META] + [dest / _spm_name(joint, lang) for lang in langs]
    outputs += [dest / _dict_name(joint, lang) for lang in langs] if "train" in inputs else []
    outputs += [dest / f"{split}.{name}.{lang}.{ext}" for split in inputs for name, d in zip(names, directions)
                for lang in (d["source_lang"], d["target_lang"]) for ext in ("bin", "idx")]
    _refuse_existing_data(dest, list(dict.fromkeys(outputs)), given, args.overwrite)

    dest.mkdir(parents=True, exist_ok=True)
    (dest / META).unlink(missing_ok=True)  # an interrupted rerun must not look complete
    models = _models(args, dest, joint, given, langs, directions, inputs)
    by_path = {p: Tokenizer(p) for p in dict.fromkeys(models.values())}  # joint: one Tokenizer for every side
    toks = {lang: by_path[models[lang]] for lang in langs}
    for d in directions:
        if "tag" in d and toks[d["source_lang"]].piece_id(d["tag"]) is None:
            raise UserError(f"{args.spm_model or models[d['source_lang']]}: the language tag {d['tag']} is not in "
                            f"its vocabulary; train the model with the tags as user-defined symbols, or leave out "
                            f"--spm-model to train one here")

    # piece counts of the train split for the dict files: one table per vocabulary, shared by its languages
    tables = {p: np.zeros(t.vocab_size, dtype=np.int64) for p, t in by_path.items()}
    counts = {lang: tables[models[lang]] for lang in langs}
    bar = ProgressBar(sum(inp.lines for split in inputs.values() for inp in split), bar_wanted(args.progress))
    stats: dict[str, dict] = {}
    done = 0
    encoders: dict[tuple[Path, Path], Encoder] = {}  # one per (source model, target model): joint, just one
    try:
        for split, per_direction in inputs.items():
            stats[split] = {}
            for name, d, inp in zip(names, directions, per_direction):
                pair = (d["source_lang"], d["target_lang"])
                label = split if len(directions) == 1 else f"{split} {name}"
                _log(f"{label}: binarizing {inp.src} + {inp.tgt}")
                pair_toks = (toks[pair[0]], toks[pair[1]])
                key = (models[pair[0]], models[pair[1]])
                if key not in encoders:
                    encoders[key] = Encoder(pair_toks, args.max_len, args.workers)
                stats[split][name] = _binarize(label, inp, pair_toks, pair, encoders[key], dest / f"{split}.{name}",
                                               counts if split == "train" else None, bar, done)
                done += inp.lines
    finally:
        for encoder in encoders.values():
            encoder.close()

    dicts = None
    if "train" in inputs:
        dicts = {lang: _dict_name(joint, lang) for lang in langs}
        for lang in dict.fromkeys(langs if not joint else langs[:1]):
            _write_dict(dest / dicts[lang], toks[lang], counts[lang])
    write_meta(dest, {
        "format_version": FORMAT_VERSION,
        "directions": directions,
        "joint": joint,
        "vocab_size": {lang: toks[lang].vocab_size for lang in langs},
        "spm": {lang: models[lang].name for lang in langs},
        "spm_sha256": {lang: toks[lang].sha256 for lang in langs},
        "dict": dicts,
        "model_type": None if given else args.model_type,
        "max_len": args.max_len,
        "splits": stats,
    })
    _log(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    main()
