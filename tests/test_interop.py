"""Conversions against the real packages (test extras, requirements-dev.txt): a torchscale 0.3.0 EncoderDecoder
and a fairseq 0.12 `transformer`, built here at tiny size, convert and give the source model's own logits (within
1e-5 relative, on a batch with padding), both for learned positions (torchscale's, from 2) and fairseq-style
sinusoids (from pad + 1) and for the source's embedding scale; a fairseq dictionary is mapped onto the
sentencepiece vocabulary; what cannot be represented or matched is refused in one line naming it. Each check
here is computed by the test from the written files, next to the tool's own printed check."""

from __future__ import annotations

import json
import os
import random
import types

import pytest
import torch

from megabranch import checkpoint
from megabranch.config import Config, ModelConfig
from megabranch.convert import build_single, fixed_batch, write_layout
from megabranch.convert import main as convert_main
from megabranch.model import build_model
from megabranch.vocab import PAD

pytestmark = pytest.mark.unit
peers = pytest.importorskip("megabranch.convert.peers")

V, D, FFN, HEADS = 40, 32, 64, 4
SPM = os.path.join(os.path.dirname(__file__), "fixtures", "old_main", "data-bin", "spm.model")  # 48 pieces


def _torchscale_or_skip():
    try:
        return peers.torchscale()
    except Exception as e:  # not installed: `make test` installs the extras
        pytest.skip(f"torchscale not importable: {e}")


