"""Analysis measurements (megabranch.analysis), the depth sweep (tools.research) and the training benchmark
(tools.bench.train) at toy size."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megabranch import analysis
from megabranch.model import PAD, build_model, label_smoothed_nll_loss
from tests.helpers.configs import tiny_model_cfg
from tests.helpers.corpus import preprocessed
from tools.bench import train as bench_train
from tools.bench.reference_transformer import ReferenceTransformer
from tools.research import analyze, depth_sweep
from tools.research.results import gnorm_stats

pytestmark = pytest.mark.unit


def _batch(vocab=50, bsz=3, s_len=7, t_len=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (bsz, s_len), generator=g)
    tgt = torch.randint(4, vocab, (bsz, t_len), generator=g)
    src[0, -2:] = PAD  # some padding, which every measurement must ignore
    tgt[1, -3:] = PAD
    prev = torch.cat([torch.full((bsz, 1), 2), tgt[:, :-1]], 1)
    prev[1, -2:] = PAD
    return {"src_tokens": src, "prev_output_tokens": prev, "target": tgt, "ntokens": int(tgt.ne(PAD).sum())}


# ---------------------------------------------------------------- cosine similarity


def test_identical_representations_give_cosine_one():
    x = torch.randn(2, 5, 8)
    assert analysis.adjacent_cosine([x, x.clone(), 3.0 * x]) == pytest.approx([1.0, 1.0], abs=1e-12)
    assert analysis.token_cosine(x, -x) == pytest.approx(-1.0, abs=1e-12)
    # orthogonal per token -> 0; the mask drops tokens
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    b = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]])
    assert analysis.token_cosine(a, b) == pytest.approx(0.5)
    assert analysis.token_cosine(a, b, torch.tensor([[True, False]])) == pytest.approx(0.0)


class _Identity(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


def test_identity_layers_in_a_model_give_cosine_one():
    model = build_model(tiny_model_cfg(residual="post_ln", encoder_layers=3, decoder_layers=2), 50, seed=1)
    for stack in (model.encoder, model.decoder):
        stack.layers = nn.ModuleList(_Identity() for _ in stack.layers)
    b = _batch()
    stats = analysis.representation_stats(model, b["src_tokens"], b["prev_output_tokens"])
    assert stats["encoder"]["cosine"] == pytest.approx([1.0] * 3, abs=1e-9)
    assert stats["decoder"]["cosine"] == pytest.approx([1.0] * 2, abs=1e-9)
    assert all(math.isnan(v) for v in stats["encoder"]["ffn_nonzero"])  # no FFN to measure


def test_cosine_matches_a_manual_layer_by_layer_pass():
    model = build_model(tiny_model_cfg(residual="deepnorm", encoder_layers=3, decoder_layers=2), 50, seed=3).eval()
    b = _batch()
    stats = analysis.representation_stats(model, b["src_tokens"], b["prev_output_tokens"])
    with torch.no_grad():
        mask = b["src_tokens"].ne(PAD)
        x = model.encoder.embed(b["src_tokens"])
        r, s = model.encoder.coeffs.shortcut_scale, model.encoder.coeffs.branch_scale
        expect = []
        for layer in model.encoder.layers:
            y = layer(x, r, s, key_mask=mask)
            cos = F.cosine_similarity(x.double(), y.double(), dim=-1)[mask].mean()
            expect.append(float(cos))
            x = y
    assert stats["encoder"]["cosine"] == pytest.approx(expect, abs=1e-9)
    assert len(stats["decoder"]["cosine"]) == 2


# ---------------------------------------------------------------- FFN sparsity


def test_relu_of_known_inputs_gives_known_nonzero_fraction():
    pre = torch.tensor(
        [[[-1.0, 2.0, 0.0, 3.0], [5.0, 5.0, 5.0, -5.0]], [[-1.0, -2.0, -3.0, 4.0], [9.0, 9.0, 9.0, 9.0]]]
    )
    acts = F.relu(pre)
    assert analysis.nonzero_fraction(acts) == pytest.approx(10 / 16)  # 2 + 3 + 1 + 4 positives
    mask = torch.tensor([[True, True], [True, False]])  # drop the all-positive padding token
    assert analysis.nonzero_fraction(acts, mask) == pytest.approx(6 / 12)


def test_ffn_hook_sees_the_post_activation_tensor():
    """Make fc1 the identity with a known bias, so act(fc1(x)) = relu(x + b) is known from the FFN's input."""
    model = build_model(tiny_model_cfg(residual="post_ln", ffn_dim=32, d_model=32), 50, seed=2).eval()
    ffn_inputs = {}
    for i, layer in enumerate(model.encoder.layers):
        fc1 = layer.ffn.block.fc1
        with torch.no_grad():
            fc1.weight.copy_(torch.eye(32))
            fc1.bias.fill_(0.3 * (i + 1))
        layer.ffn.block.register_forward_pre_hook(lambda m, a, i=i: ffn_inputs.__setitem__(i, a[0].detach()))
    b = _batch()
    stats = analysis.representation_stats(model, b["src_tokens"], b["prev_output_tokens"])
    mask = b["src_tokens"].ne(PAD)
    for i in range(2):
        x = ffn_inputs[i][mask]
        expect = float((x + 0.3 * (i + 1)).gt(0).double().mean())
        assert stats["encoder"]["ffn_nonzero"][i] == pytest.approx(expect, abs=1e-12)
    assert 0.0 < stats["decoder"]["ffn_nonzero"][0] < 1.0


