"""Source/target sentence pairs and their collation into padded teacher-forcing batches."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megabranch.data.indexed import IndexedDataset
from megabranch.data.tokenizer import BOS, EOS, PAD


class LanguagePairDataset:
    """Pairs item i of `src` with item i of `tgt`; both get an eos appended.

    `src_prefix` (a target-language tag's id in a multilingual directory) is put before every source.
    `src_sizes` / `tgt_sizes` are the collated lengths (token count + 1 for eos, + 1 for the prefix);
    pass them to `make_batches` so the max_tokens budget counts exactly what ends up in the tensors.
    """

    def __init__(self, src: IndexedDataset, tgt: IndexedDataset, pad: int = PAD, bos: int = BOS,
                 eos: int = EOS, pad_to_multiple: int = 1, src_prefix: int | None = None):
        if len(src) != len(tgt):
            raise ValueError(f"source has {len(src)} items but target has {len(tgt)}")
        self.src, self.tgt = src, tgt
        self.pad, self.bos, self.eos = pad, bos, eos
        self.pad_to_multiple = pad_to_multiple  # e.g. 8 keeps GEMM shapes tensor-core friendly
        self.src_prefix = src_prefix
        self._prefix = np.array([] if src_prefix is None else [src_prefix], dtype=np.int64)
        # int32: half of int64 at tens of millions of pairs, and products with a batch size stay exact
        self.src_sizes = np.asarray(src.sizes, dtype=np.int32) + np.int32(1 + len(self._prefix))
        self.tgt_sizes = np.asarray(tgt.sizes, dtype=np.int32) + np.int32(1)

    def __len__(self) -> int:
        return len(self.src_sizes)

    def __getitem__(self, i: int) -> dict:
        """{"id", "source": [prefix] + src + [eos], "target": tgt + [eos]} as 1-D long tensors."""
        eos = np.array([self.eos], dtype=np.int64)
        return {
            "id": int(i),
            "source": torch.from_numpy(np.concatenate([self._prefix, self.src[i], eos])),
            "target": torch.from_numpy(np.concatenate([self.tgt[i], eos])),
        }

    def source_tokens(self, i: int) -> np.ndarray:
        """Raw source ids of item i (no prefix, no eos), e.g. to detokenize a reference."""
        return self.src[i]

    def target_tokens(self, i: int) -> np.ndarray:
        """Raw target ids of item i (no eos)."""
        return self.tgt[i]

    def _pad_len(self, n: int) -> int:
        m = self.pad_to_multiple
        return (n + m - 1) // m * m

    def collate(self, indices: Sequence[int]) -> dict:
        """Batch the items at `indices` into right-padded (B, L) long tensors (see collater)."""
        return self.collater([self[int(i)] for i in indices])

    def collater(self, samples: Sequence[dict]) -> dict:
        """Batch items (dicts from __getitem__) into right-padded (B, L) long tensors.

        prev_output_tokens = [bos] + tgt and target = tgt + [eos]: the same length, shifted by
        one, so position t of the decoder input predicts position t of the target.
        """
        bsz = len(samples)
        src_len = torch.tensor([len(s["source"]) for s in samples], dtype=torch.long)
        tgt_len = torch.tensor([len(s["target"]) for s in samples], dtype=torch.long)
        S = self._pad_len(int(src_len.max())) if bsz else 0
        T = self._pad_len(int(tgt_len.max())) if bsz else 0
        src_tokens = torch.full((bsz, S), self.pad, dtype=torch.long)
        target = torch.full((bsz, T), self.pad, dtype=torch.long)
        prev = torch.full((bsz, T), self.pad, dtype=torch.long)
        for b, s in enumerate(samples):
            src_tokens[b, : len(s["source"])] = s["source"]
            t = s["target"]
            target[b, : len(t)] = t
            prev[b, 0] = self.bos
            prev[b, 1 : len(t)] = t[:-1]
        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
            "src_tokens": src_tokens,
            "src_lengths": src_len,
            "prev_output_tokens": prev,
            "target": target,
            "tgt_lengths": tgt_len,
            "ntokens": int(tgt_len.sum()),
            "nsentences": bsz,
        }
