import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_model_cfg(**kw):
    from megabranch.config import ModelConfig

    base = dict(encoder_layers=2, decoder_layers=2, d_model=32, n_heads=4, ffn_dim=64, dropout=0.0, max_positions=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg():
    return tiny_model_cfg
