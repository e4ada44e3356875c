"""The residual schemes of the BranchNorm paper's tables, each a choice of model.residual of the one Transformer,
against what defines it: the real packages where they install (torchscale's Sub-LN: tests/test_interop.py;
fairseq's NormFormer decoder layer, the Admin authors' admin-torch, the rezero package), a float64 transcription
of the papers' equations (tests/helpers/scheme_reference.py) for every scheme's forward, and the papers' formulas
for the initialisations and Admin's profiling."""

from __future__ import annotations

import math

import pytest
import torch

from megabranch.config import RESIDUALS
from megabranch.model import build_model
from megabranch.model.layers import DecoderLayer, EncoderLayer
from megabranch.residual import set_step
from megabranch.vocab import PAD
from tests.helpers.configs import tiny_model_cfg
from tests.helpers.scheme_reference import admin_omegas, reference_logits

pytestmark = pytest.mark.unit

V = 40


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (3, 7), generator=g)
    prev = torch.randint(4, V, (3, 6), generator=g)
    src[0, 5:] = PAD
    src[2, 3:] = PAD
    prev[1, 4:] = PAD
    return src, prev


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@torch.no_grad()
def _perturb(model, seed: int = 1) -> None:
    """Move every parameter off its initial value (zero-initialised branches, unit scales, mean combinations),
    so each scheme's every term shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.2 * torch.randn(p.shape, generator=g) * (p.abs().mean() if p.abs().mean() > 0 else 1.0) + 0.05)


@pytest.mark.parametrize("residual", RESIDUALS)
def test_every_scheme_matches_the_float64_transcription_of_its_equations(residual):
    cfg = tiny_model_cfg(residual=residual, encoder_layers=3, decoder_layers=3, alpha_warmup_steps=10)
    model = build_model(cfg, V, seed=3).eval()
    set_step(model, 4)  # BranchNorm's alpha_t = 0.4
    _perturb(model)
    src, prev = _batch()
    with torch.no_grad():
        ours = model(src, prev)
    ref = reference_logits(dict(model.named_parameters()), cfg, src, prev, alpha_t=0.4)
    assert _rel(ours, ref) < 1e-5, residual


def _bound(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape
    return math.sqrt(6.0 / (fan_in + fan_out))


def _linear_gains(model) -> dict:
    """name -> max |W| / the plain Xavier bound (q/k/v carry fairseq's 1/sqrt(2))."""
    out = {}
    for name, w in model.named_parameters():
        if name.endswith(("proj.weight", "fc1.weight", "fc2.weight")) and "embed" not in name:
            plain = _bound(w) / (
                math.sqrt(2) if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) else 1
            )
            out[name] = float(w.abs().max()) / plain
    return out


def _expected_gain(residual: str, name: str, n: int, m: int) -> float:
    """The papers' factors on the Xavier initialisation, written out here on their own."""
    stack, layer = name.split(".")[0], int(name.split(".")[2]) + 1
    tail = name.split(".")[-2]
    if residual == "ds_init":  # Zhang et al. 2019a, Eq. 9: gamma = sqrt(6 / (d_i + d_o)) / sqrt(l)
        return 1 / math.sqrt(layer)
    if residual == "r_fixup":  # Fixup: each branch's last layer 0, q/k/v x L^(-1/6), fc1 x L^(-1/2), L = 2N + 3M
        big_l = 2 * n + 3 * m
        return {"out_proj": 0.0, "fc2": 0.0, "fc1": big_l**-0.5}.get(tail, big_l ** (-1 / 6))
    if residual == "t_fixup":  # Huang et al. 2020: v, w, FFN x 0.67 N^(-1/4) (encoder), (9M)^(-1/4) (decoder)
        if tail in ("q_proj", "k_proj"):
            return 1.0
        return 0.67 * n**-0.25 if stack == "encoder" else (9 * m) ** -0.25
    if residual == "subln":  # Magneto, as torchscale: v, out, FFN x gamma; the decoder's cross-attention not
        if tail in ("q_proj", "k_proj") or ".cross_attn." in name:
            return 1.0
        if stack == "encoder":
            return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3)
        return math.sqrt(math.log(3 * m))
    return 1.0


