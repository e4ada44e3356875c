"""Several translation directions in one data directory: target-language tags and temperature sampling.

Many-to-many MT in the style of Johnson et al. (2017) and OPUS-100 (Zhang et al., 2020): one joint
sentencepiece model for every language, and a tag `<2xx>` naming the target language put before each
source sentence, so one model learns every direction. Training draws direction i with probability

    q_i = p_i^(1/T) / sum_j p_j^(1/T),    p_i = n_i / sum_j n_j    (n_i: training pairs of direction i)

T = 1 samples in proportion to the data (exactly the concatenation, each pair once an epoch); a larger T
flattens the distribution towards uniform (T = 5 in OPUS-100 and mBART), which up-samples small directions.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from megabranch.errors import UserError


def tag_of(lang: str) -> str:
    """The tag that asks for translation into `lang`: "<2de>"."""
    return f"<2{lang}>"


def check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise UserError(f"data.sampling_temperature={temperature!r} is invalid: must be a number > 0 "
                        f"(1: in proportion to the data, 5: the OPUS-100 / mBART setting)")
    return float(temperature)


def temperature_probs(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """q_i proportional to (n_i / sum n)^(1/T): the probability of drawing direction i."""
    t = check_temperature(temperature)
    n = np.asarray(sizes, dtype=np.float64)
    if n.size == 0 or np.any(n <= 0):
        raise UserError(f"temperature sampling needs every direction to have examples (sizes {list(sizes)})")
    w = (n / n.sum()) ** (1.0 / t)
    return w / w.sum()


class MultilingualDataset:
    """The directions' LanguagePairDatasets end to end, usable wherever one LanguagePairDataset is.

    Index i is pair i - offset[d] of direction d (directions in meta.json order). With a temperature other
    than 1, `epoch_indices` gives EpochBatchIterator each epoch's draw (as many pairs as the data has, the
    directions in the proportions q); with T = 1 it gives None and every pair is used once per epoch.
    """

    def __init__(self, parts: Sequence[tuple[str, object]], sampling_temperature: float = 1.0):
        if not parts:
            raise ValueError("a multilingual dataset needs at least one direction")
        self.names = [name for name, _ in parts]
        self.parts = [part for _, part in parts]
        self.sampling_temperature = check_temperature(sampling_temperature)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.src_sizes = np.concatenate([p.src_sizes for p in self.parts])
        self.tgt_sizes = np.concatenate([p.tgt_sizes for p in self.parts])
        first = self.parts[0]
        self.pad, self.bos, self.eos = first.pad, first.bos, first.eos

    @property
    def directions(self) -> list[str]:
        return list(self.names)

    def direction(self, name: str):
        """The LanguagePairDataset of one direction ("en-de"), its own indices from 0."""
        if name not in self.names:
            raise UserError(f"no direction {name!r} in this data (have: {', '.join(self.names)})")
        return self.parts[self.names.index(name)]

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        i %= n
        d = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return d, i - int(self.offsets[d])

    def direction_of(self, i: int) -> str:
        return self.names[self._locate(i)[0]]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        d, j = self._locate(i)
        item = self.parts[d][j]
        item["id"] = int(i) % len(self)
        return item

    def source_tokens(self, i: int) -> np.ndarray:
        d, j = self._locate(i)
        return self.parts[d].source_tokens(j)

    def target_tokens(self, i: int) -> np.ndarray:
        d, j = self._locate(i)
        return self.parts[d].target_tokens(j)

    def collate(self, indices: Sequence[int]) -> dict:
        return self.collater([self[int(i)] for i in indices])

    def collater(self, samples: Sequence[dict]) -> dict:
        return self.parts[0].collater(samples)  # every part pads the same way

    def probabilities(self) -> np.ndarray:
        return temperature_probs([len(p) for p in self.parts], self.sampling_temperature)

    def epoch_indices(self, seed: int, epoch: int) -> np.ndarray | None:
        """This epoch's draw of len(self) indices (None at T = 1: use every pair once).

        How many pairs each direction gets is multinomial(len(self), q); within a direction the pairs are
        taken from a fresh permutation, repeated when the direction is up-sampled, so no pair is drawn
        twice before every pair of its direction was drawn once. Depends only on (seed, epoch).
        """
        if self.sampling_temperature == 1.0:
            return None
        rng = np.random.default_rng([seed, epoch, 1])  # make_batches uses [seed, epoch]
        counts = rng.multinomial(len(self), self.probabilities())
        out = []
        for d, k in enumerate(counts):
            n = len(self.parts[d])
            reps = -(-int(k) // n)
            draw = np.concatenate([rng.permutation(n) for _ in range(reps)])[:k] if k else np.empty(0, np.int64)
            out.append(draw.astype(np.int64) + int(self.offsets[d]))
        return np.concatenate(out)