# ---------------------------------------------------------------- gradient norms


def test_grad_norm_hand_computed():
    lin = nn.Linear(3, 2, bias=False)
    x = torch.tensor([1.0, 2.0, 2.0])
    lin(x).sum().backward()  # dL/dW = ones(2) outer x  ->  ||.|| = sqrt(2) * ||x|| = sqrt(2) * 3
    assert analysis.module_grad_norms({"lin": lin})["lin"] == pytest.approx(math.sqrt(18.0))
    lin2 = nn.Linear(2, 2)
    assert analysis.grad_norm(lin2.parameters()) == 0.0  # no gradient yet counts as zero


def test_layer_grad_norms_match_manual_backward_and_restore_grads():
    model = build_model(tiny_model_cfg(residual="branchnorm", alpha_warmup_steps=0), 50, seed=4)
    model.train()
    b = _batch()
    sentinel = torch.full_like(model.encoder.layers[0].ffn.norm.weight, 7.0)
    model.encoder.layers[0].ffn.norm.weight.grad = sentinel.clone()
    got = analysis.layer_grad_norms(model, b, 0.1)
    assert torch.equal(model.encoder.layers[0].ffn.norm.weight.grad, sentinel)  # restored
    assert model.training  # mode restored

    ref = build_model(tiny_model_cfg(residual="branchnorm", alpha_warmup_steps=0), 50, seed=4).eval()
    loss, _ = label_smoothed_nll_loss(ref(b["src_tokens"], b["prev_output_tokens"]), b["target"], 0.1)
    (loss / b["ntokens"]).backward()
    for stack in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(ref, stack).layers):
            manual = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters()))
            assert got[stack][i] == pytest.approx(manual, rel=1e-6)
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters() if p.grad is not None))
    assert got["total"] == pytest.approx(total, rel=1e-6)


