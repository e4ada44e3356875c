"""Data layer: tokenizer, indexed dataset, collation, batching, resumable iteration, preprocess CLI."""

import gzip
import hashlib
import json

import numpy as np
import pytest
import torch

from megabranch.data import (
    BOS,
    EOS,
    PAD,
    UNK,
    EpochBatchIterator,
    IndexedDataset,
    IndexedDatasetBuilder,
    LanguagePairDataset,
    Tokenizer,
    best_dtype,
    load_split,
    make_batches,
    pair_batches,
    train_sentencepiece,
)
from megabranch.data.preprocess import main as preprocess_main
from megabranch.errors import UserError
from tests.helpers.corpus import sentences, write_lines

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    corpus = write_lines(d / "corpus.txt", sentences(300, 0))
    return train_sentencepiece([corpus], d / "m", vocab_size=80), corpus


# ---------------------------------------------------------------- tokenizer


def test_spm_round_trip_and_specials(spm_model, tmp_path):
    model, corpus = spm_model
    tok = Tokenizer(model)
    assert (tok.pad, tok.unk, tok.bos, tok.eos) == (PAD, UNK, BOS, EOS) == (0, 1, 2, 3)
    assert tok.vocab_size == 80
    assert tok.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    for s in sentences(20, 1):
        ids = tok.encode(s)
        assert ids and min(ids) > EOS and tok.decode(ids) == s
        # decode stops at eos and drops pad/bos, whatever the container
        assert tok.decode([BOS] + ids + [EOS] + ids + [PAD]) == s
        assert tok.decode(torch.tensor(ids + [EOS, PAD, PAD])) == s
    # deterministic: same data and arguments -> byte-identical model (no path embedded)
    again = train_sentencepiece([corpus], tmp_path / "other" / "x", vocab_size=80)
    assert Tokenizer(again).sha256 == tok.sha256


def test_spm_errors(spm_model, tmp_path):
    _, corpus = spm_model
    with pytest.raises(UserError, match=r"vocab_size 5000 is too large.*at most \d+"):
        train_sentencepiece([corpus], tmp_path / "big", vocab_size=5000)
    with pytest.raises(UserError, match="nope.txt"):
        train_sentencepiece([tmp_path / "nope.txt"], tmp_path / "m", vocab_size=50)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="junk.model"):
        Tokenizer(tmp_path / "junk.model")


# ---------------------------------------------------------------- indexed dataset


def build(prefix, items, dtype):
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for it in items:
            b.add_item(it)
    return IndexedDataset(prefix)


@pytest.mark.parametrize("vocab, itemsize", [(8000, 2), (70000, 4)])
def test_indexed_round_trip(tmp_path, vocab, itemsize):
    rng = np.random.default_rng(0)
    items = [rng.integers(0, vocab, size=rng.integers(0, 30)) for _ in range(50)] + [[]]
    dtype = best_dtype(vocab)
    assert dtype.itemsize == itemsize
    ds = build(tmp_path / "d", items, dtype)
    assert len(ds) == 51 and ds.sizes.tolist() == [len(x) for x in items]
    for i, it in enumerate(items):
        assert ds[i].dtype == np.int64 and ds[i].tolist() == list(it)
    assert (tmp_path / "d.bin").stat().st_size == sum(map(len, items)) * itemsize
    assert not list(tmp_path.glob("*.tmp"))


def test_a_decreasing_offset_is_found_in_any_chunk(tmp_path, monkeypatch):
    import megabranch.data.indexed as indexed

    monkeypatch.setattr(indexed, "_CHUNK_ITEMS", 3)  # chunks [0..3], [3..6], [6..9], [9, 10]
    build(tmp_path / "d", [[5, 6]] * 10, np.uint16)
    good = (tmp_path / "d.idx").read_bytes()
    assert IndexedDataset(tmp_path / "d").sizes.tolist() == [2] * 10
    for i in (3, 4, 6, 9):  # at and between chunk ends
        raw = bytearray(good)
        raw[indexed._HEADER.size + 8 * i : indexed._HEADER.size + 8 * (i + 1)] = np.int64(1).tobytes()
        (tmp_path / "d.idx").write_bytes(bytes(raw))
        with pytest.raises(UserError, match="offsets are not increasing"):
            IndexedDataset(tmp_path / "d")


