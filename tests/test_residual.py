"""The residual schemes against hand-computed numbers."""

import math

import pytest
import torch

from megabranch.model import build_model
from megabranch.residual import alpha_at, current_alpha, deepnorm_constants, set_step
from tests.helpers.configs import tiny_model_cfg

pytestmark = pytest.mark.unit


def test_deepnorm_constants_hand_computed():
    # 6L-6L encoder-decoder: N^4 M = 6^5 = 7776, 7776^(1/16) = 1.7506
    c = deepnorm_constants(6, 6)
    assert c["encoder"][0] == pytest.approx(0.81 * 7776 ** (1 / 16))
    assert c["encoder"][0] == pytest.approx(1.41799, abs=1e-4)
    assert c["encoder"][1] == pytest.approx(0.87 / 1.75062, abs=1e-4)
    assert c["decoder"][0] == pytest.approx(18**0.25)  # 2.0598
    assert c["decoder"][0] == pytest.approx(2.05977, abs=1e-4)
    assert c["decoder"][1] == pytest.approx(72**-0.25)  # 0.3433
    # 500L-500L
    c = deepnorm_constants(500, 500)
    assert c["decoder"] == pytest.approx((1500**0.25, 6000**-0.25))
    assert c["encoder"][0] == pytest.approx(0.81 * 500 ** (5 / 16))
    # encoder-only / decoder-only: (2N)^(1/4), (8N)^(-1/4)
    assert deepnorm_constants(8, 0)["encoder"] == pytest.approx((2.0, 64**-0.25))
    assert deepnorm_constants(0, 32)["decoder"] == pytest.approx((8.0**0.5, 256**-0.25))


def test_alpha_schedules():
    assert alpha_at(0, 4000) == 0.0
    assert alpha_at(1000, 4000) == 0.25
    assert alpha_at(4000, 4000) == 1.0
    assert alpha_at(10**6, 4000) == 1.0
    assert alpha_at(5, 0) == 1.0
    for sched in ("linear", "exp", "sigmoid"):
        vals = [alpha_at(t, 100, sched) for t in range(0, 130)]
        assert vals[0] == pytest.approx(0.0, abs=1e-12)
        assert vals[100] == 1.0 and max(vals) == 1.0
        assert all(b >= a for a, b in zip(vals, vals[1:])), sched  # monotone
    # exp: (1 - e^{-5u}) / (1 - e^{-5}) at u = 0.2
    assert alpha_at(20, 100, "exp") == pytest.approx((1 - math.exp(-1)) / (1 - math.exp(-5)))
    # sigmoid is symmetric about T/2
    assert alpha_at(50, 100, "sigmoid") == pytest.approx(0.5)
    assert alpha_at(30, 100, "sigmoid") + alpha_at(70, 100, "sigmoid") == pytest.approx(1.0)


def test_alpha_is_one_tensor_per_stack_updated_in_place():
    model = build_model(tiny_model_cfg(residual="branchnorm", alpha_warmup_steps=10), 50)
    s_before = model.encoder.coeffs.branch_scale
    set_step(model, 5)
    assert model.encoder.coeffs.branch_scale is s_before  # same storage: graphs that captured it see the new value
    assert float(model.encoder.coeffs.branch_scale) == 0.5 and float(model.decoder.coeffs.branch_scale) == 0.5
    assert current_alpha(model) == 0.5
    assert "coeffs.branch_scale" not in " ".join(model.state_dict())  # derived from the step, never stored


def _inputs(vocab=50):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, vocab, (3, 9), generator=g)
    src[1, 6:] = 0
    tgt = torch.randint(4, vocab, (3, 7), generator=g)
    return src, tgt


def test_branchnorm_alpha_one_equals_post_ln_exactly():
    post = build_model(tiny_model_cfg(residual="post_ln"), 50)
    branch = build_model(tiny_model_cfg(residual="branchnorm", alpha_warmup_steps=100), 50)
    branch.load_state_dict(post.state_dict())
    src, tgt = _inputs()
    set_step(branch, 100)
    assert torch.equal(post(src, tgt), branch(src, tgt))
    set_step(branch, 50)  # and alpha < 1 really changes the output
    assert not torch.allclose(post(src, tgt), branch(src, tgt))


def test_residual_formulas_against_hand_written_layer():
    """One encoder FFN sub-layer, recomputed by hand from its weights for each scheme."""
    for residual in ("post_ln", "deepnorm", "branchnorm", "pre_ln"):
        model = build_model(tiny_model_cfg(residual=residual, alpha_warmup_steps=4), 50)
        set_step(model, 1)
        sub = model.encoder.layers[0].ffn
        r, s = model.encoder.coeffs.shortcut_scale, model.encoder.coeffs.branch_scale
        x = torch.randn(2, 5, 32, dtype=torch.float64)
        sub.double()
        if residual == "deepnorm":  # r is the stack's alpha, stored once in float32
            assert float(r) == pytest.approx(deepnorm_constants(2, 2)["encoder"][0], rel=1e-7)
        f = lambda h: sub.block.fc2(torch.relu(sub.block.fc1(h)))
        ln = lambda h: torch.nn.functional.layer_norm(h, (32,), sub.norm.weight, sub.norm.bias, 1e-5)
        expect = {
            "post_ln": ln(x + f(x)),
            "deepnorm": ln(float(r) * x + f(x)),
            "branchnorm": ln(x + 0.25 * f(x)),
            "pre_ln": x + f(ln(x)),
        }[residual]
        torch.testing.assert_close(sub(x, r.double(), s.double()), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("residual", ["deepnorm", "branchnorm", "post_ln"])
def test_deepnorm_init_variances(residual):
    """DeepNorm init: xavier on v/out/fc1/fc2 scaled by beta (variance x beta^2); q/k untouched."""
    torch.manual_seed(0)
    d, ffn = 64, 256
    cfg = tiny_model_cfg(residual=residual, d_model=d, ffn_dim=ffn, n_heads=4, encoder_layers=4, decoder_layers=4)
    model = build_model(cfg, 50)
    consts = deepnorm_constants(4, 4)
    for stack in ("encoder", "decoder"):
        beta = consts[stack][1] if residual != "post_ln" else 1.0
        layers = getattr(model, stack).layers
        w = lambda name: torch.cat([dict(layer.named_parameters())[name].flatten() for layer in layers])
        # xavier_uniform(gain g): var = g^2 * 2 / (fan_in + fan_out)
        assert w("self_attn.block.q_proj.weight").var().item() == pytest.approx(0.5 * 2 / (2 * d), rel=0.05)
        assert w("self_attn.block.v_proj.weight").var().item() == pytest.approx(beta**2 * 0.5 * 2 / (2 * d), rel=0.05)
        assert w("self_attn.block.out_proj.weight").var().item() == pytest.approx(beta**2 * 2 / (2 * d), rel=0.05)
        assert w("ffn.block.fc1.weight").var().item() == pytest.approx(beta**2 * 2 / (d + ffn), rel=0.05)
        assert w("ffn.block.fc2.weight").var().item() == pytest.approx(beta**2 * 2 / (d + ffn), rel=0.05)
