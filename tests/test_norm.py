"""The plain LayerNorm is apex's FusedLayerNorm only when a working apex is installed (issue 4), and the model is
the same either way. apex is not installable here, so a stand-in apex (FusedLayerNorm = a recording nn.LayerNorm)
is put into sys.modules."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from megabranch.config import load_config
from megabranch.model import build_model, norm

pytestmark = pytest.mark.unit


class _FakeFusedLayerNorm(nn.LayerNorm):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def _install_apex(monkeypatch, with_cuda_ext=True, with_normalization=True):
    apex = types.ModuleType("apex")
    monkeypatch.setitem(sys.modules, "apex", apex)
    if with_normalization:
        normalization = types.ModuleType("apex.normalization")
        normalization.FusedLayerNorm = _FakeFusedLayerNorm
        apex.normalization = normalization
        monkeypatch.setitem(sys.modules, "apex.normalization", normalization)
    else:  # the unrelated PyPI package called "apex"
        monkeypatch.setitem(sys.modules, "apex.normalization", None)
    monkeypatch.setitem(
        sys.modules, "fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda") if with_cuda_ext else None
    )
    norm.apex_fused_layer_norm.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_cache():
    norm.apex_fused_layer_norm.cache_clear()
    yield
    norm.apex_fused_layer_norm.cache_clear()


def _model(residual):
    cfg = load_config(
        None,
        [
            f"model.residual={residual}",
            "model.d_model=16",
            "model.n_heads=2",
            "model.ffn_dim=32",
            "model.encoder_layers=2",
            "model.decoder_layers=2",
            "model.dropout=0.0",
        ],
    )
    return build_model(cfg.model, 50, seed=3)


@pytest.mark.parametrize("residual", ["pre_ln", "post_ln"])
def test_apex_fused_layer_norm_when_installed_same_model(monkeypatch, residual):
    src, prev = torch.randint(4, 50, (2, 5)), torch.randint(4, 50, (2, 5))
    plain = _model(residual)
    assert not any(isinstance(m, _FakeFusedLayerNorm) for m in plain.modules())
    _install_apex(monkeypatch)
    fused = _model(residual)
    norms = [m for m in fused.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(isinstance(m, _FakeFusedLayerNorm) for m in norms)
    assert plain.state_dict().keys() == fused.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fused.state_dict().values()))
    _FakeFusedLayerNorm.calls = 0
    assert torch.equal(plain(src, prev), fused(src, prev))
    assert _FakeFusedLayerNorm.calls > 0


@pytest.mark.parametrize("case", ["pypi-apex", "no-cuda-ext", "disabled"])
def test_apex_ignored_when_unusable_or_disabled(monkeypatch, case):
    _install_apex(monkeypatch, with_normalization=case != "pypi-apex", with_cuda_ext=case != "no-cuda-ext")
    if case == "disabled":
        monkeypatch.setenv("MEGABRANCH_NO_APEX", "1")
    assert norm.apex_fused_layer_norm() is None
    assert type(norm.LayerNorm(16, 1e-5)) is nn.LayerNorm