@pytest.mark.parametrize(
    "residual", ["ds_init", "r_fixup", "t_fixup", "subln", "rezero", "admin", "dlcl", "normformer"]
)
def test_initialisations_follow_the_papers(residual):
    n, m = 4, 3
    cfg = tiny_model_cfg(
        residual=residual,
        encoder_layers=n,
        decoder_layers=m,
        d_model=64,
        ffn_dim=128,
        n_heads=4,
        share_all_embeddings=False,
        share_decoder_input_output_embed=False,
    )
    model = build_model(cfg, 200, seed=0)
    for name, gain in _linear_gains(model).items():
        want = _expected_gain(residual, name, n, m)
        # the largest of 4k+ uniform draws is within 1% of the bound
        assert want * 0.97 <= gain <= want + 1e-6, (
            f"{residual}: {name} initialised at {gain:.4f} x Xavier, want {want:.4f}"
        )
    params = dict(model.named_parameters())
    table_std = float(params["encoder.embed.table.weight"][1:].std())
    want_std = 64**-0.5 * ((9 * m) ** -0.25 if residual == "t_fixup" else 1.0)  # T-Fixup scales x and y embeddings
    assert abs(table_std / want_std - 1) < 0.05, residual
    if residual == "r_fixup":  # Fixup's rule 1: the classification layer starts at 0
        assert float(params["decoder.output.weight"].abs().max()) == 0.0
    scalars = {"rezero": ("residual_weight", 0.0), "admin": ("omega", 1.0), "normformer": ("head_scale", 1.0)}
    if residual in scalars:
        suffix, value = scalars[residual]
        found = [p for k, p in params.items() if k.endswith(suffix)]
        assert found and all(torch.all(p == value) for p in found)
    if residual == "dlcl":  # each row of the combination starts at the mean of its entries (Wang et al.'s default)
        rows = [p for k, p in params.items() if k.endswith("combine.weight")]
        assert len(rows) == n + m + 2 and all(torch.allclose(r, torch.full_like(r, 1 / len(r))) for r in rows)


def _torchscale_or_skip():
    peers = pytest.importorskip("megabranch.convert.peers")
    try:
        return peers.torchscale()
    except Exception as e:  # not installed
        pytest.skip(f"torchscale not importable: {e}")


def _torchscale_params(n: int, m: int, subln: bool, deepnorm: bool, pre_ln: bool) -> dict:
    """A torchscale 0.3.0 EncoderDecoder's parameters (d=32, seed 0), so two builds differ only by their options."""
    ed, edc, te, pe = _torchscale_or_skip()
    torch.manual_seed(0)
    args = edc(
        encoder_embed_dim=32,
        decoder_embed_dim=32,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_embed_dim=64,
        decoder_ffn_embed_dim=64,
        encoder_layers=n,
        decoder_layers=m,
        vocab_size=V,
        subln=subln,
        deepnorm=deepnorm,
        encoder_normalize_before=pre_ln,
        decoder_normalize_before=pre_ln,
    )
    return dict(ed(args, te(V, 32, PAD), pe(66, 32), te(V, 32, PAD), pe(66, 32)).named_parameters())


def test_subln_gains_are_torchscales():
    """torchscale 0.3.0 built twice from one seed, with and without subln: its weights differ by exactly the
    factors megabranch's init applies (encoder and decoder, the cross-attention unscaled)."""
    n, m = 4, 3
    with_subln, plain = (_torchscale_params(n, m, subln=s, deepnorm=False, pre_ln=True) for s in (True, False))
    for name in (
        "encoder.layers.2.ffn.fc1.weight",
        "encoder.layers.0.self_attn.v_proj.weight",
        "decoder.layers.1.self_attn.out_proj.weight",
        "decoder.layers.2.ffn.fc2.weight",
        "decoder.layers.0.encoder_attn.v_proj.weight",
    ):
        ratio = float((with_subln[name] / plain[name]).mean())
        ours = _expected_gain("subln", name.replace("encoder_attn", "cross_attn"), n, m)
        assert ratio == pytest.approx(ours, rel=1e-6), name


