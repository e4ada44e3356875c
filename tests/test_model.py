"""Model construction: layout-independent init, parameter sharing, loss."""

import math

import pytest
import torch

from megabranch.model import build_model, initial_value, label_smoothed_nll_loss
from tests.helpers.configs import tiny_model_cfg

pytestmark = pytest.mark.unit


def test_init_is_a_function_of_seed_and_name_only():
    cfg = tiny_model_cfg(residual="deepnorm")
    a, b = build_model(cfg, 50, seed=7), build_model(cfg, 50, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    deeper = build_model(tiny_model_cfg(residual="deepnorm", decoder_layers=3), 50, seed=7)
    # a parameter's value does not depend on which other parameters exist (but DeepNorm's beta does depend on depth)
    name = "encoder.layers.1.self_attn.block.q_proj.weight"
    assert torch.equal(a.state_dict()[name], deeper.state_dict()[name])
    for pname, p in a.named_parameters():
        assert torch.equal(p, initial_value(pname, tuple(p.shape), cfg, 7)), pname
    assert not torch.equal(build_model(cfg, 50, seed=8).state_dict()[name], a.state_dict()[name])


def test_shared_embeddings_and_pad_row():
    model = build_model(tiny_model_cfg(), 50, seed=1)
    assert model.encoder.embed.table is model.decoder.embed.table
    assert model.decoder.output.weight is None and model.decoder.output.tied_to is model.encoder.embed.table
    assert torch.count_nonzero(model.encoder.embed.table.weight[0]) == 0
    sep = build_model(
        tiny_model_cfg(share_all_embeddings=False, share_decoder_input_output_embed=False), 50, 60, seed=1
    )
    assert sep.encoder.embed.table is not sep.decoder.embed.table and sep.decoder.output.weight.shape == (60, 32)


def test_label_smoothed_loss_hand_computed():
    logits = torch.tensor([[[2.0, 0.0, 1.0, 0.5]], [[0.0, 0.0, 0.0, 0.0]]])
    target = torch.tensor([[2], [0]])  # the second token is padding (id 0) and must not count
    eps = 0.1
    loss, nll = label_smoothed_nll_loss(logits, target, eps, ignore_index=0)
    lp = torch.log_softmax(logits[0, 0].double(), -1)
    eps_i = eps / 3
    expect = (1 - eps - eps_i) * -lp[2] + eps_i * -lp.sum()
    assert math.isclose(nll.item(), -lp[2].item(), rel_tol=1e-6)
    assert math.isclose(loss.item(), expect.item(), rel_tol=1e-6)


def test_build_model_from_weights_loads_them_or_names_the_mismatch():
    from megabranch.errors import UserError
    from megabranch.model import build_model_from
    from megabranch.residual import current_alpha

    cfg = tiny_model_cfg(residual="branchnorm", alpha_warmup_steps=10)
    params = dict(build_model(cfg, 50, seed=4).named_parameters())  # a shared table under its encoder name only
    assert "decoder.embed.table.weight" not in params
    model = build_model_from(cfg, 50, None, params, 5, "ckpt")
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert current_alpha(model) == 0.5
    del params["encoder.layers.0.ffn.block.fc1.weight"]
    with pytest.raises(UserError, match=r"ckpt does not match .*fc1.weight"):
        build_model_from(cfg, 50, None, params, 5, "ckpt")


def test_embeddings_scale_positions_and_offset_hand_computed():
    """model.embed_scale, model.positions and model.position_offset: E[tok] * scale + P[offset + i]."""
    from megabranch.model.embeddings import sinusoidal_table

    tokens = torch.tensor([[5, 9, 7, 0]])
    for kw in ({}, dict(embed_scale=1.0, position_offset=1), dict(positions="learned", position_offset=2)):
        cfg = tiny_model_cfg(**kw)
        model = build_model(cfg, 50, seed=3).eval()
        emb = model.encoder.embed
        table = emb.table.weight[tokens]
        scale = kw.get("embed_scale", math.sqrt(cfg.d_model))
        first = kw.get("position_offset", 0)
        if kw.get("positions") == "learned":
            pos = emb.learned_positions.weight[first : first + 4]
            assert emb.learned_positions.weight.shape == (2 + cfg.max_positions, cfg.d_model)
            assert "encoder.embed.learned_positions.weight" in dict(model.named_parameters())
        else:
            pos = sinusoidal_table(first + 4, cfg.d_model)[first:]
            assert not any("positions" in n for n, _ in model.named_parameters())
        torch.testing.assert_close(emb(tokens), table * scale + pos, rtol=0, atol=1e-6)
        torch.testing.assert_close(emb(tokens[:, 1:2], offset=1), (table * scale + pos)[:, 1:2], rtol=0, atol=1e-6)