def test_index_bytes_keep_the_format_old_directories_have(tmp_path):
    """The builder streams the offsets now; the bytes are still header + n + 1 int64 offsets."""
    import struct

    with IndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
        b.add_item([5, 6, 7])
        b.add_items(np.array([9, 8]), [0, 2])
    assert (tmp_path / "d.idx").read_bytes() == (
        b"MBIDX\x00\x00\x00" + struct.pack("<IB3xq", 1, 1, 3) + np.array([0, 3, 3, 5], "<i8").tobytes()
    )
    assert (tmp_path / "d.bin").read_bytes() == np.array([5, 6, 7, 9, 8], "<u2").tobytes() and b.max_id == 9
    ds = IndexedDataset(tmp_path / "d")
    assert ds.sizes.tolist() == [3, 0, 2] and ds.max_id() == 9 and ds[2].tolist() == [9, 8]


def test_indexed_corrupt_files(tmp_path):
    build(tmp_path / "d", [[5, 6, 7], [8, 9]], np.uint16)
    raw_bin, raw_idx = (tmp_path / "d.bin").read_bytes(), (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.bin").write_bytes(raw_bin[:-2])
    with pytest.raises(UserError, match=r"d\.bin.*truncated"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "d.bin").write_bytes(raw_bin)
    (tmp_path / "d.idx").write_bytes(raw_idx[:-8])
    with pytest.raises(UserError, match=r"d\.idx"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match=r"d\.idx"):
        IndexedDataset(tmp_path / "d")
    with pytest.raises(UserError, match="megabranch-preprocess"):
        IndexedDataset(tmp_path / "missing")


# ---------------------------------------------------------------- pairs and collation


def pair_dataset(tmp_path, n=200, seed=0):
    rng = np.random.default_rng(seed)
    src = build(tmp_path / "s", [rng.integers(4, 100, size=rng.integers(1, 40)) for _ in range(n)], np.uint16)
    tgt = build(tmp_path / "t", [rng.integers(4, 100, size=rng.integers(1, 40)) for _ in range(n)], np.uint16)
    return LanguagePairDataset(src, tgt)


def test_collate_shapes_and_shift(tmp_path):
    ds = pair_dataset(tmp_path)
    idx = [3, 17, 42, 5]
    b = ds.collate(idx)
    B = len(idx)
    S = max(len(ds.src[i]) for i in idx) + 1
    T = max(len(ds.tgt[i]) for i in idx) + 1
    assert b["src_tokens"].shape == (B, S) and b["target"].shape == b["prev_output_tokens"].shape == (B, T)
    assert all(t.dtype == torch.long for k, t in b.items() if isinstance(t, torch.Tensor))
    assert b["id"].tolist() == idx
    assert batches_equal(b, ds.collater([ds[i] for i in idx]))
    assert ds.target_tokens(5).tolist() == ds[5]["target"][:-1].tolist() == ds.tgt[5].tolist()
    assert ds.source_tokens(5).tolist() == ds[5]["source"][:-1].tolist()
    assert b["src_lengths"].tolist() == [len(ds.src[i]) + 1 for i in idx]
    nonpad = b["target"] != PAD
    assert b["ntokens"] == int(nonpad.sum())
    assert (b["prev_output_tokens"][:, 0] == BOS).all()
    shift_ok = b["prev_output_tokens"][:, 1:] == b["target"][:, :-1]
    assert shift_ok[nonpad[:, 1:]].all()
    assert ((b["prev_output_tokens"] != PAD) == nonpad).all()  # same lengths, right padded
    for row, i in enumerate(idx):
        n = len(ds.tgt[i])
        assert b["target"][row, :n].tolist() == ds.tgt[i].tolist() and b["target"][row, n] == EOS
        m = len(ds.src[i])
        assert b["src_tokens"][row, : m + 1].tolist() == ds.src[i].tolist() + [EOS]
        assert (b["src_tokens"][row, m + 1 :] == PAD).all()


# ---------------------------------------------------------------- batching


def test_make_batches_budget_and_coverage():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 60, 1000), rng.integers(1, 60, 1000)
    for kw in ({}, {"max_sentences": 7}, {"required_multiple": 8}, {"shuffle": False}):
        batches = make_batches(src, tgt, max_tokens=400, seed=3, epoch=1, **kw)
        allidx = np.concatenate(batches)
        assert sorted(allidx.tolist()) == list(range(1000))
        for b in batches:
            assert len(b) * max(src[b].max(), tgt[b].max()) <= 400
            if "max_sentences" in kw:
                assert len(b) <= 7
        if "required_multiple" in kw:  # only batches too long for 8 rows (and the tail) escape
            assert sum(len(b) >= 8 and len(b) % 8 != 0 for b in batches) <= 1
            assert sum(len(b) % 8 == 0 for b in batches) > len(batches) // 2