def _fairseq_or_skip():
    return pytest.importorskip("fairseq", reason="fairseq-fixed not installed (requirements-dev.txt)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _ours(step_dir: str, src, prev) -> torch.Tensor:
    """The megabranch model built here from the written step directory (config and weights), on src/prev."""
    ck = checkpoint.load_checkpoint(step_dir)
    mc = ModelConfig(**ck["config"]["model"])
    model = build_single(mc, ck["vocab_size"], ck["tgt_vocab_size"], ck["model"])
    with torch.no_grad():
        return model(src, prev)


def _torchscale_model(residual_args: dict, sinusoidal: bool):
    """A real torchscale EncoderDecoder (default initialisation: non-zero biases) and its state dict."""
    ED, EDC, TE, PE = _torchscale_or_skip()
    torch.manual_seed(3)
    args = EDC(
        encoder_embed_dim=D,
        decoder_embed_dim=D,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_embed_dim=FFN,
        decoder_ffn_embed_dim=FFN,
        encoder_layers=2,
        decoder_layers=2,
        vocab_size=V,
        share_all_embeddings=True,
        dropout=0.0,
        activation_fn="relu",
        **residual_args,
    )

    def positions():
        return peers.fairseq_sinusoidal(D, PAD, 66) if sinusoidal else PE(66, D)

    model = ED(args, TE(V, D, PAD), positions(), None, positions()).eval()
    state = model.state_dict()
    if sinusoidal:  # what fairseq 0.12.2's SinusoidalPositionalEmbedding writes (fairseq-fixed no longer does)
        state.update(
            {
                "encoder.embed_positions._float_tensor": torch.zeros(1),
                "decoder.embed_positions._float_tensor": torch.zeros(1),
            }
        )
    return model, state


def _cfg_file(tmp_path, **model) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(
        json.dumps(
            {
                "model": dict(
                    encoder_layers=2, decoder_layers=2, d_model=D, n_heads=HEADS, ffn_dim=FFN, dropout=0.0, **model
                )
            }
        )
    )
    return str(path)


def _checks(out: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith("check (") and "source model" in x]


def test_torchscale_learned_positions_deepnorm_import_and_export(tmp_path, capsys):
    _, state = _torchscale_model(dict(deepnorm=True), sinusoidal=False)
    model, _ = _torchscale_model(dict(deepnorm=True), sinusoidal=False)
    src_pt, out, back = str(tmp_path / "ts.pt"), str(tmp_path / "imported"), str(tmp_path / "back.pt")
    torch.save({"model": state}, src_pt)
    assert (
        convert_main([src_pt, out, "--from", "torchscale", "--config", _cfg_file(tmp_path, residual="deepnorm")]) == 0
    )
    text = capsys.readouterr().out
    assert "model.positions=learned model.position_offset=2 model.max_positions=64 model.embed_scale=1 " in text
    assert len(_checks(text)) == 1 and _checks(text)[0].endswith("OK"), text
    # independently: torchscale's own forward (with the source padding mask) against the model built from disk
    src, prev = fixed_batch(V, V, 64)
    keep = prev.ne(PAD)
    theirs = peers.torchscale_logits(model, src, prev, PAD)
    assert _rel(theirs[keep], _ours(out, src, prev)[keep]) < 1e-5
    # what torchscale's defaults would be under megabranch's old conventions: positions from 0, scale sqrt(d)
    ck = checkpoint.load_checkpoint(out)
    for wrong in (dict(position_offset=0), dict(embed_scale=D**0.5)):
        mc = ModelConfig(**{**ck["config"]["model"], **wrong})
        if "position_offset" in wrong:  # the learned table keeps its rows: index it from 0
            mc.max_positions = 66
        with torch.no_grad():
            bad = build_single(mc, V, V, ck["model"])(src, prev)
        assert _rel(theirs[keep], bad[keep]) > 1e-2, wrong  # what the check now catches
    # export back to torchscale names: the same check, and the file loads into torchscale strictly
    assert convert_main([out, back, "--to", "torchscale"]) == 0
    assert _checks(capsys.readouterr().out)[0].endswith("OK")
    exported = torch.load(back, weights_only=True)
    assert set(exported) == set(state) and all(torch.equal(exported[k], state[k]) for k in state)


def test_torchscale_fairseq_sinusoids_and_the_embedding_scale(tmp_path, capsys):
    _fairseq_or_skip()
    post_ln = dict(deepnorm=False, subln=False, encoder_normalize_before=False, decoder_normalize_before=False)
    model, state = _torchscale_model(dict(post_ln, no_scale_embedding=False), sinusoidal=True)
    src_pt, out = str(tmp_path / "ts.pt"), str(tmp_path / "imported")
    torch.save(state, src_pt)
    cfg = _cfg_file(tmp_path, residual="post_ln")
    source_args = json.dumps(dict(post_ln, no_scale_embedding=False))
    assert convert_main([src_pt, out, "--from", "torchscale", "--config", cfg, "--source-args", source_args]) == 0
    text = capsys.readouterr().out
    assert f"model.positions=sinusoidal model.position_offset={PAD + 1}" in text and f"embed_scale={D**0.5:g}" in text
    assert _checks(text)[0].endswith("OK"), text
    src, prev = fixed_batch(V, V, 64)
    keep = prev.ne(PAD)
    assert _rel(peers.torchscale_logits(model, src, prev, PAD)[keep], _ours(out, src, prev)[keep]) < 1e-5
    # a config that contradicts the source's arguments is refused naming the field
    with pytest.raises(SystemExit) as e:
        convert_main(
            [
                src_pt,
                str(tmp_path / "x"),
                "--from",
                "torchscale",
                "--config",
                cfg,
                "--source-args",
                source_args,
                "--set",
                "model.embed_scale=1.0",
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "model.embed_scale=1" in err and "no_scale_embedding" in err
    # without its arguments a state dict does not say its scale: torchscale's default (1) is assumed, and said
    assert convert_main([src_pt, str(tmp_path / "y"), "--from", "torchscale", "--config", cfg]) == 0
    assert "no --source-args: torchscale's defaults assumed" in capsys.readouterr().out


def test_torchscale_subln_import_export_and_logits(tmp_path, capsys):
    """model.residual=subln is torchscale 0.3.0's subln (Magneto): Pre-LN with a LayerNorm before each
    self-attention's out_proj and before each fc2, none in the cross-attention. A real torchscale EncoderDecoder,
    its norms moved off 1 / 0 so a mis-mapped one shows, imports, gives torchscale's own logits, and exports back
    to exactly its state dict; a scheme torchscale cannot hold is refused in one line before anything is written."""
    subln = dict(subln=True, deepnorm=False, encoder_normalize_before=True, decoder_normalize_before=True)
    model, state = _torchscale_model(subln, sinusoidal=False)
    assert any("inner_attn_ln" in k for k in state) and not any("encoder_attn.inner_attn_ln" in k for k in state)
    g = torch.Generator().manual_seed(0)
    state = {
        k: v + 0.1 * torch.randn(v.shape, generator=g) if ("ln" in k or "layernorm" in k or "layer_norm" in k) else v
        for k, v in state.items()
    }
    model.load_state_dict(state)
    src_pt, out, back = str(tmp_path / "ts.pt"), str(tmp_path / "imported"), str(tmp_path / "back.pt")
    torch.save({"model": state}, src_pt)
    assert convert_main([src_pt, out, "--from", "torchscale", "--config", _cfg_file(tmp_path, residual="subln")]) == 0
    assert _checks(capsys.readouterr().out)[0].endswith("OK")
    src, prev = fixed_batch(V, V, 64)
    keep = prev.ne(PAD)
    assert _rel(peers.torchscale_logits(model, src, prev, PAD)[keep], _ours(out, src, prev)[keep]) < 1e-5
    assert convert_main([out, back, "--to", "torchscale"]) == 0
    assert _checks(capsys.readouterr().out)[0].endswith("OK")
    exported = torch.load(back, weights_only=True)
    assert set(exported) == set(state) and all(torch.equal(exported[k], state[k]) for k in state)
    # the same weights read as pre_ln lose the inner norms: the check names the unmapped tensors' difference
    ck = checkpoint.load_checkpoint(out)
    mc = ModelConfig(**{**ck["config"]["model"], "residual": "pre_ln"})
    with torch.no_grad():
        plain = build_single(
            mc, V, V, {k: v for k, v in ck["model"].items() if "inner_norm" not in k and "hidden_norm" not in k}
        )(src, prev)
    assert _rel(peers.torchscale_logits(model, src, prev, PAD)[keep], plain[keep]) > 1e-2
    cfg = Config.from_dict({"model": {**json.load(open(_cfg_file(tmp_path, residual="rezero")))["model"]}})
    made = write_layout(
        str(tmp_path / "rezero"),
        cfg,
        {"vocab_size": V, "tgt_vocab_size": V, "step": 0},
        dict(build_model(cfg.model, V, seed=0).named_parameters()),
        None,
        1,
        1,
        1,
    )
    with pytest.raises(SystemExit) as e:
        convert_main([made, str(tmp_path / "x.pt"), "--to", "torchscale"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "model.residual=rezero" in err
    assert not os.path.exists(tmp_path / "x.pt")


def test_what_torchscale_has_and_megabranch_does_not_is_refused_by_name(tmp_path, capsys):
    _, state = _torchscale_model(dict(deepnorm=True, layernorm_embedding=True), sinusoidal=False)
    src_pt = str(tmp_path / "ts.pt")
    torch.save(state, src_pt)
    with pytest.raises(SystemExit) as e:
        convert_main(
            [src_pt, str(tmp_path / "x"), "--from", "torchscale", "--config", _cfg_file(tmp_path, residual="deepnorm")]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "layernorm_embedding" in err
    _, state = _torchscale_model(dict(deepnorm=True), sinusoidal=False)
    torch.save(state, src_pt)
    with pytest.raises(SystemExit) as e:
        convert_main(
            [
                src_pt,
                str(tmp_path / "y"),
                "--from",
                "torchscale",
                "--config",
                _cfg_file(tmp_path, residual="branchnorm"),
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "model.residual=branchnorm" in err


# --- fairseq -------------------------------------------------------------------------------------------------


def _fairseq_checkpoint(tmp_path, extra_args=()):
    """A real fairseq transformer (built by fairseq from its own argument parser, on a fairseq Dictionary of the
    fixture's sentencepiece pieces in fairseq's frequency order, padded with madeupword fillers), saved the way
    fairseq's Trainer saves it."""
    _fairseq_or_skip()
    from fairseq import checkpoint_utils, options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models.transformer import TransformerModel
    from omegaconf import OmegaConf

    from megabranch.data.tokenizer import Tokenizer

    tok = Tokenizer(SPM)
    dic = Dictionary()
    rng = random.Random(0)
    for i in range(4, tok.vocab_size):
        dic.add_symbol(tok.id_to_piece(i), n=rng.randint(1, 100))
    dic.finalize(padding_factor=8)
    dict_path = str(tmp_path / "dict.txt")
    dic.save(dict_path)
    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [
            str(tmp_path),
            "--task",
            "translation",
            "--arch",
            "transformer",
            "--share-all-embeddings",
            "--encoder-layers",
            "2",
            "--decoder-layers",
            "2",
            "--encoder-embed-dim",
            str(D),
            "--decoder-embed-dim",
            str(D),
            "--encoder-ffn-embed-dim",
            str(FFN),
            "--decoder-ffn-embed-dim",
            str(FFN),
            "--encoder-attention-heads",
            str(HEADS),
            "--decoder-attention-heads",
            str(HEADS),
            *extra_args,
        ],
    )
    torch.manual_seed(5)
    model = TransformerModel.build_model(args, types.SimpleNamespace(source_dictionary=dic, target_dictionary=dic))
    with torch.no_grad():  # non-zero biases and LayerNorms, so a mis-mapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    sd = dict(model.state_dict())  # (holds fairseq's encoder.version / decoder.version buffers)
    if "encoder.embed_positions.weight" not in sd:  # fairseq 0.12.2's sinusoids write it (fairseq-fixed does not)
        sd["encoder.embed_positions._float_tensor"] = torch.zeros(1)
    state = {
        "args": None,
        "cfg": OmegaConf.to_container(convert_namespace_to_omegaconf(args), resolve=True, enum_to_str=True),
        "model": sd,
        "optimizer_history": [],
    }
    path = str(tmp_path / "checkpoint_last.pt")
    checkpoint_utils.torch_persistent_save(state, path)
    return model.eval(), dic, dict_path, path, tok


def test_fairseq_transformer_import_maps_the_dictionary(tmp_path, capsys):
    model, dic, dict_path, path, tok = _fairseq_checkpoint(tmp_path, ["--encoder-learned-pos", "--decoder-learned-pos"])
    out = str(tmp_path / "imported")
    assert convert_main([path, out, "--from", "fairseq", "--fairseq-dict", dict_path, "--spm", SPM]) == 0
    text = capsys.readouterr().out
    assert "model.positions=learned model.position_offset=2" in text and f"embed_scale={D**0.5:g}" in text
    assert "model.residual=post_ln" in text and _checks(text)[0].endswith("OK"), text
    # independently: fairseq's forward in its own ids vs megabranch's in sentencepiece ids, columns mapped
    to_fs = torch.tensor(
        [
            dic.index(tok.id_to_piece(i)) if i > 3 else (dic.pad(), dic.unk(), dic.bos(), dic.eos())[i]
            for i in range(tok.vocab_size)
        ]
    )
    assert to_fs[PAD] == 1 and to_fs[2] == 0  # fairseq: <s> 0, <pad> 1; megabranch: pad 0, bos 2
    src, prev = fixed_batch(tok.vocab_size, tok.vocab_size, 64)
    keep = prev.ne(PAD)
    with torch.no_grad():
        theirs = model(to_fs[src], to_fs[src].ne(1).sum(1), to_fs[prev])[0].index_select(-1, to_fs)
    assert _rel(theirs[keep], _ours(out, src, prev)[keep]) < 1e-5
    # a dictionary that lacks one of the sentencepiece pieces cannot be matched: one line naming the piece
    lines = open(dict_path).read().splitlines()
    missing = lines[0].split()[0]
    open(dict_path, "w").write("\n".join(lines[1:]) + "\n")
    with pytest.raises(SystemExit) as e:
        convert_main([path, str(tmp_path / "x"), "--from", "fairseq", "--fairseq-dict", dict_path, "--spm", SPM])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and repr(missing) in err


def test_fairseq_sinusoidal_positions_and_an_unrepresentable_argument(tmp_path, capsys):
    model, dic, dict_path, path, tok = _fairseq_checkpoint(tmp_path)
    out = str(tmp_path / "imported")
    assert convert_main([path, out, "--from", "fairseq", "--fairseq-dict", dict_path, "--spm", SPM]) == 0
    text = capsys.readouterr().out
    assert "model.positions=sinusoidal model.position_offset=2" in text and _checks(text)[0].endswith("OK"), text
    os.makedirs(tmp_path / "ln")
    _, _, dict2, path2, _ = _fairseq_checkpoint(tmp_path / "ln", ["--layernorm-embedding"])
    capsys.readouterr()  # fairseq's own warnings while building it
    with pytest.raises(SystemExit) as e:
        convert_main([path2, str(tmp_path / "x"), "--from", "fairseq", "--fairseq-dict", dict2, "--spm", SPM])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "layernorm_embedding" in err
