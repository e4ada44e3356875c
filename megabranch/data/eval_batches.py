"""The batches every evaluation reads: the validation loss, decoding (megabranch-generate, validation BLEU) and
the per-layer analysis. Sentences sorted by length and cut by make_batches' token-budget rule; every sentence
once, nothing shuffled (no seed, no epoch), so the same split always gives the same batches."""

from __future__ import annotations

import numpy as np

from megabranch.data.batching import make_batches
from megabranch.errors import UserError


def sentence_batches(src_sizes, n: int, max_tokens: int, max_sentences: int = 0, tgt_sizes=None) -> list[list[int]]:
    """The first n sentences sorted by length (each pair's longer side when tgt_sizes is given, else the source
    alone: a decoder does not know the target), cut into batches of at most max_tokens padded tokens (0: no
    token budget) and max_sentences sentences (0: no cap). A sentence longer than the budget is a batch of its
    own, not refused. -> index lists, shortest batch first."""
    if n <= 0:
        return []
    lengths = np.asarray(src_sizes[:n], dtype=np.int64)
    if tgt_sizes is not None:
        lengths = np.maximum(lengths, np.asarray(tgt_sizes[:n], dtype=np.int64))
    order = np.argsort(lengths, kind="stable")
    budget = max_tokens if max_tokens > 0 else int(lengths.max()) * max(1, max_sentences)
    # Clamping keeps the sorted lengths ascending, so make_batches' own stable sort leaves `order` as it is.
    sorted_len = np.minimum(lengths[order], budget)
    batches = make_batches(sorted_len, sorted_len, budget, max_sentences or None, shuffle=False)
    return [order[b].tolist() for b in batches]


def pair_batches(dataset, max_tokens: int, n: int | None = None, shards: int = 1, shard: int = 0) -> list[dict]:
    """The first n pairs of `dataset` (default: all) collated in sentence_batches by each pair's longer side;
    with shards > 1 the share of data-parallel replica `shard` (batch i goes to replica i % shards)."""
    n = len(dataset) if n is None else min(n, len(dataset))
    if n <= 0:
        raise UserError("no sentence pairs to evaluate on (the split is empty, or 0 sentences were asked for)")
    batches = sentence_batches(dataset.src_sizes, n, max_tokens, tgt_sizes=dataset.tgt_sizes)
    return [dataset.collate(b) for b in batches[shard::shards]]
