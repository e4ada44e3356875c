"""SentencePiece training and a thin tokenizer wrapper with fixed special ids.

Special ids are the same for every model this project trains: pad=0, unk=1, bos=2, eos=3,
so models, datasets and checkpoints never need to carry a remapping table.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from megabranch.errors import UserError
from megabranch.vocab import BOS, EOS, PAD, UNK  # noqa: F401 - re-exported by megabranch.data

# sentencepiece refuses input_sentence_size in 1..100; below this we just use every line.
_MIN_SAMPLE = 101


def open_text_bytes(path: str | os.PathLike):
    """Open a corpus file for binary line reading; `.gz` is decompressed transparently."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_lines(path: str | os.PathLike) -> Iterator[bytes]:
    """Yield raw lines without the trailing newline (iter_line_chunks, one line at a time)."""
    for chunk in iter_line_chunks(path):
        yield from chunk


def _strip_newline(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
    return line[:-1] if line.endswith(b"\r") else line


def iter_line_chunks(path: str | os.PathLike, n: int = 10_000) -> Iterator[list[bytes]]:
    """Yield the raw lines, without the trailing newline, in lists of `n` (the last one shorter).

    Splits on b"\\n" only: str.splitlines() would also split on U+2028 etc. and silently
    misalign parallel files. A UTF-8 BOM on the first line is dropped.
    """
    try:
        with open_text_bytes(path) as f:
            first = True
            while chunk := [_strip_newline(line) for line in islice(f, n)]:
                if first:
                    first = False
                    if chunk[0].startswith(b"\xef\xbb\xbf"):
                        chunk[0] = chunk[0][3:]
                yield chunk
    except (OSError, EOFError) as e:  # corrupt gzip, unreadable file
        raise UserError(f"{path}: cannot read ({e})") from None


def count_lines(path: str | os.PathLike) -> int:
    """How many lines iter_lines yields, counted a block at a time (no line is built)."""
    n, last = 0, b"\n"
    try:
        with open_text_bytes(path) as f:
            while block := f.read(1 << 22):
                n += block.count(b"\n")
                last = block[-1:]
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    return n + (last != b"\n")


def _usable_lines(files: Sequence[str | os.PathLike]) -> Iterator[str]:
    """Decodable, non-blank lines of all files, in order (what spm should learn from)."""
    for path in files:
        for raw in iter_lines(path):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                yield text


def train_sentencepiece(
    input_files: Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    seed: int = 1,
    input_sentence_size: int = 2_000_000,
    user_defined_symbols: Sequence[str] = (),
) -> Path:
    """Train a SentencePiece model on `input_files` and write `<model_prefix>.model`.

    Deterministic: the same files and arguments give a byte-identical model. sentencepiece's own
    sentence sampling is not reproducible across processes even with a seed, so we sample
    `input_sentence_size` lines ourselves with a seeded numpy RNG and train single-threaded.
    The model bytes are produced in memory (`model_writer`) so no file path is embedded in them.
    `user_defined_symbols` (e.g. the language tags "<2de>") become pieces that are never split.
    Returns the path of the written .model file.
    """
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"model_type {model_type!r}: valid values are 'bpe' and 'unigram'")
    if vocab_size <= 4:
        raise UserError(f"vocab_size {vocab_size}: must be > 4 (ids 0-3 are pad/unk/bos/eos)")
    files = [Path(p) for p in input_files]
    for p in files:
        if not p.is_file():
            raise UserError(f"{p}: input file not found")
    names = ", ".join(str(p) for p in files)

    n = sum(1 for _ in _usable_lines(files))
    if n == 0:
        raise UserError(f"{names}: no non-empty UTF-8 lines to train sentencepiece on")
    if input_sentence_size >= _MIN_SAMPLE and n > input_sentence_size:
        keep = np.zeros(n, dtype=bool)
        keep[np.random.default_rng(seed).choice(n, input_sentence_size, replace=False)] = True
        sentences: Iterable[str] = (s for i, s in enumerate(_usable_lines(files)) if keep[i])
    else:
        sentences = _usable_lines(files)

    buf = io.BytesIO()
    # only passed when asked for, so models without them stay byte-identical to earlier ones
    extra = {"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
            **extra,
        )
    except RuntimeError as e:
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
        if m:
            raise UserError(
                f"vocab_size {vocab_size} is too large for the corpus {names}: "
                f"sentencepiece allows at most {m.group(2)} here; lower the vocabulary size"
            ) from None
        raise UserError(f"sentencepiece training on {names} failed: {str(e).splitlines()[0]}") from None

    out = Path(str(model_prefix) + ".model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)  # atomic: a crash never leaves a half-written model
    return out


class Tokenizer:
    """A loaded SentencePiece model with the project's fixed special ids."""

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: sentencepiece model not found")
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception:  # sentencepiece raises RuntimeError/OSError for garbage input
            raise UserError(f"{self.path}: not a valid sentencepiece model") from None
        got = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if got != (PAD, UNK, BOS, EOS):
            raise UserError(
                f"{self.path}: special ids (pad, unk, bos, eos) are {got}; "
                f"this project needs {(PAD, UNK, BOS, EOS)} (train with megabranch-preprocess)"
            )

    pad = property(lambda self: PAD, doc="Padding id (0).")
    unk = property(lambda self: UNK, doc="Unknown-piece id (1).")
    bos = property(lambda self: BOS, doc="Beginning-of-sentence id (2).")
    eos = property(lambda self: EOS, doc="End-of-sentence id (3).")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`, without bos/eos (the dataset adds those)."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        """encode() of many lines at once (sentencepiece spreads the work over `threads`; None: its default)."""
        return self._sp.encode(texts, out_type=int, num_threads=threads) if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, stopping at the first eos and skipping pad/bos (list, array or tensor)."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(i)
        return self._sp.decode(out)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_id(self, piece: str) -> int | None:
        """Id of the vocabulary entry `piece` (e.g. a language tag), None when there is none."""
        i = self._sp.piece_to_id(piece)
        return None if i == UNK and piece != self.id_to_piece(UNK) else i

    def __repr__(self) -> str:
        return f"Tokenizer({self.path.name}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
