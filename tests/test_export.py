"""Serving exports against the real packages (requirements-peers.txt): `megabranch-convert --to ctranslate2 | hf |
fairseq` of a tiny model trained here on a copy task, per residual scheme (post_ln, deepnorm, BranchNorm mid-ramp,
pre_ln where the target has it). The test loads the written files with the package itself and compares, apart
from the tool's own printed check: logits within 1e-4 relative on a batch with padding, greedy and beam-4
hypotheses of the whole test split identical to megabranch's decoding, BLEU equal. Without the folding
(folding.BRANCH_OUTPUTS emptied) the deep schemes' exports fail their check and write nothing; bad input is one
line, exit 2, nothing written."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megabranch import checkpoint
from megabranch.config import ModelConfig
from megabranch.convert import folding
from megabranch.convert import main as convert_main
from megabranch.convert.check import build_single
from megabranch.data import load_split, sentence_batches
from megabranch.decoding import beam_search, bleu, greedy_decode, max_length
from megabranch.errors import UserError
from megabranch.model import build_model
from megabranch.residual import set_step
from megabranch.vocab import BOS, EOS, PAD
from tests.helpers.corpus import sentences, write_lines
from tests.helpers.env import one_thread

pytestmark = pytest.mark.unit

SCHEMES = {"post_ln": {}, "deepnorm": {"deepnorm_init": False}, "branchnorm": {"alpha_warmup_steps": 500}, "pre_ln": {}}
STEPS = 200  # BranchNorm's alpha_t is 0.4 then: mid-ramp
RTOL = 1e-4


def _package(target: str):
    name = {"ctranslate2": "ctranslate2", "hf": "transformers", "fairseq": "fairseq"}[target]
    return pytest.importorskip(name, reason=f"{name} not installed (requirements-peers.txt)")


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    """A copy task (target = source) over a 60-piece joint vocabulary, with a test split."""
    from megabranch.data.preprocess import main as preprocess_main

    d = tmp_path_factory.mktemp("copy")
    for split, n, seed in (("train", 400, 1), ("valid", 20, 2), ("test", 24, 3)):
        lines = sentences(n, seed, 2, 9)
        write_lines(d / f"{split}.src", lines)
        write_lines(d / f"{split}.tgt", lines)
    dest = d / "bin"
    assert (
        preprocess_main(
            [
                "--source-lang",
                "src",
                "--target-lang",
                "tgt",
                "--trainpref",
                str(d / "train"),
                "--validpref",
                str(d / "valid"),
                "--testpref",
                str(d / "test"),
                "--destdir",
                str(dest),
                "--vocab-size",
                "60",
            ]
        )
        == 0
    )
    return str(dest)


_TRAINED: dict = {}


def _trained(scheme: str, copy_data: str, tmp_path_factory, extra: tuple = ()) -> str:
    """A 3L-3L d=32 model of `scheme` trained STEPS updates on the copy task -> its step directory."""
    key = (scheme, extra)
    if key not in _TRAINED:
        from megabranch.config import load_config
        from megabranch.train import run

        save = str(tmp_path_factory.mktemp(f"run_{scheme}{len(_TRAINED)}") / "run")
        overrides = [
            f"model.residual={scheme}",
            "model.encoder_layers=3",
            "model.decoder_layers=3",
            "model.d_model=32",
            "model.n_heads=4",
            "model.ffn_dim=64",
            "model.dropout=0.0",
            "model.max_positions=64",
            *(f"model.{k}={v}" for k, v in SCHEMES[scheme].items()),
            "optim.lr=0.004",
            "optim.warmup_updates=30",
            f"optim.max_updates={STEPS}",
            "optim.clip_norm=1.0",
            f"data.data_dir={copy_data}",
            "data.max_tokens=400",
            f"log.save_dir={save}",
            f"log.valid_interval={STEPS}",
            "log.log_interval=1000",
            "log.bleu_sentences=0",
            "log.tensorboard=false",
            "log.progress=none",
            *extra,
        ]
        with one_thread():
            run(load_config(None, overrides))
        _TRAINED[key] = checkpoint.resolve(save)
    return _TRAINED[key]


def _decode_split(step_dir: str, data_dir: str, decode_fn) -> tuple[list, list, list, list]:
    """-> (megabranch's greedy, beam-4 hypotheses, the package's, references) of the test split, batch by batch
    (the same batches and length limits on both sides)."""
    ck = checkpoint.load_checkpoint(step_dir)
    mc = ModelConfig(**ck["config"]["model"])
    model = build_single(mc, ck["vocab_size"], ck["tgt_vocab_size"], ck["model"], ck["step"])
    test = load_split(data_dir, "test")
    dataset, tok = test.dataset, test.tgt_tok
    ours, theirs, limits = {1: {}, 4: {}}, {1: {}, 4: {}}, {}
    for idx in sentence_batches(dataset.src_sizes, len(dataset), 0, 8):
        src = dataset.collater([dataset[i] for i in idx])["src_tokens"]
        n = max_length(model, src, 1.2, 10)
        for beam in (1, 4):
            mine = greedy_decode(model, src, BOS, EOS) if beam == 1 else beam_search(model, src, BOS, EOS, 4, 0.6)
            other = decode_fn(src, beam, 0.6 if beam > 1 else 1.0, n)
            for i, a, b in zip(idx, mine, other):
                ours[beam][i], theirs[beam][i], limits[i] = a, b, n
    refs = [tok.decode(dataset.target_tokens(i)) for i in range(len(dataset))]

    def text(d):
        return [tok.decode(d[i]) for i in range(len(dataset))]

    return [text(ours[1]), text(ours[4])], [text(theirs[1]), text(theirs[4])], [ours, theirs, limits], refs


def _loaded(target: str, out: str):
    """The written directory as the package loads it -> (logits_fn, decode_fn) on megabranch ids."""
    if target == "ctranslate2":
        from megabranch.convert import export_ctranslate2 as ct2

        tr = ct2.translator(out, compute_type="float32")
        vocab = [line for line in _ct2_vocab(out)]
        pieces = (vocab, vocab)
        return (lambda s, p: ct2.logits(tr, pieces, s, p)), (lambda s, b, lp, n: ct2.decode(tr, pieces, s, b, lp, n))
    if target == "hf":
        from megabranch.convert import export_hf

        model, _ = export_hf.load(out)
        return (lambda s, p: export_hf.logits(model, s, p)), (lambda s, b, lp, n: export_hf.decode(model, s, b, lp, n))
    from megabranch.convert import export_fairseq

    hub = export_fairseq.load(out)
    return (lambda s, p: export_fairseq.logits(hub, s, p)), (
        lambda s, b, lp, n: export_fairseq.decode(hub, s, b, lp, n)
    )


def _ct2_vocab(out: str) -> list[str]:
    import json

    with open(os.path.join(out, "shared_vocabulary.json")) as fh:
        return json.load(fh)


CASES = [(t, s) for t in ("ctranslate2", "hf", "fairseq") for s in SCHEMES if not (t == "hf" and s == "pre_ln")]


@pytest.mark.slow
@pytest.mark.parametrize("target,scheme", CASES)
def test_export_runs_in_the_package_like_megabranch(target, scheme, copy_data, tmp_path, tmp_path_factory, capsys):
    _package(target)
    step_dir = _trained(scheme, copy_data, tmp_path_factory)
    out = str(tmp_path / "served")
    assert convert_main([step_dir, out, "--to", target]) == 0
    printed = capsys.readouterr().out
    checks = [line for line in printed.splitlines() if line.startswith("check (export")]
    assert len(checks) == 2 and all(line.endswith(": OK") for line in checks), printed
    logits_fn, decode_fn = _loaded(target, out)
    # logits on a padded batch, computed here
    from megabranch.convert.serve_check import sample, source_model
    from megabranch.convert.serving import prepare

    ck = checkpoint.load_checkpoint(step_dir)
    ex = prepare(checkpoint_config(ck), ck, ck["model"], None)
    src, prev = sample(ex)
    ours = source_model(ex)(src, prev)
    keep = prev.ne(PAD)
    assert folding.relative_difference(ours[keep], logits_fn(src, prev)[keep]) < RTOL
    # the test split: identical hypotheses, so equal BLEU
    mine, theirs, ids, refs = _decode_split(step_dir, copy_data, decode_fn)
    ours, other, limits = ids
    for beam, a, b in zip((1, 4), mine, theirs):
        differ = [i for i in ours[beam] if ours[beam][i] != other[beam][i]]
        if target in ("ctranslate2", "hf") and beam > 1:  # the length limit is handled otherwise (serve_check.py)
            differ = [i for i in differ if limits[i] - 1 not in (len(ours[beam][i]), len(other[beam][i]))]
        assert not differ, f"beam {beam}: hypotheses of sentences {differ} differ"
        if not (target in ("ctranslate2", "hf") and beam > 1):
            assert abs(bleu(a, refs)[0].score - bleu(b, refs)[0].score) <= 0.1
    if scheme != "branchnorm":  # mid-ramp after 200 updates it still says one thing to every source
        assert len({tuple(h) for h in ours[4].values()}) > len(refs) // 2  # a model that reads its source


def checkpoint_config(ck: dict):
    from megabranch.config import Config

    return Config.from_dict(ck["config"], where="test")


UNTIED = (
    "model.share_all_embeddings=false",
    "model.share_decoder_input_output_embed=false",
    "model.positions=learned",
    "model.position_offset=2",
    "model.embed_scale=1.0",
)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ctranslate2", "hf", "fairseq"])
def test_untied_tables_learned_positions_an_offset_and_another_scale_carry_over(
    target, copy_data, tmp_path, tmp_path_factory, capsys
):
    """Three tables, torchscale's conventions (learned positions from 2, embeddings unscaled), DeepNorm."""
    _package(target)
    step_dir = _trained("deepnorm", copy_data, tmp_path_factory, UNTIED)
    assert convert_main([step_dir, str(tmp_path / "served"), "--to", target]) == 0
    checks = [line for line in capsys.readouterr().out.splitlines() if line.startswith("check (export")]
    assert len(checks) == 2 and all(line.endswith(": OK") for line in checks)
    logits_fn, decode_fn = _loaded(target, str(tmp_path / "served"))
    ours, other, limits = _decode_split(step_dir, copy_data, decode_fn)[2]
    for beam in (1, 4):
        differ = [
            i
            for i in ours[beam]
            if ours[beam][i] != other[beam][i]
            and not (
                target in ("ctranslate2", "hf")
                and beam > 1
                and limits[i] - 1 in (len(ours[beam][i]), len(other[beam][i]))
            )
        ]
        assert not differ


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ctranslate2", "hf", "fairseq"])
@pytest.mark.parametrize("scheme", ["deepnorm", "branchnorm"])
def test_without_the_folding_the_check_fails_and_nothing_is_written(
    target, scheme, copy_data, tmp_path, tmp_path_factory, capsys, monkeypatch
):
    _package(target)
    step_dir = _trained(scheme, copy_data, tmp_path_factory)
    monkeypatch.setattr(folding, "BRANCH_OUTPUTS", ())
    out = str(tmp_path / "served")
    capsys.readouterr()  # what training the model printed, the first time a test asks for it
    with pytest.raises(SystemExit) as e:
        convert_main([step_dir, out, "--to", target])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "export check failed" in err, err
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def _fails(capsys, argv, needle: str, tmp_path) -> None:
    capsys.readouterr()  # what training a model for argv printed
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        convert_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(copy_data, tmp_path, tmp_path_factory, capsys):
    post = _trained("post_ln", copy_data, tmp_path_factory)
    out = str(tmp_path / "served")
    _fails(capsys, [post, out, "--to", "onnx"], "--to onnx: unknown destination", tmp_path)
    _fails(capsys, [post, out, "--to", "hf", "--quantization", "int8"], "only --to ctranslate2 quantizes", tmp_path)
    _fails(capsys, [post, out, "--to", "ctranslate2", "--quantization", "int4"], "--quantization int4", tmp_path)
    os.makedirs(os.path.join(out, "x"))
    _fails(capsys, [post, out, "--to", "ctranslate2"], "already exists", tmp_path)
    os.rmdir(os.path.join(out, "x"))
    os.rmdir(out)
    if _has("transformers"):
        _fails(
            capsys,
            [_trained("pre_ln", copy_data, tmp_path_factory), out, "--to", "hf"],
            "model.residual=pre_ln: MarianMT",
            tmp_path,
        )
    _fails(
        capsys, [post, out, "--to", "fairseq", "--data-dir", str(tmp_path / "nowhere")], "meta.json not found", tmp_path
    )