def test_make_batches_determinism_and_errors():
    rng = np.random.default_rng(1)
    src, tgt = rng.integers(1, 30, 500), rng.integers(1, 30, 500)
    a = make_batches(src, tgt, 200, seed=1, epoch=1)
    b = make_batches(src, tgt, 200, seed=1, epoch=1)
    c = make_batches(src, tgt, 200, seed=1, epoch=2)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    v1 = make_batches(src, tgt, 200, seed=1, epoch=1, shuffle=False)
    v2 = make_batches(src, tgt, 200, seed=9, epoch=5, shuffle=False)
    assert [x.tolist() for x in v1] == [x.tolist() for x in v2]
    with pytest.raises(UserError, match="raise max_tokens"):
        make_batches([5, 300], [5, 5], 256)


def test_pair_batches_by_the_longer_side_with_long_pairs_alone():
    """Hand-made sizes: sorted by each pair's longer side (ties in index order), cut when one more pair would
    pass 12 padded tokens; the 13-token pair is a batch of its own."""

    class Sizes:
        src_sizes, tgt_sizes = np.array([2, 5, 1, 13, 3, 4]), np.array([3, 1, 6, 2, 3, 4])

        def __len__(self):
            return 6

        def collate(self, idx):
            return list(idx)

    # longer sides: 3 5 6 13 3 4 -> order 0 4 5 1 2 3
    assert pair_batches(Sizes(), 12) == [[0, 4, 5], [1, 2], [3]]
    assert pair_batches(Sizes(), 12, n=3) == [[0, 1], [2]]
    assert pair_batches(Sizes(), 12, shards=2, shard=1) == [[1, 2]]
    with pytest.raises(UserError, match="no sentence pairs"):
        pair_batches(Sizes(), 12, n=0)


def test_validation_batches_are_the_unshuffled_epoch_batches(tmp_path):
    """The validation loss reads the batches it read before the evaluation batcher had one home: the epoch
    iterator's unshuffled batches (any seed), batch i on data-parallel replica i % shards."""
    ds = pair_dataset(tmp_path)
    before = list(EpochBatchIterator(ds, 300, seed=5, shuffle=False).next_epoch_itr())
    assert len(before) > 5
    for shards in (1, 2, 3):
        for shard in range(shards):
            now = pair_batches(ds, 300, shards=shards, shard=shard)
            assert len(now) == len(before[shard::shards])
            assert all(batches_equal(a, b) for a, b in zip(now, before[shard::shards]))