def test_analysis_rows_csv_and_plot(tmp_path):
    model = build_model(tiny_model_cfg(), 50, seed=5)
    b = _batch()
    stats = analysis.analyze_batches(model, [b, _batch(seed=1)], 0.1)
    rows = analysis.analysis_rows(stats, "tiny")
    assert len(rows) == 4 and rows[0]["stack"] == "encoder" and rows[2]["layer"] == 1
    assert rows[0]["ffn_sparsity"] == pytest.approx(1 - rows[0]["ffn_nonzero"], abs=1e-6)
    analysis.write_csv(rows, str(tmp_path / "a.csv"))
    analysis.plot_analysis({"tiny": stats}, str(tmp_path / "a.png"))
    assert (tmp_path / "a.csv").read_text().startswith("label,stack,layer,cosine")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_analyze_batches_weights_tokens():
    """Two batches: the combined cosine is the token-weighted mean of the per-batch ones."""
    model = build_model(tiny_model_cfg(), 50, seed=6)
    b1, b2 = _batch(seed=1), _batch(bsz=5, seed=2)
    s1 = analysis.representation_stats(model, b1["src_tokens"], b1["prev_output_tokens"])
    s2 = analysis.representation_stats(model, b2["src_tokens"], b2["prev_output_tokens"])
    both = analysis.analyze_batches(model, [b1, b2])
    n1, n2 = int(b1["src_tokens"].ne(PAD).sum()), int(b2["src_tokens"].ne(PAD).sum())
    expect = (s1["encoder"]["cosine"][0] * n1 + s2["encoder"]["cosine"][0] * n2) / (n1 + n2)
    assert both["encoder"]["cosine"][0] == pytest.approx(expect, abs=1e-12)


# ---------------------------------------------------------------- depth sweep end to end


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return preprocessed(tmp_path_factory.mktemp("corpus"), 60, 80, 12, langs=("kjv", "web"), extra=("--max-len", "64"))


def _sweep_argv(data, out):
    return [
        "--data",
        data,
        "--out",
        out,
        "--depths",
        "2",
        "--steps",
        "3",
        "--schemes",
        "post_ln,branchnorm_linear",
        "--lrs",
        "",
        "--warmups",
        "",
        "--Ts",
        "",
        "--d-model",
        "16",
        "--n-heads",
        "2",
        "--max-tokens",
        "128",
        "--valid-sentences",
        "8",
        "--bleu-sentences",
        "4",
        "--progress-every",
        "1",
        "--T",
        "2",
    ]


def test_depth_sweep_two_runs_end_to_end_and_resume(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "sweep")
    assert depth_sweep.main(_sweep_argv(tiny_data, out)) == 0
    runs = sorted(os.listdir(os.path.join(out, "runs")))
    assert len(runs) == 2
    res = json.load(open(os.path.join(out, "runs", runs[0])))
    assert res["steps_done"] == 3 and len(res["gnorms"]) == 3 and res["status"] == "ok"
    assert res["gnorm_stats"]["n"] == 3 and "bleu" in res and res["valid_loss"] > 0
    assert len(res["analysis"]["encoder"]["cosine"]) == 2
    report = open(os.path.join(out, "report.md")).read()
    assert "| post_ln |" in report and "| branchnorm_linear |" in report and "2L-2L" in report
    assert os.path.getsize(os.path.join(out, "fig3_depth_gnorm_loss.png")) > 1000
    err = capsys.readouterr().err
    assert "[1/2]" in err and "step 3/3" in err  # progress
    # a second invocation skips both finished runs
    mtime = os.path.getmtime(os.path.join(out, "runs", runs[0]))
    assert depth_sweep.main(_sweep_argv(tiny_data, out)) == 0
    assert "2 already finished (skipped)" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(out, "runs", runs[0])) == mtime