def test_deepnorm_torchscale_beta_is_torchscales():
    """torchscale 0.3.0 built twice from one seed, with and without deepnorm: its encoder weights differ by
    1.15 (N^4 M)^(-1/16), which model.deepnorm_beta=torchscale gives megabranch's; the paper's is 0.87 (...)."""
    n, m = 4, 3

    def ours(beta, init):
        cfg = tiny_model_cfg(
            residual="deepnorm", encoder_layers=n, decoder_layers=m, deepnorm_init=init, deepnorm_beta=beta
        )
        return dict(build_model(cfg, V, seed=3).named_parameters())

    with_deepnorm, without = (_torchscale_params(n, m, subln=False, deepnorm=d, pre_ln=False) for d in (True, False))
    ts_ratio = {
        k: float((w / without[k]).mean())
        for k, w in with_deepnorm.items()
        if k.endswith(("v_proj.weight", "fc2.weight"))
    }
    plain, paper, ts = ours("paper", False), ours("paper", True), ours("torchscale", True)
    for name in (
        "encoder.layers.2.ffn.fc2.weight",
        "encoder.layers.0.self_attn.v_proj.weight",
        "decoder.layers.1.ffn.fc2.weight",
        "decoder.layers.0.self_attn.v_proj.weight",
    ):
        want, k = ts_ratio[name], name.replace(".ffn.", ".ffn.block.").replace(".self_attn.", ".self_attn.block.")
        assert float((ts[k] / plain[k]).mean()) == pytest.approx(want, rel=1e-6), name
        if name.startswith("encoder."):
            assert want == pytest.approx(1.15 * (n**4 * m) ** (-1 / 16), rel=1e-6)
            assert float((paper[k] / plain[k]).mean()) == pytest.approx(0.87 * (n**4 * m) ** (-1 / 16), rel=1e-6)
        else:  # the decoder's beta is the same in both
            assert torch.equal(ts[k], paper[k])


def test_admin_profiling_is_the_authors_recursion():
    """The first training forward profiles: omega_1 = 1, omega_{i+1} = sqrt(Var[omega_i x_i] + Var[F_i(x_i)]) per
    stack in the model's order (the authors' code; the paper's sqrt(sum of the earlier branch variances) up to the
    embedding's term), computed here in float64 by the transcription; admin-torch 0.1.0's closed form
    (output_change_scale O(log n)) is a different value, which megabranch does not use."""
    admin_torch = pytest.importorskip("admin_torch")
    cfg = tiny_model_cfg(residual="admin", encoder_layers=3, decoder_layers=3)
    model = build_model(cfg, V, seed=5).train()
    src, prev = _batch(2)
    want = admin_omegas(dict(model.named_parameters()), cfg, src, prev)
    model(src, prev)  # training mode, step 0: profiles on this batch first
    got = {k: float(p[0]) for k, p in model.named_parameters() if k.endswith("omega")}
    assert set(got) == set(want) and len(got) == 2 * 3 + 3 * 3
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
        assert torch.all(dict(model.named_parameters())[k] == got[k])  # one value per vector, as initialised
    assert got["encoder.layers.0.self_attn.omega"] == 1.0 and got["encoder.layers.2.ffn.omega"] > 1.5
    closed_form = admin_torch.calculate_init(2 * 3)
    assert abs(closed_form - got["encoder.layers.2.ffn.omega"]) > 1e-3
    before = {k: p.clone() for k, p in model.named_parameters()}
    model(src, prev)  # profiled once per process: the next forward leaves omega alone
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())


def test_admin_residual_is_admin_torchs_omega_residual():
    """An Admin layer is LN(omega * x + F(x)) per sub-layer: admin-torch's OmegaResidual (a learned vector, its
    as_parameter form) around megabranch's own blocks and norms gives the same output."""
    admin_torch = pytest.importorskip("admin_torch")
    cfg = tiny_model_cfg(residual="admin")
    torch.manual_seed(0)
    enc, dec = EncoderLayer(cfg).eval(), DecoderLayer(cfg).eval()
    for layer in (enc, dec):
        for p in layer.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    one = torch.ones(())

    def theirs(res, h, **kw):
        omega = admin_torch.as_module(6, as_parameter=True, embed_dim=32)
        with torch.no_grad():
            omega.omega.copy_(res.omega)
        return res.norm(omega(h, res.block(h, **kw)))

    with torch.no_grad():
        h = theirs(enc.self_attn, x)
        assert _rel(enc(x, one, one), theirs(enc.ffn, h)) < 1e-6
        h = theirs(dec.self_attn, x, causal=True)
        h = theirs(dec.cross_attn, h, memory=mem)
        assert _rel(dec(x, one, one, mem), theirs(dec.ffn, h)) < 1e-6


