"""Checks on the shipped Bible corpora in data/ (kjv_web, en_es) and on the builder's text functions."""

import gzip
import importlib.util
import os

import pytest

from tests.helpers.env import ROOT

pytestmark = pytest.mark.unit

SPLITS = ("train", "valid", "test")
PAIRS = {"kjv_web": ("kjv", "web"), "en_es": ("en", "es")}


def _read(pair, split, lang):
    with gzip.open(os.path.join(ROOT, "data", pair, f"{split}.{lang}.gz"), "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:-1]  # every line ends with "\n"


@pytest.fixture(scope="module", params=sorted(PAIRS))
def corpus(request):
    src, tgt = PAIRS[request.param]
    return {split: (_read(request.param, split, src), _read(request.param, split, tgt)) for split in SPLITS}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_files_exist(pair):
    for split in SPLITS:
        for lang in PAIRS[pair]:
            assert os.path.isfile(os.path.join(ROOT, "data", pair, f"{split}.{lang}.gz")), (split, lang)
    assert os.path.isfile(os.path.join(ROOT, "data", pair, "README.md"))


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


def test_en_es_is_aligned_where_the_rv1909_moved_chapter_boundaries():
    """Numbers 12:16 and Jonah 1:17 (WEB) are the RV1909's 13:1 and 2:1: after realignment they are pairs."""
    pairs = {}
    for split in SPLITS:
        pairs.update(zip(*(_read("en_es", split, lang) for lang in ("en", "es"))))
    assert pairs["Afterward the people traveled from Hazeroth, and encamped in the wilderness of Paran."] == (
        "Y después movió el pueblo de Haseroth, y asentaron el campo en el desierto de Parán."
    )
    assert pairs["Then Jonah prayed to Yahweh, his God, out of the fish\u2019s belly."] == (
        "Y oró Jonás desde el vientre del pez á Jehová su Dios,"
    )


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location(
        "build_bible_corpus", os.path.join(ROOT, "data", "build_bible_corpus.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gale_church_finds_a_moved_chapter_boundary(builder):
    """Side b numbers the last verse of chapter 1 as 2:1 (and leaves 1:3 empty), like the RV1909's Numbers 12-13."""
    lengths = [40, 120, 75, 200, 60, 150, 90]
    a = [((1, 1), "x" * lengths[0]), ((1, 2), "x" * lengths[1]), ((1, 3), "x" * lengths[2])] + [
        ((2, v), "x" * n) for v, n in enumerate(lengths[3:], 1)
    ]
    b = [((1, 1), "y" * lengths[0]), ((1, 2), "y" * lengths[1]), ((1, 3), "")] + [
        ((2, v), "y" * n) for v, n in enumerate(lengths[2:], 1)
    ]
    # a 1:3 pairs with b 2:1, and every later verse of a with the next one of b
    assert builder.align_by_length(a, b) == [(0, 0), (1, 1), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    # without the move, the key alignment is kept
    assert builder.align_by_length(a, a) == [(i, i) for i in range(len(a))]


def test_rv1909_text_fixes(builder):
    assert builder.normal_case_first_capital("EN el principio") == "En el principio"
    assert builder.normal_case_first_capital("Y DESPUÉS movió") == "Y después movió"
    assert (
        builder.normal_case_first_capital("Salmo de David. JEHOVÁ es mi pastor")
        == "Salmo de David. Jehová es mi pastor"
    )
    raw = (
        '<w a="1">hay allí</w><transChange type="added">también</transChange><w a="2">bdelio</w>, '
        '<w>sáca</w><transChange type="added">lo</transChange>, <w>Abram</w><transChange>de allí</transChange>.'
    )
    assert builder.clean(builder.space_added_words(raw)) == "hay allí también bdelio, sácalo, Abram de allí."
    a, b = {(3, 0): "A Psalm.", (3, 1): "Yahweh."}, {(3, 1): "Salmo. Jehová."}
    builder.merge_titles(a, b)
    assert a == {(3, 1): "A Psalm. Yahweh."}
