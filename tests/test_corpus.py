"""Checks on the shipped KJV -> WEB demo corpus in data/kjv_web."""

import gzip
import os

import pytest

from tests.helpers.env import ROOT

pytestmark = pytest.mark.unit

CORPUS = os.path.join(ROOT, "data", "kjv_web")
SPLITS = ("train", "valid", "test")
SRC, TGT = "kjv", "web"


def _read(split, lang):
    with gzip.open(os.path.join(CORPUS, f"{split}.{lang}.gz"), "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:-1]  # every line ends with "\n"


@pytest.fixture(scope="module")
def corpus():
    return {split: (_read(split, SRC), _read(split, TGT)) for split in SPLITS}


def test_files_exist():
    for split in SPLITS:
        for lang in (SRC, TGT):
            assert os.path.isfile(os.path.join(CORPUS, f"{split}.{lang}.gz")), (split, lang)
    assert os.path.isfile(os.path.join(CORPUS, "README.md"))


def test_aligned_and_non_empty(corpus):
    for split, (src, tgt) in corpus.items():
        assert len(src) == len(tgt), split
        assert src, split
        for side in (src, tgt):
            assert all(line.strip() and line == line.strip() for line in side), split
            assert not any("\r" in line or "\t" in line for line in side), split


def test_sizes(corpus):
    total = sum(len(src) for src, _ in corpus.values())
    assert total > 30000
    for split in ("valid", "test"):
        assert 800 <= len(corpus[split][0]) <= 1200, split


def test_no_pair_shared_between_splits(corpus):
    pairs = {split: set(zip(*corpus[split])) for split in SPLITS}
    assert not pairs["test"] & pairs["train"]
    assert not pairs["valid"] & pairs["train"]
    assert not pairs["test"] & pairs["valid"]


def test_no_markup_left(corpus):
    for split, (src, tgt) in corpus.items():
        for line in src + tgt:
            for bad in ("<", ">", "\\", "\u00b6", "{", "}", "\x00"):
                assert bad not in line, (split, line)
