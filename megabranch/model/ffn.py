"""Position-wise feed-forward block: fc2(dropout(act(fc1(x)))).

Options some residual schemes add (megabranch.residual), off by default:
    hidden_norm     Sub-LN's and NormFormer's LayerNorm over the hidden units, before fc2
    scalar_biases   R-Fixup's scalar biases before the activation and before fc2:
                    fc2(dropout(act(fc1(x) + pre_act_bias)) + pre_fc2_bias)
"""

import torch
import torch.nn.functional as F
from torch import nn

from .norm import LayerNorm
from .shards import UNSHARDED


class FeedForward(nn.Module):
    def __init__(
        self,
        d_model: int,
        ffn_dim: int,
        activation: str = "relu",
        activation_dropout: float = 0.0,
        *,
        hidden_norm: bool = False,
        scalar_biases: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.act = F.relu if activation == "relu" else F.gelu
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.hidden_norm = LayerNorm(ffn_dim, eps) if hidden_norm else None
        self.pre_act_bias = nn.Parameter(torch.zeros(1)) if scalar_biases else None
        self.pre_fc2_bias = nn.Parameter(torch.zeros(1)) if scalar_biases else None
        self.shards = UNSHARDED  # the hidden units are split over tensor-parallel ranks (parallel.parallelize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.pre_act_bias is not None:
            h = h + self.shards.replicated(self.pre_act_bias)
        h = self.activation_dropout(self.act(h))
        if self.pre_fc2_bias is not None:
            h = h + self.shards.replicated(self.pre_fc2_bias)
        if self.hidden_norm is not None:
            h = self.shards.scatter(self.hidden_norm(self.shards.gather(h)))
        return self.fc2(h)
