#!/usr/bin/env python3
"""Build a verse-aligned parallel corpus from two SWORD Bible modules.

One builder for any pair of modules; the pairs shipped in data/ are presets:

* ``kjv_web``: King James Version (``engKJV2006eb``, Debian ``sword-text-kjv``)
  -> World English Bible (``engWEB2015eb``, ``sword-text-web``), English to
  modern English.
* ``en_es``: World English Bible -> Reina-Valera 1909 (``spaRV1909eb``,
  ``sword-text-sparv``), English to Spanish.

Every module used is in the public domain (each module's .conf says
``DistributionLicense=Public Domain``; the data READMEs record it).

Requirements (Debian/Ubuntu)::

    apt-get install -y diatheke sword-text-kjv sword-text-web sword-text-sparv

Usage::

    python data/build_bible_corpus.py                  # writes data/kjv_web/
    python data/build_bible_corpus.py --pair en_es     # writes data/en_es/
    python data/build_bible_corpus.py --src-module M1 --tgt-module M2 \
        --src-ext xx --tgt-ext yy --out DIR           # any other pair

How it works
------------
* Every one of the 66 protocanonical books is exported separately from each
  module with ``diatheke -f OSIS -o f -k BOOK`` (a whole-Bible range can stop
  early, so we go book by book).  OSIS output is used rather than ``plain``
  because the plain renderer repeats each Psalm's title before every verse on
  its own line, and because with footnotes filtered out by diatheke some
  words in the WEB lose the space between them (``Godcreated``).  With
  footnotes switched on they come back as ``<note>`` elements that we remove
  ourselves, restoring the word boundary.
* Each output record is ``[pre-verse text]Book C:V: text``; wrapped text on
  following lines is joined.  Pre-verse text (only the canonical Psalm
  titles, e.g. "A Psalm of David.") is kept once per chapter under verse 0;
  it is read from a one-verse query of "Psalms C:1", because whole-book
  exports repeat stale titles into untitled Psalms.  A module that has no
  such titles in a book where the other module has them carries its titles
  inside verse 1 (the Reina-Valera does), so there the other side's title is
  prepended to its verse 1 instead of being dropped as unpaired.
* Cleaning: footnotes removed (re-inserting the word space they sometimes
  swallowed), OSIS tags removed (``<milestone>`` becomes a space), KJV
  paragraph marks (pilcrow, U+00B6) and stray USFM divine-name markup
  (``\\nd LORD\\+nd*``) removed, the WEB glossary
  that diatheke appends to Revelation 22:21 cut off, whitespace collapsed.
  The trailing ``(module)`` line that diatheke prints is dropped.
  Module-specific fixes (MODULE_FIXES): the Reina-Valera's drop capital
  (the first word of each chapter in capitals, "EN el principio") is
  written in normal case, its translators' additions (``<transChange>``,
  glued to their neighbours in the module) get their spaces back (the module
  is read from diatheke's HTML output, which keeps those elements), and
  Psalm 119's acrostic letters ("ALEPH.") are removed, as the WEB and KJV
  keep them out of the verse text.
* Verses are aligned on the (book, chapter, verse) key; keys missing or empty
  on either side are dropped (the two modules use slightly different
  versifications: KJV vs NRSVA).  With a module of REALIGN_MODULES (the
  Reina-Valera, which moves some chapter boundaries while keeping KJV-style
  keys) each book is aligned by verse length instead (Gale & Church), and
  only its 1-1 matches are kept; the chapters of UNALIGNABLE are left out.
  Pairs whose character lengths
  differ by more than a factor 3 (--max-len-ratio), which catches verses
  the versification mapping merged on one side only (e.g. the WEB puts the
  doxology of Romans 16:25-27 into Romans 14:23).
* Split rule: ``h = int(sha1("Book C:V").hexdigest(), 16) % 10000``; test if
  ``h < 320``, valid if ``320 <= h < 640``, else train (about 1000 verses
  each for valid and test).  A verse pair whose exact (source, target) text
  already occurred earlier (in canonical order) goes to the same split as that
  first occurrence, so no pair is shared between splits.
* Output: ``{train,valid,test}.{SRC,TGT}.gz`` (e.g. ``.kjv``/``.web``), one
  verse per line in canonical order, gzip with mtime=0 so reruns are
  byte-identical.  Every pair uses the same split rule on the same verse
  keys, so the test sets of different pairs are (up to dropped verses) the
  same verses.

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import math
import os
import re
import shutil
import subprocess
import sys

KJV_MODULE = "engKJV2006eb"
WEB_MODULE = "engWEB2015eb"
RV1909_MODULE = "spaRV1909eb"

# name -> ((source ext, source module), (target ext, target module))
PRESETS = {
    "kjv_web": (("kjv", KJV_MODULE), ("web", WEB_MODULE)),
    "en_es": (("en", WEB_MODULE), ("es", RV1909_MODULE)),
}
DEBIAN_PACKAGES = {KJV_MODULE: "sword-text-kjv", WEB_MODULE: "sword-text-web",
                   RV1909_MODULE: "sword-text-sparv"}

# diatheke's English book names, canonical order (protocanon only: the KJV
# module has no deuterocanon).
BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua",
    "Judges", "Ruth", "I Samuel", "II Samuel", "I Kings", "II Kings",
    "I Chronicles", "II Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
    "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
    "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "I Corinthians",
    "II Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "I Thessalonians", "II Thessalonians", "I Timothy", "II Timothy", "Titus",
    "Philemon", "Hebrews", "James", "I Peter", "II Peter", "I John",
    "II John", "III John", "Jude", "Revelation of John",
]

SPLIT_MODULUS = 10000
TEST_BUCKETS = 320   # h < 320          -> test
VALID_BUCKETS = 320  # 320 <= h < 640   -> valid

# Appendices that diatheke glues onto the last verse of a book.
APPENDIX_MARKERS = [
    "The following words used in the World English Bible",
]

_NOTE_RE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_NOTE_MARK = "\x00"
# A removed note that sat between two words with no space left them glued
# together ("God<note/><w>created</w>", "born<note/>Son"): put a space back
# when the note follows a non-space and precedes a word or opening quote.
_NOTE_GAP_RE = re.compile(r"(?<=\S)" + _NOTE_MARK + r"+(?=[\w\u201c\u2018(])")
_TAG_RE = re.compile(r"<[^>]*>")
# USFM character markup left in the KJV module's text (e.g. r"\nd LORD\+nd*").
_USFM_RE = re.compile(r"\\\+?[a-z]+[0-9]?\*?")
_WS_RE = re.compile(r"\s+")


def clean(text: str) -> str:
    """Turn one verse of diatheke OSIS output into plain text."""
    text = _NOTE_RE.sub(_NOTE_MARK, text)
    text = text.replace("<milestone", " <milestone")
    text = _TAG_RE.sub("", text)
    text = _NOTE_GAP_RE.sub(" ", text).replace(_NOTE_MARK, "")
    text = _USFM_RE.sub(" ", text)
    for marker in APPENDIX_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    text = (text.replace("&lt;", "<").replace("&gt;", ">")
            .replace("&quot;", '"').replace("&amp;", "&"))
    text = text.replace("\u00b6", " ")  # pilcrow paragraph marks (KJV)
    return _WS_RE.sub(" ", text).strip()


# Psalm 119's acrostic letters, which some modules put at the start of the
# verse that opens each stanza ("ALEPH. Bienaventurados ...").
_ACROSTIC_RE = re.compile(
    r"^(ALEPH|BETH|GIMEL|DALETH|HE|VAU|ZAIN|CHETH|HETH|TETH|JOD|YODH|CAPH|"
    r"KAPH|LAMED|MEM|NUN|SAMECH|AIN|PE|TZADDI|COPH|KOPH|RESH|SIN|SHIN|TAU)"
    r"\.?(\s+|$)")
_WORD_RE = re.compile(r"[^\W\d_]+")
_NAMES = {"JEHOVÁ", "DIOS", "JAH", "JESÚS", "JESUS", "SEÑOR", "ISRAEL"}


def normal_case_first_capital(text: str) -> str:
    """'¡OH Jehová' -> '¡Oh Jehová', 'Y DESPUÉS movió' -> 'Y después movió':
    the first all-capitals word (2+ letters), lower case after a one-letter
    opening word."""
    for m in _WORD_RE.finditer(text):
        w = m.group()
        if len(w) >= 2 and w.isupper():
            before = _WORD_RE.findall(text[:m.start()])
            lower = len(before) == 1 and len(before[0]) == 1 and w not in _NAMES
            w = w.lower() if lower else w.capitalize()
            return text[:m.start()] + w + text[m.end():]
    return text


# Chapters a module numbers so differently that neither keys nor lengths
# align them: the Reina-Valera's Job 39-40 (the Hebrew division moves five
# verses across each boundary, and Job's verses are too even in length for
# the alignment below to find the shift).  They are left out.
UNALIGNABLE = {RV1909_MODULE: {("Job", 39), ("Job", 40)}}


def _dropcap(verses: dict, book: str) -> None:
    for (c, v), text in verses.items():
        if v == 1:
            verses[(c, v)] = normal_case_first_capital(text)


# module -> fixes applied to each book's verses after cleaning
MODULE_FIXES = {RV1909_MODULE: (_dropcap,)}


def fix_verses(module: str, book: str, verses: dict) -> dict:
    if book == "Psalms":
        for key in [k for k in verses if k[0] == 119]:
            verses[key] = _ACROSTIC_RE.sub("", verses[key])
    for fix in MODULE_FIXES.get(module, ()):
        fix(verses, book)
    return verses


def merge_titles(a: dict, b: dict) -> None:
    """Where only `a` has chapter titles (verse 0) in a book, `b` carries them
    inside verse 1: prepend each of a's titles to a's verse 1 to match."""
    if any(v == 0 for _, v in b):
        return
    for c, _ in [k for k in a if k[1] == 0]:
        title = a.pop((c, 0))
        if title and (c, 1) in a:
            a[(c, 1)] = f"{title} {a[(c, 1)]}"


# Words the translators added (<transChange>) sit in the Reina-Valera's text
# with no space around them ("hay allí</w>también<w>bdelio"); diatheke's
# OSIS output drops the element and glues the words, its HTML output keeps
# it, so that module is read as HTML and the space put back, except before
# an enclitic pronoun, which belongs to the verb ("sáca" + "lo").
EXPORT_FORMAT = {RV1909_MODULE: "HTML"}
_TRANS_CHANGE_RE = re.compile(r"<transChange\b[^>]*>(.*?)</transChange>", re.S)
_ENCLITIC_RE = re.compile(r"(?:me|te|se|nos|os|le|les|lo|los|la|las)+")


def space_added_words(raw: str) -> str:
    """Put a space between each <transChange> and a word it is glued to."""
    def repl(m):
        before = _TAG_RE.sub("", raw[max(0, m.start() - 200):m.start()])[-1:]
        after = _TAG_RE.sub("", raw[m.end():m.end() + 200])[:1]
        text = m.group(1)
        glued_left = before.isalnum() or before in ",;:.!?)\u00bb\u201d"
        left = " " if glued_left and not _ENCLITIC_RE.fullmatch(text) else ""
        right = " " if after.isalnum() or after in "\u00a1\u00bf(\u00ab\u201c" else ""
        return left + text + right
    return _TRANS_CHANGE_RE.sub(repl, raw)


def export(diatheke: str, module: str, key: str) -> str:
    fmt = EXPORT_FORMAT.get(module, "OSIS")
    proc = subprocess.run(
        [diatheke, "-b", module, "-f", fmt, "-o", "f", "-k", key],
        check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    raw = proc.stdout.decode("utf-8", errors="replace")
    if fmt == "HTML":
        raw = space_added_words(raw.replace("</body></html>", ""))
    return raw


def parse_records(raw: str, book: str, module: str) -> list:
    """Split diatheke output into (chapter, verse, pre-verse, text) records."""
    raw = raw.replace("\r\n", "\n")
    # Drop the trailing "(module)" line.
    raw = re.sub(r"\n?\(" + re.escape(module) + r"\)\s*$", "", raw)
    header = re.compile(
        r"(?m)^(?P<pre>.*?)" + re.escape(book) + r" (?P<c>\d+):(?P<v>\d+): ")
    matches = list(header.finditer(raw))
    records = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(raw)
        records.append((int(m.group("c")), int(m.group("v")),
                        clean(m.group("pre")), clean(raw[m.end():end])))
    return records


def read_book(diatheke: str, module: str, book: str) -> dict:
    """Map (chapter, verse) -> cleaned text for one book of one module.

    Pre-verse text (Psalm titles) is stored under verse 0.  In a whole-book
    export diatheke repeats the last pre-verse text before every following
    verse, even into untitled Psalms, so a chapter's title is taken from a
    separate one-verse query of "Book C:1", which shows it correctly.
    """
    verses: dict = {}
    for c, v, pre, text in parse_records(export(diatheke, module, book),
                                         book, module):
        verses[(c, v)] = text
        if v == 1 and pre:
            for c1, v1, pre1, _ in parse_records(
                    export(diatheke, module, f"{book} {c}:1"), book, module):
                if (c1, v1) == (c, 1) and pre1:
                    verses[(c, 0)] = pre1
    return fix_verses(module, book, verses)


# Modules whose chapter boundaries differ from the other side's in places
# although the keys follow the same scheme: the Reina-Valera follows the
# Hebrew/Spanish chapter divisions (Numbers 12:16 is its 13:1, so its whole
# chapter 13 sits one key later; likewise Numbers 30, I Samuel 24, Job 39-41,
# Hosea 12, Jonah 2, ...).  Pairs with such a module are aligned by verse
# length (Gale & Church 1993) rather than by key.
REALIGN_MODULES = {RV1909_MODULE}
_GC_VARIANCE = 6.8  # Gale & Church's variance of target chars per source char
# -log prior of each alignment bead: 1-1, 1-0/0-1, 2-1/1-2
_BEAD_COST = {(1, 1): -math.log(0.97), (1, 0): -math.log(0.0025),
              (0, 1): -math.log(0.0025), (2, 1): -math.log(0.0125),
              (1, 2): -math.log(0.0125)}
_OMITTED_COST = -math.log(0.1)  # skipping a verse whose key is empty on the other side
_SAME_KEY_BONUS = 0.3  # ties go to the key alignment
_BAND = 60  # how far (in verses) the alignment may leave the diagonal


def _length_cost(l1: int, l2: int, ratio: float) -> float:
    delta = (l2 - l1 * ratio) / math.sqrt(max(l1, 1) * _GC_VARIANCE)
    return -math.log(max(math.erfc(abs(delta) / math.sqrt(2)), 1e-300))


def align_by_length(a: list, b: list) -> list:
    """Gale-Church alignment of two verse lists [(key, text)], in order.

    An empty verse is skipped at no cost (it marks where a chapter boundary
    moved); a 1-1 bead of two equal keys gets a small bonus, so the key
    alignment wins wherever lengths do not speak against it.  Returns the 1-1
    beads of two non-empty verses as (i, j) index pairs; verses in 1-0, 0-1,
    2-1 and 1-2 beads are left out (an unmatched or merged verse is no clean
    pair).
    """
    n, m = len(a), len(b)
    la, lb = [len(t) for _, t in a], [len(t) for _, t in b]
    other_a, other_b = dict(a), dict(b)
    ratio = sum(lb) / max(sum(la), 1)
    inf = float("inf")
    cost = {(0, 0): 0.0}
    back = {}
    for i in range(n + 1):
        centre = i * m // max(n, 1)
        for j in range(max(0, centre - _BAND), min(m, centre + _BAND) + 1):
            if i == 0 and j == 0:
                continue
            best, arg = inf, None
            for (di, dj), prior in _BEAD_COST.items():
                prev = cost.get((i - di, j - dj))
                if prev is None:
                    continue
                ta, tb = la[i - di:i], lb[j - dj:j]
                if not dj and not ta[0] or not di and not tb[0]:
                    c = prev  # skipping an empty verse is free
                elif 0 in ta or 0 in tb:
                    continue  # an empty verse pairs with nothing
                elif not dj and not other_b.get(a[i - 1][0]) or not di and not other_a.get(b[j - 1][0]):
                    c = prev + _OMITTED_COST  # a verse the other side omits (Acts 8:37)
                else:
                    c = prev + prior
                    if di and dj:
                        c += _length_cost(sum(ta), sum(tb), ratio)
                        if (di, dj) == (1, 1) and a[i - 1][0] == b[j - 1][0]:
                            c -= _SAME_KEY_BONUS
                if c < best:
                    best, arg = c, (di, dj)
            if arg is not None:
                cost[(i, j)], back[(i, j)] = best, arg
    if (n, m) not in cost:
        raise ValueError("alignment left the band; raise _BAND")
    beads, i, j = [], n, m
    while i or j:
        di, dj = back[(i, j)]
        i, j = i - di, j - dj
        if (di, dj) == (1, 1) and la[i] and lb[j]:
            beads.append((i, j))
    return beads[::-1]


def pair_verses(src: dict, tgt: dict, realign: bool):
    """(key, source text, target text) in canonical order; a side is None
    where it has no verse for the key (or, realigned, no 1-1 partner) and ""
    where its verse is empty.  Realigned pairs carry the source's key."""
    if not realign:
        for key in sorted(set(src) | set(tgt)):
            yield key, src.get(key), tgt.get(key)
        return
    for key in sorted(set(src) | set(tgt)):  # empty verses: nothing to align
        if src.get(key) == "" or tgt.get(key) == "":
            yield key, src.get(key, ""), tgt.get(key, "")
    a, b = sorted(src.items()), sorted(tgt.items())
    beads = align_by_length(a, b)
    paired_a = {i for i, _ in beads}
    for i, (key, text) in enumerate(a):
        if text and i not in paired_a:
            yield key, text, None
    for i, j in beads:
        yield a[i][0], a[i][1], b[j][1]


