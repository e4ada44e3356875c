"""Tiny corpora of random sentences over a small English vocabulary, and a tiny preprocessed data directory."""

from __future__ import annotations

import random
from pathlib import Path

from megabranch.data.preprocess import main as preprocess_main

WORDS = (
    "in the beginning god created heaven and earth light darkness water spirit moved "
    "upon face deep said let there be was good day night evening morning first second"
).split()


def sentences(n: int, seed: int, lo: int = 3, hi: int = 14) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_corpus(
    d: Path, n_train: int, n_valid: int, langs=("src", "tgt"), seed: int = 0, lo: int = 3, hi: int = 14
) -> None:
    """d/train.<lang> and d/valid.<lang>, each file its own random sentences (so no pair is aligned)."""
    d.mkdir(parents=True, exist_ok=True)
    files = [(split, n, lang) for split, n in (("train", n_train), ("valid", n_valid)) for lang in langs]
    for k, (split, n, lang) in enumerate(files):
        write_lines(d / f"{split}.{lang}", sentences(n, seed + 1 + k, lo, hi))


def preprocessed(
    d: Path,
    vocab: int,
    n_train: int,
    n_valid: int,
    seed: int = 0,
    langs=("src", "tgt"),
    lo: int = 3,
    hi: int = 14,
    extra: tuple[str, ...] = (),
) -> str:
    """write_corpus in `d`, preprocessed with a joint sentencepiece vocabulary of `vocab` into d/bin, whose path
    is returned."""
    write_corpus(d, n_train, n_valid, langs, seed, lo, hi)
    dest = d / "bin"
    assert (
        preprocess_main(
            [
                "--source-lang",
                langs[0],
                "--target-lang",
                langs[1],
                "--trainpref",
                str(d / "train"),
                "--validpref",
                str(d / "valid"),
                "--destdir",
                str(dest),
                "--vocab-size",
                str(vocab),
                *extra,
            ]
        )
        == 0
    )
    return str(dest)