def test_rezero_matches_the_rezero_package():
    """ReZero: megabranch's embeddings and output projection around the rezero package's RZTXEncoderLayer /
    RZTXDecoderLayer (one resweight per layer, as megabranch's a_l), loaded with megabranch's weights: the same
    logits on a padded batch."""
    rztx = pytest.importorskip("rezero.transformer.rztx")
    cfg = tiny_model_cfg(residual="rezero", encoder_layers=2, decoder_layers=2)
    model = build_model(cfg, V, seed=2).eval()
    _perturb(model)
    src, prev = _batch(3)
    p = dict(model.named_parameters())

    def load(layer, name, attn_names):
        with torch.no_grad():
            for theirs, ours in attn_names:
                mha = getattr(layer, theirs)
                blk = f"{name}.{ours}.block"
                mha.in_proj_weight.copy_(torch.cat([p[f"{blk}.{k}_proj.weight"] for k in "qkv"]))
                mha.in_proj_bias.copy_(torch.cat([p[f"{blk}.{k}_proj.bias"] for k in "qkv"]))
                mha.out_proj.weight.copy_(p[f"{blk}.out_proj.weight"])
                mha.out_proj.bias.copy_(p[f"{blk}.out_proj.bias"])
            for theirs, ours in (("linear1", "fc1"), ("linear2", "fc2")):
                getattr(layer, theirs).weight.copy_(p[f"{name}.ffn.block.{ours}.weight"])
                getattr(layer, theirs).bias.copy_(p[f"{name}.ffn.block.{ours}.bias"])
            layer.resweight.copy_(p[f"{name}.residual_weight"])
        return layer.eval()

    enc = [
        load(rztx.RZTXEncoderLayer(32, 4, 64, dropout=0.0), f"encoder.layers.{i}", [("self_attn", "self_attn")])
        for i in range(2)
    ]
    dec = [
        load(
            rztx.RZTXDecoderLayer(32, 4, 64, dropout=0.0),
            f"decoder.layers.{i}",
            [("self_attn", "self_attn"), ("multihead_attn", "cross_attn")],
        )
        for i in range(2)
    ]
    with torch.no_grad():
        x = model.encoder.embed(src).transpose(0, 1)  # (S, B, d): torch's sequence-first layout
        for layer in enc:
            x = layer(x, src_key_padding_mask=src.eq(PAD))
        y = model.decoder.embed(prev).transpose(0, 1)
        causal = torch.full((prev.shape[1],) * 2, float("-inf")).triu(1)
        for layer in dec:
            y = layer(y, x, tgt_mask=causal, memory_key_padding_mask=src.eq(PAD))
        theirs = model.decoder.output(y.transpose(0, 1))
        assert _rel(model(src, prev), theirs) < 1e-5