def test_depth_sweep_user_errors(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        depth_sweep.main(["--data", tiny_data, "--schemes", "postln", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown scheme 'postln'" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        depth_sweep.main(["--data", str(tmp_path), "--out", str(tmp_path)])
    assert "no meta.json" in capsys.readouterr().err


def test_gnorm_stats_hand_computed():
    g = gnorm_stats([1.0, 2.0, 4.0, float("nan"), 100.0], first=3)
    assert g["n"] == 3 and g["max"] == 4.0 and g["max_over_median"] == pytest.approx(2.0)
    assert g["mean_abs_dlog"] == pytest.approx(math.log(2))


# ---------------------------------------------------------------- benchmark runs (no timing asserts)


def test_bench_train_one_tiny_iteration(capsys):
    res = bench_train.main(
        [
            "--d-model",
            "16",
            "--heads",
            "2",
            "--layers",
            "1",
            "--tokens",
            "32",
            "--seq-len",
            "8",
            "--vocab",
            "64",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "1",
            "--no-memory",
            "--compile-backend",
            "aot_eager",
            "--compile-static",
        ]
    )  # inductor's compile is the slow part of a tiny run
    assert set(res["rows"]) == {"megabranch-eager", "megabranch-fused", "megabranch-compiled", "reference"}
    assert all(r["first_step_s"] > 0 for r in res["rows"].values())
    # same sizes: the reference has the parameters megabranch has (megabranch has no output bias either)
    assert res["rows"]["reference"]["params"] == res["rows"]["megabranch-eager"]["params"]
    out = capsys.readouterr().out
    assert "megabranch-eager / reference" in out and "compiled / eager" in out
    res = bench_train.main(
        [
            "--d-model",
            "16",
            "--heads",
            "2",
            "--layers",
            "1",
            "--tokens",
            "32",
            "--seq-len",
            "8",
            "--vocab",
            "64",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--no-memory",
            "--impls",
            "reference",
            "--peak-tflops",
            "0.5",
        ]
    )
    r = res["rows"]["reference"]
    assert r["mfu"] == pytest.approx(res["flops_per_step"] / r["s_per_step"] / 0.5e12)


@pytest.mark.parametrize("impl", ["megabranch", "reference"])
def test_bench_train_flop_count_equals_torch_flop_counter(impl):
    """train_flops (used for MFU) counts what torch's FlopCounterMode counts for one forward + backward of either
    model; the math attention backend makes attention visible to the counter as plain matrix products."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    d, ffn, vocab, layers, bsz, seq = 32, 96, 300, 2, 3, 7
    if impl == "megabranch":
        from megabranch.config import load_config
        from megabranch.model import build_model

        cfg = load_config(
            None,
            [
                "model.residual=post_ln",
                f"model.d_model={d}",
                "model.n_heads=4",
                f"model.ffn_dim={ffn}",
                f"model.encoder_layers={layers}",
                f"model.decoder_layers={layers}",
            ],
        )
        model = build_model(cfg.model, vocab, seed=1)
    else:
        model = ReferenceTransformer(vocab, d, 4, ffn, layers, layers)
    src, prev = torch.randint(4, vocab, (bsz, seq)), torch.randint(4, vocab, (bsz, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(src, prev).float().sum().backward()
    assert counter.get_total_flops() == bench_train.train_flops(bsz, seq, seq, d, ffn, vocab, layers, layers)


# ---------------------------------------------------------------- analyze CLI (models built in-process)


def test_analyze_run_analysis_writes_csv_and_png(tiny_data, tmp_path, capsys):
    from megabranch.config import load_config
    from megabranch.data import load_split, pair_batches

    valid = load_split(tiny_data, "valid")
    dataset, vocab = valid.dataset, valid.src_tok.vocab_size
    batches = pair_batches(dataset, 64, 8)
    assert sum(b["nsentences"] for b in batches) == 8 and len(batches) > 1
    models = {}
    for res in ("deepnorm", "branchnorm"):
        cfg = load_config(
            None,
            [
                f"model.residual={res}",
                "model.d_model=16",
                "model.n_heads=2",
                "model.ffn_dim=32",
                "model.encoder_layers=3",
                "model.decoder_layers=2",
                "model.alpha_warmup_steps=0",
            ],
        )
        models[res] = (build_model(cfg.model, vocab, seed=1), cfg)
    out = str(tmp_path / "an")
    results = analyze.run_analysis(models, batches, out)
    assert (
        len(results["deepnorm"]["encoder"]["cosine"]) == 3 and len(results["branchnorm"]["decoder"]["grad_norm"]) == 2
    )
    lines = open(out + ".csv").read().splitlines()
    assert len(lines) == 1 + 2 * (3 + 2)
    assert os.path.getsize(out + ".png") > 1000
    assert "deepnorm: mean adjacent cosine" in capsys.readouterr().out


def test_analyze_missing_checkpoint_is_a_one_line_error(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        analyze.main([str(tmp_path / "nope.pt"), "--data", tiny_data, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nope.pt" in err and len(err.strip().splitlines()) == 1