def split_of(key: str) -> str:
    h = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % SPLIT_MODULUS
    if h < TEST_BUCKETS:
        return "test"
    if h < TEST_BUCKETS + VALID_BUCKETS:
        return "valid"
    return "train"


def write_gz(path: str, lines: list) -> None:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0,
                       compresslevel=9) as gz:
        gz.write(data)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=sorted(PRESETS), default="kjv_web",
                    help="preset: modules and file extensions of a shipped "
                    "pair (default: %(default)s)")
    ap.add_argument("--out", help="output directory (default: PAIR beside this script, data/PAIR)")
    ap.add_argument("--src-module",
                    help="SWORD module for the source side (default: the preset's)")
    ap.add_argument("--tgt-module",
                    help="SWORD module for the target side (default: the preset's)")
    ap.add_argument("--src-ext", help="source file extension (default: the preset's)")
    ap.add_argument("--tgt-ext", help="target file extension (default: the preset's)")
    ap.add_argument("--diatheke", default="diatheke",
                    help="diatheke executable (default: %(default)s)")
    ap.add_argument("--max-len-ratio", type=float, default=3.0,
                    help="drop pairs whose character lengths differ by more "
                    "than this factor (default: %(default)s)")
    args = ap.parse_args(argv)
    (src_ext, src_module), (tgt_ext, tgt_module) = PRESETS[args.pair]
    src_ext, tgt_ext = args.src_ext or src_ext, args.tgt_ext or tgt_ext
    src_module = args.src_module or src_module
    tgt_module = args.tgt_module or tgt_module
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), args.pair)

    diatheke = shutil.which(args.diatheke)
    if diatheke is None:
        packages = " ".join(DEBIAN_PACKAGES.get(m, m) for m in (src_module, tgt_module))
        sys.exit(f"diatheke not found: apt-get install -y diatheke {packages}")

    splits = {name: ([], []) for name in ("train", "valid", "test")}
    first_split: dict = {}  # (src, tgt) -> split of its first occurrence
    n_unpaired = n_empty = n_ratio = n_dupe = 0
    for i, book in enumerate(BOOKS, 1):
        src = read_book(diatheke, src_module, book)
        tgt = read_book(diatheke, tgt_module, book)
        if not src or not tgt:
            sys.exit(f"no verses for {book!r} in {src_module} or "
                     f"{tgt_module}: is the module installed?")
        if any(v == 0 for _, v in src) or any(v == 0 for _, v in tgt):
            merge_titles(src, tgt)
            merge_titles(tgt, src)
        for module in (src_module, tgt_module):
            for side in (src, tgt):
                for key in [k for k in side if (book, k[0]) in UNALIGNABLE.get(module, ())]:
                    del side[key]
        realign = bool({src_module, tgt_module} & REALIGN_MODULES)
        kept = 0
        for (c, v), s, t in pair_verses(src, tgt, realign):
            if s is None or t is None:
                n_unpaired += 1
                continue
            if not s or not t:
                n_empty += 1
                continue
            if max(len(s), len(t)) > args.max_len_ratio * min(len(s), len(t)):
                n_ratio += 1
                continue
            pair = (s, t)
            split = first_split.setdefault(pair, split_of(f"{book} {c}:{v}"))
            if split != split_of(f"{book} {c}:{v}"):
                n_dupe += 1
            splits[split][0].append(s)
            splits[split][1].append(t)
            kept += 1
        print(f"[{i:2d}/{len(BOOKS)}] {book}: {len(src)} {src_ext}, "
              f"{len(tgt)} {tgt_ext}, {kept} pairs", file=sys.stderr)

    os.makedirs(out, exist_ok=True)
    for name, (s, t) in splits.items():
        write_gz(os.path.join(out, f"{name}.{src_ext}.gz"), s)
        write_gz(os.path.join(out, f"{name}.{tgt_ext}.gz"), t)
    total = sum(len(s) for s, _ in splits.values())
    print(f"wrote {out}: " + ", ".join(
        f"{n} {len(s)}" for n, (s, _) in splits.items())
        + f" (total {total}); dropped {n_unpaired} unpaired keys, "
        f"{n_empty} empty verses, {n_ratio} pairs over the length ratio; {n_dupe} duplicate pairs moved to the "
        f"split of their first occurrence", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
