"""Multilingual data: --pairs preprocessing with target-language tags, temperature sampling, BLEU per direction."""

import json
import random

import numpy as np
import pytest
import sacrebleu
import torch

from megabranch.data import EpochBatchIterator, Tokenizer, load_split, train_sentencepiece
from megabranch.data.multilingual import MultilingualDataset, temperature_probs
from megabranch.data.preprocess import main as preprocess_main
from megabranch.errors import UserError
from megabranch.model import build_model_from

pytestmark = pytest.mark.unit

# three toy "languages" with a shared core, so copying the source earns some BLEU that differs per direction
CORE = "sun moon star sky sea land tree river stone fire".split()
LEX = {"aa": "ka ko ki ku", "bb": "ba bo bi bu", "cc": "da do di du"}
SIZES = {"aa-bb": 120, "bb-aa": 120, "aa-cc": 30}  # train pairs per direction (unequal: temperature matters)


def _sentence(rng, lang, n):
    own = LEX[lang].split()
    return " ".join(rng.choice(CORE) if rng.random() < 0.6 else rng.choice(own) for _ in range(n))


def _write_pairs(d, name, n, seed):
    src, tgt = name.split("-")
    rng = random.Random(seed)
    lengths = [rng.randint(3, 10) for _ in range(n)]
    s = [_sentence(rng, src, k) for k in lengths]
    t = [_sentence(rng, tgt, k) for k in lengths]
    (d / f"{name}.{src}").write_text("\n".join(s) + "\n", encoding="utf-8")
    (d / f"{name}.{tgt}").write_text("\n".join(t) + "\n", encoding="utf-8")
    return s, t


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Raw files (train/<dir>.<lang>, valid/<dir>.<lang>) and the --pairs directory made from them."""
    root = tmp_path_factory.mktemp("multi")
    text = {}
    for split, scale, seed in (("train", 1.0, 0), ("valid", 0.1, 100)):
        (root / split).mkdir()
        for k, (name, n) in enumerate(SIZES.items()):
            text[split, name] = _write_pairs(root / split, name, max(4, int(n * scale)), seed + k)
    names = ",".join(SIZES)
    prefixes = {split: ",".join(str(root / split / name) for name in SIZES) for split in ("train", "valid")}
    dest = root / "bin"
    assert (
        preprocess_main(
            [
                "--pairs",
                names,
                "--trainpref",
                prefixes["train"],
                "--validpref",
                prefixes["valid"],
                "--destdir",
                str(dest),
                "--vocab-size",
                "40",
            ]
        )
        == 0
    )
    return root, dest, text


def _one_line_error(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        preprocess_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megabranch-preprocess: error:") and needle in lines[0], err


# ---------------------------------------------------------------- tags through preprocess


def test_tags_are_pieces_and_lead_every_source(corpus):
    root, dest, text = corpus
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["directions"] == [
        {"source_lang": "aa", "target_lang": "bb", "tag": "<2bb>"},
        {"source_lang": "bb", "target_lang": "aa", "tag": "<2aa>"},
        {"source_lang": "aa", "target_lang": "cc", "tag": "<2cc>"},
    ]
    train = load_split(dest, "train")
    ds, tok, tok_t = train.dataset, train.src_tok, train.tgt_tok
    assert tok is tok_t and ds.directions == list(SIZES) and len(ds) == sum(SIZES.values())
    for name in SIZES:
        tag = "<2" + name.split("-")[1] + ">"
        tag_id = tok.piece_id(tag)
        assert tag_id is not None and tok.id_to_piece(tag_id) == tag
        assert tok.encode(f"x {tag} y").count(tag_id) == 1  # never split by BPE
        part = ds.direction(name)
        src_lines, tgt_lines = text["train", name]
        # stored without the tag; read with it
        assert tok.decode(part.source_tokens(0)) == src_lines[0]
        assert part[0]["source"].tolist() == [tag_id, *tok.encode(src_lines[0]), tok.eos]
        assert tok.decode(part.target_tokens(5)) == tgt_lines[5]
        batch = part.collate(range(len(part)))
        assert (batch["src_tokens"][:, 0] == tag_id).all()
        assert np.array_equal(part.src_sizes, part.src.sizes + 2)  # tag + eos
    # the concatenation: item i is the right direction's pair, with its tag
    off = 0
    for name in SIZES:
        tag_id = tok.piece_id("<2" + name.split("-")[1] + ">")
        assert ds.direction_of(off) == name and ds[off]["source"][0] == tag_id and ds[off]["id"] == off
        assert ds.target_tokens(off).tolist() == ds.direction(name).target_tokens(0).tolist()
        off += SIZES[name]
    full = ds.collate([0, SIZES["aa-bb"], len(ds) - 1])
    assert full["src_tokens"][:, 0].tolist() == [tok.piece_id(t) for t in ("<2bb>", "<2aa>", "<2cc>")]


def test_single_pair_directories_are_unchanged(corpus, tmp_path):
    """-s/-t writes the same meta.json shape with one untagged direction and loads a plain LanguagePairDataset."""
    root, _, _ = corpus
    dest = tmp_path / "single"
    preprocess_main(
        [
            "-s",
            "aa",
            "-t",
            "bb",
            "--trainpref",
            str(root / "train" / "aa-bb"),
            "--destdir",
            str(dest),
            "--vocab-size",
            "40",
        ]
    )
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["directions"] == [{"source_lang": "aa", "target_lang": "bb"}] and list(meta["splits"]["train"]) == [
        "aa-bb"
    ]
    ds = load_split(dest, "train", sampling_temperature=5.0).dataset  # ignored for one pair
    assert type(ds).__name__ == "LanguagePairDataset" and ds.src_prefix is None
    assert EpochBatchIterator(ds, 100).batches_for_epoch(1)[0].dtype == np.int64


# ---------------------------------------------------------------- temperature sampling


def test_temperature_probs_formula():
    assert np.allclose(temperature_probs([900, 100], 1.0), [0.9, 0.1])
    q = temperature_probs([900, 100], 5.0)
    w = np.array([0.9, 0.1]) ** 0.2
    assert np.allclose(q, w / w.sum()) and abs(q[0] - 0.6081) < 1e-4  # 0.9^0.2 / (0.9^0.2 + 0.1^0.2)
    assert np.allclose(temperature_probs([900, 100, 1], 1e9), [1 / 3] * 3)


@pytest.mark.parametrize("temperature", [1.0, 5.0, 100.0])
def test_sampling_draws_directions_in_the_stated_proportions(corpus, temperature):
    _, dest, _ = corpus
    ds = load_split(dest, "train", sampling_temperature=temperature).dataset
    n = np.array([SIZES[k] for k in SIZES], dtype=np.float64)
    q = (n / n.sum()) ** (1 / temperature)
    q /= q.sum()
    itr = EpochBatchIterator(ds, max_tokens=64, seed=3)
    drawn = np.concatenate([np.concatenate(itr.batches_for_epoch(e)) for e in range(1, 201)])
    assert len(drawn) == 200 * len(ds)  # every epoch draws as many pairs as the data has
    frac = np.bincount(np.searchsorted(ds.offsets, drawn, side="right") - 1, minlength=3) / len(drawn)
    assert np.abs(frac - q).max() < 0.01, (frac, q)  # 54,000 draws: 4 standard errors < 0.01
    if temperature == 1.0:  # no resampling at all: each pair exactly once an epoch
        assert ds.epoch_indices(3, 1) is None
        assert sorted(np.concatenate(itr.batches_for_epoch(7)).tolist()) == list(range(len(ds)))
    else:  # an up-sampled direction cycles through all its pairs before repeating one
        small = ds.epoch_indices(3, 1)
        small = small[small >= ds.offsets[2]]
        k = SIZES["aa-cc"]
        assert len(small) > k and len(set(small[:k].tolist())) == k


def test_sampled_epochs_resume_exactly(corpus):
    _, dest, _ = corpus
    ds = load_split(dest, "train", sampling_temperature=5.0).dataset
    a = EpochBatchIterator(ds, max_tokens=64, seed=2)
    it = a.next_epoch_itr()
    for _ in range(3):
        next(it)
    rest = [b["id"].tolist() for b in it]
    b = EpochBatchIterator(ds, max_tokens=64, seed=2)
    b.load_state_dict({"epoch": 1, "iterations_in_epoch": 3})
    assert [x["id"].tolist() for x in b.next_epoch_itr()] == rest
    assert not np.array_equal(np.concatenate(a.batches_for_epoch(1)), np.concatenate(a.batches_for_epoch(2)))


# ---------------------------------------------------------------- BLEU per direction


class CopyModel:
    """Greedy decoding of this stub emits the collated source token by token (tag first): the 'translation'
    of each sentence is its tagged source, so its BLEU can be computed from the raw files."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.decoder = self
        self.layers = [None]
        self.embed = type("E", (), {"max_positions": 512})()

    def eval(self):
        return self

    def encoder(self, src_tokens):
        return src_tokens, src_tokens.eq(0)

    def __call__(self, tokens, memory, mask, cache=None, offset=0):
        nxt = memory[:, offset] if offset < memory.shape[1] else torch.full_like(memory[:, 0], 3)
        nxt = torch.where(nxt == 0, torch.full_like(nxt, 3), nxt)  # past the source: eos
        return torch.nn.functional.one_hot(nxt, self.vocab).float()[:, None, :]


