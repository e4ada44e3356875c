#!/usr/bin/env python3
"""Build the verse-aligned KJV -> WEB parallel corpus shipped as demo data.

Source side: King James Version (SWORD module ``engKJV2006eb``, Debian package
``sword-text-kjv``).  Target side: World English Bible (SWORD module
``engWEB2015eb``, Debian package ``sword-text-web``).  Both texts are in the
public domain.

Requirements (Debian/Ubuntu)::

    apt-get install -y diatheke sword-text-kjv sword-text-web

Usage::

    python tools/build_bible_corpus.py            # writes data/kjv_web/
    python tools/build_bible_corpus.py --out DIR

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
  exports repeat stale titles into untitled Psalms.
* Cleaning: footnotes removed (re-inserting the word space they sometimes
  swallowed), OSIS tags removed (``<milestone>`` becomes a space), KJV
  paragraph marks (pilcrow, U+00B6) and stray USFM divine-name markup
  (``\\nd LORD\\+nd*``) removed, the WEB glossary
  that diatheke appends to Revelation 22:21 cut off, whitespace collapsed.
  The trailing ``(module)`` line that diatheke prints is dropped.
* Verses are aligned on the (book, chapter, verse) key; keys missing or empty
  on either side are dropped (the two modules use slightly different
  versifications: KJV vs NRSVA), and so are pairs whose character lengths
  differ by more than a factor 3 (--max-len-ratio), which catches verses
  the versification mapping merged on one side only (e.g. the WEB puts the
  doxology of Romans 16:25-27 into Romans 14:23).
* Split rule: ``h = int(sha1("Book C:V").hexdigest(), 16) % 10000``; test if
  ``h < 320``, valid if ``320 <= h < 640``, else train (about 1000 verses
  each for valid and test).  A verse pair whose exact (source, target) text
  already occurred earlier (in canonical order) goes to the same split as that
  first occurrence, so no pair is shared between splits.
* Output: ``{train,valid,test}.{kjv,web}.gz``, one verse per line in canonical
  order, gzip with mtime=0 so reruns are byte-identical.

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys

KJV_MODULE = "engKJV2006eb"
WEB_MODULE = "engWEB2015eb"

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


def export(diatheke: str, module: str, key: str) -> str:
    proc = subprocess.run(
        [diatheke, "-b", module, "-f", "OSIS", "-o", "f", "-k", key],
        check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc.stdout.decode("utf-8", errors="replace")


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
    return verses


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
    ap.add_argument("--out", default=os.path.join("data", "kjv_web"),
                    help="output directory (default: data/kjv_web)")
    ap.add_argument("--src-module", default=KJV_MODULE,
                    help="SWORD module for the source side (default: %(default)s)")
    ap.add_argument("--tgt-module", default=WEB_MODULE,
                    help="SWORD module for the target side (default: %(default)s)")
    ap.add_argument("--src-ext", default="kjv")
    ap.add_argument("--tgt-ext", default="web")
    ap.add_argument("--diatheke", default="diatheke",
                    help="diatheke executable (default: %(default)s)")
    ap.add_argument("--max-len-ratio", type=float, default=3.0,
                    help="drop pairs whose character lengths differ by more "
                    "than this factor (default: %(default)s)")
    args = ap.parse_args(argv)

    diatheke = shutil.which(args.diatheke)
    if diatheke is None:
        sys.exit("diatheke not found: apt-get install -y diatheke "
                 "sword-text-kjv sword-text-web")

    splits = {name: ([], []) for name in ("train", "valid", "test")}
    first_split: dict = {}  # (src, tgt) -> split of its first occurrence
    n_unpaired = n_empty = n_ratio = n_dupe = 0
    for i, book in enumerate(BOOKS, 1):
        src = read_book(diatheke, args.src_module, book)
        tgt = read_book(diatheke, args.tgt_module, book)
        if not src or not tgt:
            sys.exit(f"no verses for {book!r} in {args.src_module} or "
                     f"{args.tgt_module}: is the module installed?")
        keys = sorted(set(src) | set(tgt))
        kept = 0
        for c, v in keys:
            s, t = src.get((c, v)), tgt.get((c, v))
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
        print(f"[{i:2d}/{len(BOOKS)}] {book}: {len(src)} {args.src_ext}, "
              f"{len(tgt)} {args.tgt_ext}, {kept} pairs", file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    for name, (s, t) in splits.items():
        write_gz(os.path.join(args.out, f"{name}.{args.src_ext}.gz"), s)
        write_gz(os.path.join(args.out, f"{name}.{args.tgt_ext}.gz"), t)
    total = sum(len(s) for s, _ in splits.values())
    print(f"wrote {args.out}: " + ", ".join(
        f"{n} {len(s)}" for n, (s, _) in splits.items())
        + f" (total {total}); dropped {n_unpaired} unpaired keys, "
        f"{n_empty} empty verses, {n_ratio} pairs over the length ratio; {n_dupe} duplicate pairs moved to the "
        f"split of their first occurrence", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