def test_normformer_decoder_layer_matches_fairseqs():
    """fairseq 0.12's decoder layer with scale_attn (LN after self-attention) and scale_fc (LN after the FFN
    activation), pre-norm, holding megabranch's weights: the same output as megabranch's NormFormer decoder layer.
    fairseq's scale_heads multiplies head-sized blocks of the self-attention's output *after* out_proj, not each
    head before it as the paper's HeadScale does, so it is left off here (megabranch's head scales at 1; the
    float64 transcription holds them to the paper); fairseq's encoder layer has none of the three options."""
    pytest.importorskip("fairseq")
    from fairseq.models.transformer import TransformerConfig
    from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

    cfg = tiny_model_cfg(residual="normformer")
    fcfg = TransformerConfig()
    fcfg.decoder.embed_dim, fcfg.decoder.ffn_embed_dim, fcfg.decoder.attention_heads = 32, 64, 4
    fcfg.decoder.normalize_before, fcfg.encoder.embed_dim, fcfg.dropout = True, 32, 0.0
    fcfg.scale_attn, fcfg.scale_fc = True, True
    theirs = TransformerDecoderLayerBase(fcfg).eval()
    torch.manual_seed(1)
    ours = DecoderLayer(cfg).eval()
    with torch.no_grad():
        for name, q in ours.named_parameters():
            q.copy_(torch.randn_like(q) * 0.3 + (1.0 if name.endswith("head_scale") else 0.0))
        ours.self_attn.block.head_scale.fill_(1.0)
        names = {
            "self_attn.block.": "self_attn.",
            "self_attn.norm.": "self_attn_layer_norm.",
            "self_attn.block.output_norm.": "attn_ln.",
            "cross_attn.block.": "encoder_attn.",
            "cross_attn.norm.": "encoder_attn_layer_norm.",
            "ffn.block.hidden_norm.": "ffn_layernorm.",
            "ffn.block.": "",
            "ffn.norm.": "final_layer_norm.",
        }
        mine = dict(ours.named_parameters())
        for name, t in theirs.named_parameters():
            src = next(
                o + name[len(f) :]
                for o, f in sorted(names.items(), key=lambda kv: -len(kv[1]))
                if name.startswith(f) and o + name[len(f) :] in mine
            )
            t.copy_(mine[src])
        x, mem = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
        mem_mask = torch.zeros(2, 7, dtype=torch.bool)
        mem_mask[1, 5:] = True
        one = torch.ones(())
        fs, _, _ = theirs(
            x.transpose(0, 1), mem.transpose(0, 1), mem_mask, self_attn_mask=torch.full((5, 5), float("-inf")).triu(1)
        )
        assert _rel(ours(x, one, one, mem, ~mem_mask), fs.transpose(0, 1)) < 1e-5


def _saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves for the backward while `fn` runs, and fn's result."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("lo,hi", [(0, 5), (2, 6), (5, 8), (9, 12)])
def test_dlcl_histories_are_what_travels_and_what_the_planner_counts(lo, hi):
    """A DLCL slice receives and sends its stacks' histories in the shapes Span.message_shapes gives (the
    executor's receive buffers); the planner's DLCL extra memory (CostModel.history_bytes) is within 15% of the
    bytes autograd really saves beyond Pre-LN on the same slice, and its sent bytes are the history's."""
    from megabranch.model import Span, Transformer
    from megabranch.parallel.layout import Chunk
    from megabranch.planning.cost_model import CostModel

    b, s, t, d = 4, 24, 20, 32
    measured, planned = {}, {}
    span = Span.of_layers(lo, hi, 6, 6)
    for residual in ("pre_ln", "dlcl"):
        cfg = tiny_model_cfg(residual=residual, encoder_layers=6, decoder_layers=6)
        model = Transformer(cfg, V, span=span, seed=0).train()
        src, prev = torch.randint(4, V, (b, s)), torch.randint(4, V, (b, t))
        inputs = [
            torch.randn(shape, requires_grad=True)
            for shape in span.message_shapes(True, b, s, t, d, residual == "dlcl")
        ]
        measured[residual], out = _saved_bytes(lambda: model(src, prev, *inputs))
        if not span.output:  # (the last slice returns the logits)
            assert [tuple(o.shape) for o in out] == span.message_shapes(False, b, s, t, d, residual == "dlcl")
        cm = CostModel(cfg, V, tokens=b * t, src_len=s, tgt_len=t)
        chunk = Chunk.of_layers(lo, hi, 6, 6)
        planned[residual] = (cm.chunk_activation_bytes(chunk), cm.message_bytes(chunk))
    extra, planned_extra = measured["dlcl"] - measured["pre_ln"], planned["dlcl"][0] - planned["pre_ln"][0]
    assert extra > 0 and abs(planned_extra / extra - 1) < 0.15, (extra, planned_extra)
    entries = [shape[0] for shape in span.message_shapes(False, b, s, t, d, True) if len(shape) == 4]
    history = sum(entries) - len(entries)  # what DLCL sends beyond the one hidden per stack
    per_entry = (t if span.runs_decoder else s) * b * d * 4
    assert planned["dlcl"][1] - planned["pre_ln"][1] == history * per_entry


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["--set", "model.residual=t_fixup", "--set", "model.deepnorm_init=true"],
            "model.deepnorm_init=True is invalid: must be unset or false with model.residual=t_fixup",
        ),
        (
            [
                "--set",
                "model.residual=dlcl",
                "--set",
                "parallel.pp=2",
                "--backend",
                "deepspeed",
                "--dry-run",
                "--vocab",
                "64",
                "--deepspeed_config",
                "launch/configs/ds_fp32.json",
            ],
            "model.residual=dlcl is not supported by --backend deepspeed",
        ),
        (
            [
                "--set",
                "model.residual=admin",
                "--set",
                "parallel.pp=2",
                "--backend",
                "deepspeed",
                "--dry-run",
                "--vocab",
                "64",
                "--deepspeed_config",
                "launch/configs/ds_fp32.json",
            ],
            "model.residual=admin is not supported by --backend deepspeed",
        ),
    ],
)
def test_a_scheme_with_an_option_it_does_not_take_is_one_line_and_exit_2(args, needle, capsys):
    from megabranch.train import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_dry_run_counts_dlcls_history_per_stage(capsys):
    """--dry-run's plan for the same 12L-12L pipeline: DLCL sends more than Pre-LN from every stage but the last
    and keeps more per micro-batch on every stage, by what CostModel.history_bytes / message_bytes say."""
    from megabranch.config import load_config
    from megabranch.dry_run import dry_run

    info = {}
    for residual in ("pre_ln", "dlcl"):
        cfg = load_config(
            None,
            [
                f"model.residual={residual}",
                "model.encoder_layers=12",
                "model.decoder_layers=12",
                "parallel.pp=4",
                "data.max_tokens=2048",
            ],
        )
        info[residual] = dry_run(cfg, vocab=8000)
        text = capsys.readouterr().out
        assert "sent/mb MB" in text
    pre, dense = info["pre_ln"], info["dlcl"]
    assert all(a < b for a, b in zip(pre["sent_bytes"][:-1], dense["sent_bytes"][:-1]))
    assert pre["sent_bytes"][-1] == dense["sent_bytes"][-1] == 0
    assert all(a < b for a, b in zip(pre["peak_bytes"], dense["peak_bytes"]))