def _has(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_an_int8_export_leaves_the_folded_weights_alone(copy_data, tmp_path, tmp_path_factory, capsys):
    """ctranslate2 quantizes the spec's arrays in place: the export hands it copies, so a later export of the same
    folded weights (tools/bench/decode.py writes several) is unchanged."""
    _package("ctranslate2")
    from megabranch.convert.serving import prepare
    from megabranch.convert.targets import export

    ck = checkpoint.load_checkpoint(_trained("deepnorm", copy_data, tmp_path_factory))
    ex = prepare(checkpoint_config(ck), ck, ck["model"], None)
    before = {k: v.clone() for k, v in ex.folded.params.items()}
    export("ctranslate2", ex, str(tmp_path / "int8"), "int8")
    assert "not enforced" in capsys.readouterr().out
    assert all(torch.equal(before[k], v) for k, v in ex.folded.params.items())


def test_an_unknown_scheme_is_refused_in_one_line():
    mc = ModelConfig(encoder_layers=1, decoder_layers=1, d_model=8, n_heads=2, ffn_dim=8)
    with pytest.raises(UserError, match=r"^model.residual=admin: the export rewrites post_ln, pre_ln, deepnorm"):
        folding.fold({}, dataclasses.replace(mc, residual="admin"), 0)


@pytest.mark.parametrize(
    "scheme,step", [("deepnorm", 0), ("branchnorm", 7), ("branchnorm", 0), ("post_ln", 3), ("ds_init", 0)]
)
def test_folding_is_the_plain_post_ln_model_in_float64(scheme, step):
    """The folded weights in a post_ln model with each stack's folded eps compute what the scheme computes
    (float64: only rounding differs)."""
    mc = ModelConfig(
        residual=scheme,
        encoder_layers=3,
        decoder_layers=2,
        d_model=16,
        n_heads=2,
        ffn_dim=32,
        dropout=0.0,
        alpha_warmup_steps=20,
        max_positions=32,
    )
    torch.manual_seed(0)
    model = build_model(mc, 30, seed=3).eval()
    set_step(model, step)  # in float32, as a trained model's coefficients are
    model = model.double()
    f = folding.fold(dict(model.state_dict()), mc, step)
    src = torch.randint(4, 30, (2, 7))
    src[1, -2:] = PAD
    prev = torch.randint(4, 30, (2, 5))
    with torch.no_grad():
        memory, mask = model.encoder(src)
        want = model.decoder(prev, memory, mask)
        for stack in ("encoder", "decoder"):
            plain = build_model(dataclasses.replace(mc, residual="post_ln", ln_eps=f.eps[stack]), 30).double().eval()
            plain.load_state_dict({k: v.double() for k, v in f.params.items()})
            if stack == "encoder":
                got, _ = plain.encoder(src)
                assert torch.allclose(got, memory, rtol=0, atol=1e-12)
            else:
                assert torch.allclose(plain.decoder(prev, memory, mask), want, rtol=0, atol=1e-11)
    alpha = {"deepnorm": None, "branchnorm": step / 20, "post_ln": 1.0, "ds_init": 1.0}[scheme]
    if alpha is not None:
        assert f.scale == pytest.approx({"encoder": alpha, "decoder": alpha}, rel=1e-7)
        assert f.eps["encoder"] == f.eps["decoder"] == mc.ln_eps
    else:
        r = folding.coefficients(mc, step)
        assert f.eps == {s: mc.ln_eps / r[s][0] ** 2 for s in r} and f.scale["decoder"] == 1 / r["decoder"][0]
