"""Token embeddings (scaled: sqrt(d) by default, fairseq style) and positions (fixed sinusoids by default, or a
learned table), each as model.embed_scale / model.positions / model.position_offset say."""

import math

import torch
from torch import nn

from ..config import ModelConfig


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim) table: sin on the first half of the channels, cos on the second (fairseq layout)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1, dtype=torch.float64)], dim=1)
    return table.float()


def embed_scale(cfg: ModelConfig) -> float:
    """What token embeddings are multiplied by: model.embed_scale, or sqrt(d_model) when it is unset."""
    return math.sqrt(cfg.d_model) if cfg.embed_scale is None else float(cfg.embed_scale)


class Embedder(nn.Module):
    """tokens -> dropout(scale * E[tokens] + P[first + offset + i]): the i-th token of a sequence at position
    model.position_offset + i (`offset`: tokens already decoded). P is a fixed sinusoidal table (buffer
    `positions`) or, with model.positions=learned, the parameter `learned_positions.weight` of
    position_offset + max_positions rows. with_positions=False: a table holder for a tied output projection."""

    def __init__(self, table: nn.Embedding, cfg: ModelConfig, with_positions: bool = True):
        super().__init__()
        self.table = table
        self.scale = embed_scale(cfg)
        self.first = cfg.position_offset
        self.max_positions = cfg.max_positions
        self.dropout = nn.Dropout(cfg.dropout)
        rows = cfg.position_offset + cfg.max_positions
        self.learned_positions = None
        if with_positions and cfg.positions == "learned":
            self.learned_positions = nn.Embedding(rows, table.embedding_dim)
        self.register_buffer("positions", sinusoidal_table(rows, table.embedding_dim), persistent=False)

    def reset_positions(self) -> None:
        """Recompute the table (after a meta-device build has been given real storage)."""
        self.positions = sinusoidal_table(*self.positions.shape).to(self.positions.device)

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        self.check_length(offset + tokens.shape[1])
        return self.place(self.table(tokens), offset)

    def check_length(self, end: int) -> None:
        if end > self.max_positions:
            raise ValueError(f"sequence of {end} tokens exceeds model.max_positions={self.max_positions}")

    def place(self, looked_up: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """dropout(scale * looked_up + P[first + offset + i]) for the looked-up tokens (B, L, d) at positions
        offset .. offset + L - 1 (a slice of a sequence: the position of its first token)."""
        lo, hi = self.first + offset, self.first + offset + looked_up.shape[1]
        pos = self.positions[lo:hi] if self.learned_positions is None else self.learned_positions.weight[lo:hi]
        return self.dropout(looked_up * self.scale + pos)