def test_new_parameters_reshard_by_name(tmp_path):
    """The schemes' new tensors (NormFormer's head scales split with the heads, DLCL's rows and output
    combination, R-Fixup's and Admin's scalars and vectors) written as a tp 2 x pp 2 step directory, cut in the
    middle of both stacks, consolidate back to exactly the single-process tensors."""
    from megabranch import checkpoint
    from megabranch.config import Config
    from megabranch.convert import rank_params, write_layout

    for residual in ("normformer", "dlcl", "r_fixup", "admin", "rezero", "subln"):
        cfg = Config()
        cfg.model = tiny_model_cfg(residual=residual, encoder_layers=3, decoder_layers=3)
        model = build_model(cfg.model, V, seed=0)
        _perturb(model)
        full = {k: v.detach().clone() for k, v in model.named_parameters()}
        _, ranks, _ = rank_params(cfg, V, V, 2, 2, 1, "E0-1|E2,D0-2")
        scales = [q for params in ranks.values() for n, q in params.items() if n.endswith("head_scale")]
        assert all(q.tp_split_dim == 0 and q.shape[0] == 2 for q in scales) and (residual != "normformer" or scales)
        out = write_layout(
            str(tmp_path / residual),
            cfg,
            {"vocab_size": V, "tgt_vocab_size": V, "step": 3},
            full,
            None,
            2,
            2,
            1,
            "E0-1|E2,D0-2",
        )
        back, _ = checkpoint.consolidate(out)
        assert set(back) == set(full), residual
        assert all(torch.equal(back[k], full[k]) for k in full), residual