def test_per_direction_bleu_is_sacrebleu_on_each_directions_files(corpus):
    from megabranch.decoding import per_direction_bleu

    _, dest, text = corpus
    valid = load_split(dest, "valid")
    ds, tok = valid.dataset, valid.src_tok
    scores, avg = per_direction_bleu(CopyModel(tok.vocab_size), ds, tok, beam=1)
    assert list(scores) == list(SIZES)
    for name, score in scores.items():
        src, tgt = text["valid", name]
        tag = "<2" + name.split("-")[1] + ">"
        expected = sacrebleu.corpus_bleu([f"{tag} {s}" for s in src], [tgt]).score
        assert score == pytest.approx(expected, abs=1e-9), name
    assert len(set(round(s, 6) for s in scores.values())) == 3  # the directions really differ
    assert avg == pytest.approx(sum(scores.values()) / 3)
    # a limit decodes the first sentences of every direction
    lim, _ = per_direction_bleu(CopyModel(tok.vocab_size), ds, tok, beam=1, limit=2)
    for name in SIZES:
        src, tgt = text["valid", name]
        tag = "<2" + name.split("-")[1] + ">"
        assert lim[name] == pytest.approx(sacrebleu.corpus_bleu([f"{tag} {s}" for s in src[:2]], [tgt[:2]]).score)