def _greedy_reference(
    src_sizes, tgt_sizes, max_tokens, max_sentences=None, seed=1, epoch=1, shuffle=True, required_multiple=1
):
    """fairseq-style greedy batching one example at a time: what make_batches computed until it walked runs of
    equal length instead (kept here as the reference: checkpoints' data positions depend on these batches)."""
    lengths = np.maximum(np.asarray(src_sizes, dtype=np.int64), np.asarray(tgt_sizes, dtype=np.int64))
    rng = np.random.default_rng([seed, epoch])
    if shuffle:
        perm = rng.permutation(len(lengths))
        order = perm[np.argsort(lengths[perm], kind="stable")]
    else:
        order = np.argsort(lengths, kind="stable")
    cap = max_sentences or len(order) or 1
    batches, start, end = [], 0, 0
    while end < len(order):
        bsz = end - start
        if bsz > 0 and (bsz + 1 > cap or (bsz + 1) * lengths[order[end]] > max_tokens):
            keep = max(required_multiple * (bsz // required_multiple), bsz % required_multiple)
            batches.append(order[start : start + keep])
            start += keep
            continue
        end += 1
    if start < len(order):
        batches.append(order[start:])
    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


def test_make_batches_are_the_greedy_batches_one_example_at_a_time(monkeypatch):
    import megabranch.data.batching as batching

    monkeypatch.setattr(batching, "_SORT_CHUNK", 37)  # the chunked counting sort crosses many chunk ends
    rng = np.random.default_rng(0)
    for trial in range(150):
        n, hi = int(rng.integers(0, 400)), int(rng.integers(1, 80))
        src, tgt = rng.integers(0 if trial % 7 == 0 else 1, hi + 1, n), rng.integers(1, hi + 1, n)
        max_tokens, max_sentences = int(rng.integers(hi, 600)), [None, int(rng.integers(1, 20))][trial % 2]
        for shuffle in (True, False):
            for multiple in (1, 3, 8):
                args = (src, tgt, max_tokens, max_sentences, trial, 2, shuffle, multiple)
                want, got = _greedy_reference(*args), make_batches(*args)
                assert len(got) == len(want) and all(g.dtype == np.int64 for g in got)
                assert all(np.array_equal(g, w) for g, w in zip(got, want)), args


def test_count_lines_counts_what_iter_lines_yields(tmp_path):
    from megabranch.data.tokenizer import count_lines, iter_line_chunks, iter_lines

    for k, data in enumerate([b"", b"a", b"a\n", b"a\nb", b"\n\n", b"a\r\nb\r\n", b"\xef\xbb\xbfx\ny\rz"]):
        for path in (tmp_path / f"f{k}", tmp_path / f"f{k}.gz"):
            path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
            lines = list(iter_lines(path))
            assert count_lines(path) == len(lines) and [x for c in iter_line_chunks(path, 2) for x in c] == lines
    assert list(iter_lines(tmp_path / "f5")) == [b"a", b"b"] and list(iter_lines(tmp_path / "f6")) == [b"x", b"y\rz"]


def batches_equal(x, y):
    return x.keys() == y.keys() and all(
        torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x
    )


def test_epoch_iterator_resume_mid_epoch(tmp_path):
    ds = pair_dataset(tmp_path)
    ref = EpochBatchIterator(ds, max_tokens=300, seed=7)
    epoch1 = list(ref.next_epoch_itr())
    itr = ref.next_epoch_itr()
    epoch2 = list(itr)
    assert len(epoch1) == len(ref) > 5 and ref.epoch == 2 and ref.end_of_epoch()
    assert [b["id"].tolist() for b in epoch1] != [b["id"].tolist() for b in epoch2]

    run = EpochBatchIterator(ds, max_tokens=300, seed=7)
    list(run.next_epoch_itr())
    it = run.next_epoch_itr()
    for _ in range(3):
        next(it)
    state = run.state_dict()
    assert state == {"epoch": 2, "iterations_in_epoch": 3}

    resumed = EpochBatchIterator(ds, max_tokens=300, seed=7)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and not resumed.end_of_epoch()
    rest = list(resumed.next_epoch_itr())
    assert len(rest) == len(epoch2) - 3
    assert all(batches_equal(a, b) for a, b in zip(rest, epoch2[3:]))
    # resuming from an epoch-end checkpoint starts the next epoch, as the reference run would
    after = EpochBatchIterator(ds, max_tokens=300, seed=7)
    after.load_state_dict({"epoch": 1, "iterations_in_epoch": len(epoch1)})
    assert after.end_of_epoch()
    first = next(after.next_epoch_itr())
    assert after.epoch == 2 and batches_equal(first, epoch2[0])
    with pytest.raises(UserError, match="changed"):
        after.load_state_dict({"epoch": 2, "iterations_in_epoch": 10_000})


def test_sharding_disjoint_equal(tmp_path):
    ds = pair_dataset(tmp_path, n=300)
    full = EpochBatchIterator(ds, max_tokens=200, seed=2).batches_for_epoch(1)
    shards = [EpochBatchIterator(ds, max_tokens=200, seed=2, num_shards=3, shard_id=r) for r in range(3)]
    ids = [[b["id"].tolist() for b in s.next_epoch_itr()] for s in shards]
    assert len({len(x) for x in ids}) == 1 and len(ids[0]) == len(full) // 3
    flat = [sorted(sum(x, [])) for x in ids]
    seen = sum(flat, [])
    assert len(seen) == len(set(seen))  # disjoint
    kept = full[: len(full) // 3 * 3]
    assert sorted(seen) == sorted(np.concatenate(kept).tolist())


# ---------------------------------------------------------------- preprocess CLI


def make_corpus(d, n_train=300):
    """train with one empty, one over-long and one invalid UTF-8 line; valid gzipped."""
    src, tgt = sentences(n_train, 10), sentences(n_train, 11)
    src[5] = "   "
    src[9] = " ".join(["heaven"] * 300)
    enc_s = [s.encode() for s in src]
    enc_s[20] = b"in the \xff\xfe beginning"
    (d / "train.kjv").write_bytes(b"\n".join(enc_s) + b"\n")
    write_lines(d / "train.web", tgt)
    with gzip.open(d / "valid.kjv.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(sentences(40, 12)) + "\n")
    write_lines(d / "valid.web", sentences(40, 13))
    return src, tgt


def test_preprocess_end_to_end(tmp_path, capsys):
    src, tgt = make_corpus(tmp_path)
    dest = tmp_path / "bin"
    rc = preprocess_main(
        [
            "--source-lang",
            "kjv",
            "--target-lang",
            "web",
            "--trainpref",
            str(tmp_path / "train"),
            "--validpref",
            str(tmp_path / "valid"),
            "--destdir",
            str(dest),
            "--vocab-size",
            "60",
            "--max-len",
            "64",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "train: kept 297/300" in err and "valid: kept 40/40" in err
    meta = json.loads((dest / "meta.json").read_text())
    tr = meta["splits"]["train"]["kjv-web"]
    assert tr["kept"] == 297 and tr["skipped"] == {"bad_utf8": 1, "empty": 1, "too_long": 1}
    assert meta["joint"] and meta["spm"] == {"kjv": "spm.model", "web": "spm.model"}
    assert meta["vocab_size"] == {"kjv": 60, "web": 60}
    assert meta["spm_sha256"]["kjv"] == hashlib.sha256((dest / "spm.model").read_bytes()).hexdigest()
    dict_lines = (dest / "dict.txt").read_text().splitlines()
    assert len(dict_lines) == 60 - 4
    assert (
        sum(int(x.split()[1]) for x in dict_lines)
        == tr["tokens"]["kjv"] + tr["tokens"]["web"] - tr["unk"]["kjv"] - tr["unk"]["web"]
    )
    for f in ("train.kjv-web.kjv.bin", "train.kjv-web.web.idx", "valid.kjv-web.web.bin"):
        assert (dest / f).is_file()

    train = load_split(dest, "train")
    ds, tok_s, tok_t = train.dataset, train.src_tok, train.tgt_tok
    assert train.meta == meta and tok_s is tok_t and len(ds) == 297
    kept_src = [s for i, s in enumerate(src) if i not in (5, 9, 20)]
    kept_tgt = [t for i, t in enumerate(tgt) if i not in (5, 9, 20)]
    item = ds[0]
    assert tok_s.decode(item["source"]) == kept_src[0] and tok_t.decode(item["target"]) == kept_tgt[0]
    assert tok_t.decode(ds[296]["target"]) == kept_tgt[296]
    with pytest.raises(UserError, match="no 'test' split"):
        load_split(dest, "test")
    with pytest.raises(UserError, match="megabranch-preprocess"):
        load_split(tmp_path / "nowhere", "train")

    # apply the existing model per language (--no-joint layout) to the valid split only
    dest2 = tmp_path / "bin2"
    preprocess_main(
        [
            "-s",
            "kjv",
            "-t",
            "web",
            "--validpref",
            str(tmp_path / "valid"),
            "--destdir",
            str(dest2),
            "--src-spm-model",
            str(dest / "spm.model"),
            "--tgt-spm-model",
            str(dest / "spm.model"),
        ]
    )
    m2 = json.loads((dest2 / "meta.json").read_text())
    assert not m2["joint"] and m2["spm"]["web"] == "spm.web.model" and m2["spm_sha256"] == meta["spm_sha256"]
    ds2 = load_split(dest2, "valid").dataset
    ds1 = load_split(dest, "valid").dataset
    assert batches_equal(ds1.collate(range(40)), ds2.collate(range(40)))


def test_bleu_references_are_the_file_as_written(tmp_path):
    """preprocess keeps the valid/test target lines as written (one per kept pair, in order, skips dropped), so
    BLEU scores against them; sentencepiece's normalisation (NFKC folds the ligature, spaces collapse) shows in
    the decoded-ids form only, which stays an option and is what a directory without the file gives."""
    from megabranch.decoding import references

    src, tgt = sentences(60, 1), sentences(60, 2)
    write_lines(tmp_path / "train.a", src)
    write_lines(tmp_path / "train.b", tgt)
    vsrc, vtgt = sentences(6, 3), sentences(6, 4)
    vtgt[1] = "the  ﬁrst   day"  # two spaces, a ligature, three spaces
    vsrc[3] = " ".join(["in"] * 90)  # over --max-len: the pair is skipped, its reference too
    write_lines(tmp_path / "valid.a", vsrc)
    write_lines(tmp_path / "valid.b", vtgt)
    dest = tmp_path / "bin"
    assert (
        preprocess_main(
            [
                "-s",
                "a",
                "-t",
                "b",
                "--trainpref",
                str(tmp_path / "train"),
                "--validpref",
                str(tmp_path / "valid"),
                "--destdir",
                str(dest),
                "--vocab-size",
                "60",
                "--max-len",
                "64",
            ]
        )
        == 0
    )
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["splits"]["valid"]["a-b"]["references"] == "valid.a-b.b.ref"
    assert "references" not in meta["splits"]["train"]["a-b"] and not (dest / "train.a-b.b.ref").exists()
    valid = load_split(dest, "valid")
    kept = vtgt[:3] + vtgt[4:]
    assert valid.dataset.references == kept
    assert load_split(dest, "train").dataset.references is None
    raw, used = references(valid.dataset, valid.tgt_tok, 5)
    assert (raw, used) == (kept, "raw")
    ids, used = references(valid.dataset, valid.tgt_tok, 5, source="ids")
    assert used == "ids" and ids[1] == "the first day" and ids[0] == kept[0]

    meta["splits"]["valid"]["a-b"]["references"] = "../valid.b"  # a path out of the directory: refused
    (dest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="not a file name inside"):
        load_split(dest, "valid")
    del meta["splits"]["valid"]["a-b"]["references"]  # a directory from before the file was kept
    (dest / "meta.json").write_text(json.dumps(meta))
    old = load_split(dest, "valid").dataset
    assert old.references is None and references(old, valid.tgt_tok, 5)[1] == "ids"
    (dest / "valid.a-b.b.ref").write_text("one line\n")
    meta["splits"]["valid"]["a-b"]["references"] = "valid.a-b.b.ref"
    (dest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="1 lines but the split has 5 pairs"):
        load_split(dest, "valid")


def test_preprocess_no_joint_trains_two_models(tmp_path):
    make_corpus(tmp_path)
    dest = tmp_path / "bin"
    preprocess_main(
        [
            "-s",
            "kjv",
            "-t",
            "web",
            "--trainpref",
            str(tmp_path / "train"),
            "--destdir",
            str(dest),
            "--vocab-size",
            "50",
            "--no-joint",
            "--model-type",
            "unigram",
        ]
    )
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["spm"] == {"kjv": "spm.kjv.model", "web": "spm.web.model"}
    assert (dest / "dict.kjv.txt").is_file() and (dest / "dict.web.txt").is_file()
    train = load_split(dest, "train")
    tok_s, tok_t = train.src_tok, train.tgt_tok
    assert tok_s is not tok_t and tok_s.sha256 != tok_t.sha256


def test_preprocess_user_errors(tmp_path, capsys):
    write_lines(tmp_path / "train.kjv", sentences(10, 0))
    write_lines(tmp_path / "train.web", sentences(9, 1))
    args = ["-s", "kjv", "-t", "web", "--trainpref", str(tmp_path / "train"), "--destdir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        preprocess_main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megabranch-preprocess: error:")
    assert "train.kjv has 10 lines" in err and "train.web has 9" in err
    with pytest.raises(SystemExit) as e:
        preprocess_main(
            ["-s", "kjv", "-t", "xx", "--trainpref", str(tmp_path / "train"), "--destdir", str(tmp_path / "o")]
        )
    assert e.value.code == 2 and "train.xx: input file not found" in capsys.readouterr().err


def test_workers_write_byte_identical_output(tmp_path, monkeypatch):
    """--workers 3 (chunks encoded in three processes, handed back in order) writes exactly what one worker writes:
    every file, meta.json and the dict counts included. Small chunks, so each worker gets several."""
    import megabranch.data.preprocess as preprocess

    make_corpus(tmp_path)
    monkeypatch.setattr(preprocess, "_CHUNK", 7)
    for workers in (1, 3):
        assert (
            preprocess_main(
                [
                    "-s",
                    "kjv",
                    "-t",
                    "web",
                    "--trainpref",
                    str(tmp_path / "train"),
                    "--validpref",
                    str(tmp_path / "valid"),
                    "--destdir",
                    str(tmp_path / f"w{workers}"),
                    "--vocab-size",
                    "60",
                    "--max-len",
                    "64",
                    "--workers",
                    str(workers),
                ]
            )
            == 0
        )
    one, three = sorted((tmp_path / "w1").iterdir()), sorted((tmp_path / "w3").iterdir())
    assert [p.name for p in one] == [p.name for p in three] and len(one) == 12  # valid's references too
    for a, b in zip(one, three):
        assert a.read_bytes() == b.read_bytes(), a.name
    with pytest.raises(SystemExit) as e:
        preprocess_main(
            [
                "-s",
                "kjv",
                "-t",
                "web",
                "--validpref",
                str(tmp_path / "valid"),
                "--workers",
                "0",
                "--destdir",
                str(tmp_path / "w0"),
                "--spm-model",
                str(tmp_path / "w1" / "spm.model"),
            ]
        )
    assert e.value.code == 2


def test_progress_bar_counts_lines_with_the_time_left(tmp_path, capsys):
    make_corpus(tmp_path)
    preprocess_main(
        [
            "-s",
            "kjv",
            "-t",
            "web",
            "--trainpref",
            str(tmp_path / "train"),
            "--validpref",
            str(tmp_path / "valid"),
            "--destdir",
            str(tmp_path / "bin"),
            "--vocab-size",
            "60",
            "--max-len",
            "64",
            "--progress",
            "bar",
        ]
    )
    err = capsys.readouterr().err
    assert "] 300/340 train eta" in err and "] 340/340 valid eta" in err  # lines of every split: 300 + 40


def test_a_directory_that_holds_data_is_refused_unless_overwrite(tmp_path, capsys):
    """As fairseq-preprocess refuses: a second run into the same directory (or into one an interrupted run left
    files in) is one line naming --overwrite, and nothing there changes. Red before: the spm model, dict and
    meta.json were replaced silently."""
    make_corpus(tmp_path)
    dest = tmp_path / "bin"
    args = [
        "-s",
        "kjv",
        "-t",
        "web",
        "--trainpref",
        str(tmp_path / "train"),
        "--destdir",
        str(dest),
        "--vocab-size",
        "60",
        "--max-len",
        "64",
    ]
    (tmp_path / "bin").mkdir()
    (dest / "notes.txt").write_text("not preprocessed data")  # other files do not count
    assert preprocess_main(args) == 0
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        preprocess_main([*args[:-4], "--vocab-size", "50"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"megabranch-preprocess: error: --destdir {dest} already holds preprocessed data "
        f"(meta.json and 6 more of its files); pass --overwrite to replace it"
    )
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    (dest / "meta.json").unlink()  # what an interrupted run leaves
    with pytest.raises(SystemExit):
        preprocess_main(args)
    assert "(spm.model and 5 more of its files)" in capsys.readouterr().err
    # applying the directory's own model to a new split is fine: nothing it holds is written over
    assert (
        preprocess_main(
            [
                "-s",
                "kjv",
                "-t",
                "web",
                "--validpref",
                str(tmp_path / "valid"),
                "--destdir",
                str(dest),
                "--spm-model",
                str(dest / "spm.model"),
            ]
        )
        == 0
    )
    assert (dest / "spm.model").read_bytes() == before["spm.model"]
    assert preprocess_main([*args[:-4], "--vocab-size", "50", "--overwrite"]) == 0
    assert json.loads((dest / "meta.json").read_text())["vocab_size"] == {"kjv": 50, "web": 50}


def test_binarized_files_of_another_vocabulary_are_refused_when_loaded(tmp_path):
    """Train files copied from another data directory (same text, so the same line counts; a larger vocabulary):
    one line naming the file, when the split is opened. Red before: they loaded, and the first step failed with an
    IndexError in the embedding."""
    import shutil

    make_corpus(tmp_path)
    small, big = tmp_path / "small", tmp_path / "big"
    for dest, vocab in ((small, 40), (big, 90)):
        preprocess_main(
            [
                "-s",
                "kjv",
                "-t",
                "web",
                "--trainpref",
                str(tmp_path / "train"),
                "--destdir",
                str(dest),
                "--vocab-size",
                str(vocab),
                "--max-len",
                "2000",
            ]
        )
    for f in big.glob("train.*"):
        shutil.copyfile(f, small / f.name)
    with pytest.raises(
        UserError,
        match=r"train\.kjv-web\.kjv\.bin: \d+ tokens but meta\.json says \d+ \(the file is "
        r"not the one preprocessed here\)",
    ):
        load_split(small, "train")
    # ... and with counts that happen to match, the ids themselves: recorded by preprocess, or read from the file
    meta_path = small / "meta.json"
    meta = json.loads(meta_path.read_text())
    theirs = json.loads((big / "meta.json").read_text())["splits"]["train"]["kjv-web"]
    stats = meta["splits"]["train"]["kjv-web"]
    stats["tokens"] = theirs["tokens"]
    for recorded in (theirs["max_id"], None):
        if recorded is None:
            del stats["max_id"]  # a directory from before max_id was recorded
        else:
            stats["max_id"] = recorded
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(UserError) as e:
            load_split(small, "train")
        assert str(e.value).startswith(
            f"{small / 'train.kjv-web.kjv'}.bin: token id {theirs['max_id']['kjv']} is "
            f"outside the vocabulary of spm.model (40 pieces)"
        ), str(e.value)
    assert 40 <= theirs["max_id"]["kjv"] < 90


def test_old_data_directories_still_load():
    """Both meta.json shapes written before there was one (a one-direction directory: source_lang / target_lang at
    the top; a --pairs directory) read as the current shape and load, their token ids checked by reading them."""
    import os

    from megabranch.data.meta import read_meta, upgrade
    from tests.helpers.env import ROOT

    fixtures = os.path.join(ROOT, "tests", "fixtures")
    single = os.path.join(fixtures, "old_main", "data-bin")
    raw = json.loads(open(os.path.join(single, "meta.json")).read())
    assert raw["format_version"] == 1 and "directions" not in raw
    meta = read_meta(single)
    assert meta == upgrade(raw) and meta["format_version"] == 2
    assert meta["directions"] == [{"source_lang": "src", "target_lang": "tgt"}]
    assert meta["splits"]["train"] == {"src-tgt": raw["splits"]["train"]} and meta["spm_sha256"] == raw["spm_sha256"]
    train = load_split(single, "train")
    assert type(train.dataset).__name__ == "LanguagePairDataset" and len(train.dataset) == 120
    assert int(train.dataset.src.num_tokens) == raw["splits"]["train"]["tokens"]["src"]

    pairs = os.path.join(fixtures, "old_data", "pairs")
    raw = json.loads(open(os.path.join(pairs, "meta.json")).read())
    assert raw["format_version"] == 1 and "max_id" not in raw["splits"]["train"]["aa-bb"]
    valid = load_split(pairs, "valid")
    assert valid.dataset.directions == ["aa-bb", "bb-aa"] and valid.src_tok is valid.tgt_tok
    tok = valid.src_tok
    for name in ("aa-bb", "bb-aa"):
        src, tgt = name.split("-")
        part = valid.dataset.direction(name)
        text = {
            lang: open(os.path.join(fixtures, "old_data", "text", f"{name}.{lang}")).read().splitlines()
            for lang in (src, tgt)
        }
        assert [tok.decode(part.source_tokens(i)) for i in range(len(part))] == text[src]
        assert [tok.decode(part.target_tokens(i)) for i in range(len(part))] == text[tgt]
        assert part[0]["source"][0] == tok.piece_id(f"<2{tgt}>")


def test_the_synthetic_corpus_tool_is_seeded_and_line_aligned(tmp_path, monkeypatch, capsys):
    """tools/data/synthetic_corpus.py (what docs/benchmarks.md measures at 36M pairs): the same seed, the same
    bytes (chunks drawn independently, so a chunk end changes nothing); as many lines on both sides; and
    tools/data/measure_startup.py reports a directory's start-up."""
    import os

    from tests.helpers.env import ROOT
    from tools.data import measure_startup, synthetic_corpus

    monkeypatch.setattr(synthetic_corpus, "CHUNK", 700)
    monkeypatch.setattr(synthetic_corpus, "VOCAB", 3000)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert (
            synthetic_corpus.main(
                ["--pairs", "1500", "--valid-pairs", "10", "--out", str(tmp_path / name), "--seed", str(seed)]
            )
            == 0
        )
    a, b, c = ((tmp_path / n / "train.fr").read_bytes() for n in "abc")
    assert (
        a == b and a != c and (tmp_path / "a" / "train.en").read_bytes() == (tmp_path / "b" / "train.en").read_bytes()
    )
    en, fr = ((tmp_path / "a" / f"train.{lang}").read_text().split("\n") for lang in ("en", "fr"))
    assert len(en) == len(fr) == 1501 and en[-1] == fr[-1] == ""  # every line ends with a newline
    assert all(s and t and len(t.split()) >= len(s.split()) for s, t in zip(en[:-1], fr[:-1]))
    assert (
        measure_startup.main(
            [
                "--data",
                os.path.join(ROOT, "tests", "fixtures", "old_main", "data-bin"),
                "--max-tokens",
                "200",
                "--ranks",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "120 training pairs" in out and "| batch epoch 1 (14 batches of this rank) |" in out