@pytest.mark.slow
def test_regional_compile_runs_the_new_layer_code_in_one_graph_per_layer_kind():
    """model.compile's per-layer fullgraph compile (aot_eager here: the graphs, not inductor's kernels) gives the
    eager forward and gradients for every scheme that changes a layer's code (ds_init and t_fixup change only the
    initialisation), Admin's profiling pass included."""
    from megabranch.model.regional_compile import compile_layers

    for residual in ("admin", "rezero", "r_fixup", "dlcl", "normformer", "subln"):
        torch._dynamo.reset()  # one scheme per process in a real run: no recompile limit across schemes
        cfg = tiny_model_cfg(residual=residual)
        eager, compiled = build_model(cfg, V, seed=0).train(), build_model(cfg, V, seed=0).train()
        # static shapes: one batch, and each scheme's layer code in a graph is the point (symbolic shapes trace
        # 5-7x longer; they are checked on varying batches in test_compile.py and test_sequence_parallel.py)
        assert compile_layers(compiled, "aot_eager", torch.device("cpu"), False, dynamic=False) == 4
        src, prev = _batch(4)
        a, b = eager(src, prev), compiled(src, prev)
        (a.square().mean()).backward()
        (b.square().mean()).backward()
        assert _rel(b, a) < 1e-6, residual
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.grad is None or not p.grad.any():  # (ReZero at init: the encoder does not reach the loss yet)
                assert q.grad is None or not q.grad.any(), (residual, name)
            elif not name.endswith("k_proj.bias"):  # 0 in exact arithmetic (softmax's shift invariance): noise only
                assert _rel(q.grad, p.grad) < 1e-5, (residual, name)


@pytest.mark.parametrize("residual", RESIDUALS)
def test_the_analyses_measure_every_scheme(residual):
    """megabranch.analysis (adjacent-layer cosine, FFN activity, per-layer gradient norms) on every scheme: one
    number per layer and stack; DLCL's layers are measured on their combined input, R-Fixup's FFN activity includes
    its scalar bias."""
    from megabranch.analysis import analyze_model

    cfg = tiny_model_cfg(residual=residual, encoder_layers=3, decoder_layers=2)
    model = build_model(cfg, V, seed=0)
    set_step(model, 10**6)  # BranchNorm's alpha at 1: its branches reach the loss
    _perturb(model)
    src, prev = _batch(5)
    stats = analyze_model(model, {"src_tokens": src, "prev_output_tokens": prev, "target": prev})
    for stack, n in (("encoder", 3), ("decoder", 2)):
        for key in ("cosine", "ffn_nonzero", "grad_norm"):
            values = stats[stack][key]
            assert len(values) == n and all(math.isfinite(v) for v in values), (residual, stack, key)
        assert all(0 <= v <= 1 for v in stats[stack]["ffn_nonzero"]) and all(v > 0 for v in stats[stack]["grad_norm"])


def test_the_fused_residual_layernorm_serves_the_schemes_of_its_shape():
    """model.fused_kernels puts LN(r x + s F) through megabranch.ops for post_ln, deepnorm, branchnorm and ds_init
    (scalar r, s) and leaves every other scheme on the plain ops; ds_init's fused model gives the eager logits."""
    from megabranch.model.layers import Residual

    for residual in RESIDUALS:
        model = build_model(tiny_model_cfg(residual=residual, fused_kernels=True), V, seed=0)
        flags = {m.fused for m in model.modules() if isinstance(m, Residual)}
        assert flags == {residual in ("post_ln", "deepnorm", "branchnorm", "ds_init")}, residual
    src, prev = _batch(6)
    fused = build_model(tiny_model_cfg(residual="ds_init", fused_kernels=True), V, seed=0).eval()
    plain = build_model(tiny_model_cfg(residual="ds_init"), V, seed=0).eval()
    with torch.no_grad():
        assert _rel(fused(src, prev), plain(src, prev)) < 1e-5


def test_admin_profiles_once_and_a_resumed_model_keeps_its_omegas():
    """A model holding trained omegas (a checkpoint's), at its step > 0, trains on without profiling again; only
    step 0 of an unprofiled model profiles."""
    cfg = tiny_model_cfg(residual="admin")
    trained = build_model(cfg, V, seed=0).train()
    src, prev = _batch(7)
    trained(src, prev)  # profiles
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if name.endswith("omega"):
                p.mul_(1.5)  # as if training had moved them
    resumed = build_model(cfg, V, seed=1).train()
    resumed.load_state_dict(trained.state_dict())
    set_step(resumed, 2)
    resumed(src, prev)
    assert all(torch.equal(p, dict(trained.named_parameters())[k]) for k, p in resumed.named_parameters())
    fresh = build_model(cfg, V, seed=1).train()
    fresh.load_state_dict(trained.state_dict())
    fresh(src, prev)  # step 0 and never profiled: it profiles, whatever it was loaded with
    assert not torch.equal(fresh.encoder.layers[0].ffn.omega, trained.encoder.layers[0].ffn.omega)