def test_train_then_generate_reports_every_direction(corpus, tmp_path, capsys):
    """A multilingual directory trains like any other; megabranch-generate prints BLEU per direction (each equal
    to sacreBLEU on its hypotheses against that direction's reference file) and their average."""
    from megabranch.config import load_config
    from megabranch.generate import main as generate_main
    from megabranch.train import run

    _, dest, text = corpus
    save = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"data.data_dir={dest}",
            "data.max_tokens=200",
            "data.sampling_temperature=5",
            f"log.save_dir={save}",
            "model.encoder_layers=1",
            "model.decoder_layers=1",
            "model.d_model=16",
            "model.n_heads=2",
            "model.ffn_dim=32",
            "model.max_positions=64",
            "optim.max_updates=2",
            "optim.warmup_updates=1",
            "log.valid_interval=2",
            "log.bleu_sentences=3",
            "log.tensorboard=false",
            "log.progress=none",
        ],
    )
    import megabranch.train as train_module

    temperatures = []
    real_load = train_module.load_split

    def spy(data_dir, split, *args):
        temperatures.append((split, *args))
        return real_load(data_dir, split, *args)

    train_module.load_split = spy
    try:
        run(cfg, device="cpu")
    finally:
        train_module.load_split = real_load
    assert ("train", 5.0) in temperatures  # the training split is drawn at data.sampling_temperature
    capsys.readouterr()
    # validation BLEU during training: per direction and their average, as per_direction_bleu scores the model
    from megabranch import checkpoint
    from megabranch.decoding import per_direction_bleu

    valid = [json.loads(x) for x in (save / "log.jsonl").read_text().splitlines() if '"valid"' in x][-1]
    ck = checkpoint.load_checkpoint(str(save))
    model = build_model_from(cfg.model, ck["vocab_size"], ck["tgt_vocab_size"], ck["model"], ck["step"], "run").eval()
    valid_split = load_split(dest, "valid")
    want, avg = per_direction_bleu(model, valid_split.dataset, valid_split.tgt_tok, 1, 3)
    assert {k: valid[f"bleu_{k}"] for k in SIZES} == {k: round(v, 2) for k, v in want.items()}
    assert valid["bleu"] == round(avg, 2)
    out_file = tmp_path / "hyps.txt"
    assert (
        generate_main(
            ["--checkpoint", str(save), "--split", "valid", "--beam", "1", "--output", str(out_file), "--copy-baseline"]
        )
        == 0
    )
    out = capsys.readouterr().out
    hyps = out_file.read_text(encoding="utf-8").split("\n")[:-1]
    scores, start = {}, 0
    for name in SIZES:
        src, tgt = text["valid", name]
        line = next(x for x in out.splitlines() if x.startswith(f"{name} BLEU = "))
        printed = float(line.split()[3])
        assert printed == pytest.approx(sacrebleu.corpus_bleu(hyps[start : start + len(tgt)], [tgt]).score, abs=0.005)
        copy = next(x for x in out.splitlines() if x.startswith(f"{name} copy-the-source baseline BLEU = "))
        assert float(copy.split()[-1]) == pytest.approx(sacrebleu.corpus_bleu(src, [tgt]).score, abs=0.005)
        scores[name] = printed
        start += len(tgt)
    assert start == len(hyps)
    avg = next(x for x in out.splitlines() if x.startswith("average BLEU over 3 directions = "))
    assert float(avg.split()[-1]) == pytest.approx(sum(scores.values()) / 3, abs=0.01)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_exit_2(corpus, tmp_path, capsys):
    root, dest, _ = corpus
    train = root / "train"
    base = ["--destdir", str(tmp_path / "o"), "--vocab-size", "40"]
    # a pair whose files are missing
    _one_line_error(
        capsys,
        ["--pairs", "aa-bb,aa-dd", "--trainpref", f"{train / 'aa-bb'},{train / 'aa-dd'}", *base],
        "aa-dd.aa: input file not found",
    )
    # misaligned files
    (tmp_path / "mis.aa").write_text("ka ko\nki ku\nsun\n")
    (tmp_path / "mis.dd").write_text("ka ko\nki ku\n")
    _one_line_error(
        capsys,
        ["--pairs", "aa-bb,aa-dd", "--trainpref", f"{train / 'aa-bb'},{tmp_path / 'mis'}", *base],
        "mis.aa has 3 lines but",
    )
    # prefixes that do not match the pairs, malformed pairs, -s/-t mixed with --pairs, a per-language vocabulary
    _one_line_error(
        capsys,
        ["--pairs", "aa-bb,bb-aa,aa-cc", "--trainpref", f"{train / 'aa-bb'},{train / 'bb-aa'}", *base],
        "2 prefixes for 3 pairs",
    )
    _one_line_error(capsys, ["--pairs", "aa-aa", "--trainpref", str(train / "aa-bb"), *base], "'aa-aa' is not SRC-TGT")
    _one_line_error(
        capsys,
        ["--pairs", "aa-bb", "-s", "aa", "--trainpref", str(train / "aa-bb"), *base],
        "--pairs replaces --source-lang",
    )
    _one_line_error(
        capsys,
        ["--pairs", "aa-bb", "--no-joint", "--trainpref", str(train / "aa-bb"), *base],
        "one joint sentencepiece model",
    )
    # a language tag the vocabulary lacks: a given model trained without tags
    plain = train_sentencepiece([train / "aa-bb.aa", train / "aa-bb.bb"], tmp_path / "plain", 40)
    _one_line_error(
        capsys,
        ["--pairs", "aa-bb", "--trainpref", str(train / "aa-bb"), "--spm-model", str(plain), *base],
        "the language tag <2bb> is not in its vocabulary",
    )
    # ... and a directory whose meta.json names a tag that is not there
    meta = json.loads((dest / "meta.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in dest.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    meta["directions"][0]["tag"] = "<2zz>"
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"language tag <2zz> of direction aa-bb .* not in the vocabulary"):
        load_split(broken, "valid")
    assert Tokenizer(dest / "spm.model").piece_id("<2zz>") is None


@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_temperature_must_be_positive(corpus, capsys, bad):
    from megabranch.train import main as train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--set", f"data.sampling_temperature={bad}", "--print-config"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("megabranch-train: error:") and "data.sampling_temperature" in err and "> 0" in err
    _, dest, _ = corpus
    with pytest.raises(UserError, match="data.sampling_temperature"):
        load_split(dest, "train", sampling_temperature=float(bad))
    with pytest.raises(UserError, match="data.sampling_temperature"):
        MultilingualDataset([("x", None)], float(bad))
