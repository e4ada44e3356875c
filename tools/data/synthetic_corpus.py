"""A seeded synthetic parallel corpus at the scale of WMT14 En-Fr (~36M pairs), for measuring megabranch-preprocess
and the trainer's data start-up. The same seed writes the same bytes.

    python -m tools.data.synthetic_corpus --pairs 36000000 --out tmp/wmt14_synthetic

writes OUT/train.en, OUT/train.fr (and OUT/valid.*, 3000 pairs), one sentence a line. Words are invented
(syllables), drawn with Zipf frequencies from a 60k-word vocabulary per language; English sentences have about
27 words (a gamma distribution, a long tail to 250), the French side a word-for-word image through a fixed
dictionary, 0-30% longer. Nothing about it is language; what matters for the measurement is its size, its line
lengths and a vocabulary BPE has to work on. Keep it out of the repository: write it under a git-ignored folder
(tmp/, data-bin/).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

CHUNK = 100_000  # pairs made per step
VOCAB = 60_000
SYLLABLES = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"] + ["an", "er", "in", "on", "qu", "th", "ch"]


def vocabulary(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct invented words (bytes), the shortest first (frequent words are short, as in text)."""
    words: dict[bytes, None] = {}
    while len(words) < n:
        k = 1 + np.minimum(rng.gamma(2.0, 1.1, n).astype(np.int64), 5)
        syl = rng.integers(0, len(SYLLABLES), int(k.sum())).tolist()
        ends = np.cumsum(k).tolist()
        a = 0
        for e in ends:
            words.setdefault("".join(SYLLABLES[i] for i in syl[a:e]).encode(), None)
            a = e
    return np.array(sorted(list(words)[:n], key=len), dtype=object)


def zipf_cdf(n: int) -> np.ndarray:
    p = 1.0 / (np.arange(n) + 2.7)
    return np.cumsum(p / p.sum())


class Words:
    """A vocabulary as one byte buffer (each word followed by a space) for building text without Python loops."""

    def __init__(self, words: np.ndarray):
        self.size = len(words)
        self.buffer = np.frombuffer(b"".join(w + b" " for w in words), dtype=np.uint8)
        self.length = np.fromiter((len(w) + 1 for w in words), dtype=np.int64, count=len(words))
        self.offset = np.cumsum(self.length) - self.length

    def lines(self, ids: np.ndarray, lengths: np.ndarray) -> bytes:
        """The sentences of words `ids`, cut after lengths[0], lengths[1], ... words, each ending in a newline."""
        size = self.length[ids]
        out_start = np.cumsum(size) - size
        gather = np.repeat(self.offset[ids] - out_start, size) + np.arange(int(size.sum()))
        text = self.buffer[gather]
        text[(out_start + size - 1)[np.cumsum(lengths) - 1]] = ord("\n")
        return text.tobytes()


def write_pairs(out: str, split: str, n: int, seed: int, src: Words, tgt: Words, mapping: np.ndarray,
                log=None) -> None:
    """n pairs into OUT/SPLIT.en and OUT/SPLIT.fr: chunk c drawn from default_rng([seed, c])."""
    cdf = zipf_cdf(src.size)
    paths = [os.path.join(out, f"{split}.{lang}") for lang in ("en", "fr")]
    start = time.time()
    with open(paths[0] + ".tmp", "wb") as fs, open(paths[1] + ".tmp", "wb") as ft:
        for c, first in enumerate(range(0, n, CHUNK)):
            rng = np.random.default_rng([seed, c])
            k = min(CHUNK, n - first)
            src_len = np.clip(rng.gamma(3.0, 9.0, k).astype(np.int64), 1, 250)
            tgt_len = np.maximum(1, (src_len * rng.uniform(1.0, 1.3, k)).astype(np.int64))
            src_ids = np.minimum(np.searchsorted(cdf, rng.random(int(src_len.sum()))), src.size - 1)
            tgt_ids = np.minimum(np.searchsorted(cdf, rng.random(int(tgt_len.sum()))), tgt.size - 1)
            # the French side: word j of a line is the image of English word j while there is one, else drawn
            line = np.repeat(np.arange(k), tgt_len)
            pos = np.arange(len(tgt_ids)) - np.repeat(np.cumsum(tgt_len) - tgt_len, tgt_len)
            image = pos < src_len[line]
            src_pos = np.where(image, (np.cumsum(src_len) - src_len)[line] + pos, 0)
            tgt_ids = np.where(image, mapping[src_ids[src_pos]], tgt_ids)
            fs.write(src.lines(src_ids, src_len))
            ft.write(tgt.lines(tgt_ids, tgt_len))
            if log and c % 20 == 0:
                log(f"{split}: {first + k}/{n} pairs, {time.time() - start:.0f} s")
    for p in paths:
        os.replace(p + ".tmp", p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=36_000_000, help="training pairs (WMT14 En-Fr: ~36M)")
    ap.add_argument("--valid-pairs", type=int, default=3000)
    ap.add_argument("--out", required=True, help="folder to write into (git-ignored: tmp/..., data-bin/...)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.valid_pairs < 1:
        ap.error("--pairs and --valid-pairs must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng([args.seed, 2**31])
    src, tgt = Words(vocabulary(rng, VOCAB)), Words(vocabulary(rng, VOCAB))
    # en word i -> fr word mapping[i], of about the same frequency rank (so both sides have alike word lengths)
    mapping = np.argsort(np.arange(VOCAB) + rng.normal(0, 50, VOCAB), kind="stable")

    def log(msg):
        print(f"synthetic_corpus: {msg}", file=sys.stderr, flush=True)

    write_pairs(args.out, "train", args.pairs, args.seed, src, tgt, mapping, log)
    write_pairs(args.out, "valid", args.valid_pairs, args.seed + 1_000_003, src, tgt, mapping)
    log(f"wrote {args.out}/train.{{en,fr}} ({args.pairs} pairs) and valid.{{en,fr}} ({args.valid_pairs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
