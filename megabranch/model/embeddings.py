"""Token embeddings (scaled by sqrt(d), fairseq style) and fixed sinusoidal positions."""

import math

import torch
from torch import nn


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim) table: sin on the first half of the channels, cos on the second (fairseq layout)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1, dtype=torch.float64)], dim=1)
    return table.float()


class Embedder(nn.Module):
    """tokens -> dropout(sqrt(d) * E[tokens] + P[positions]).  Positions start at `offset` (for decoding)."""

    def __init__(self, table: nn.Embedding, max_positions: int, dropout: float):
        super().__init__()
        self.table = table
        self.scale = math.sqrt(table.embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("positions", sinusoidal_table(max_positions, table.embedding_dim), persistent=False)

    def reset_positions(self) -> None:
        """Recompute the table (after a meta-device build has been given real storage)."""
        self.positions = sinusoidal_table(*self.positions.shape).to(self.positions.device)

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        length = tokens.shape[1]
        if offset + length > self.positions.shape[0]:
            raise ValueError(f"sequence of {offset + length} tokens exceeds model.max_positions={self.positions.shape[0]}")
        x = self.table(tokens) * self.scale + self.positions[offset : offset + length]
        return self.dropout(x)
