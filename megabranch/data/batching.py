"""Token-budget batching (fairseq style) and a resumable, shardable epoch iterator."""

from __future__ import annotations

import numpy as np

from megabranch.errors import UserError


_SORT_CHUNK = 1 << 18  # examples sorted per step by _sort_by_length (its scratch memory: ~60 bytes each)


class Batches:
    """A list of index batches kept compactly: batch i is `values[starts[i]:ends[i]]` (an int64 copy). Slicing
    (a data-parallel shard: `batches[rank::ranks]`) and `take` (a reordering) give Batches again, without
    copying the indices. At tens of millions of examples this is one int32 array instead of a Python list of
    hundreds of thousands of arrays."""

    def __init__(self, values: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.values, self.starts, self.ends = values, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Batches(self.values, self.starts[i], self.ends[i])
        return self.values[self.starts[i] : self.ends[i]].astype(np.int64)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, order: np.ndarray) -> "Batches":
        """The batches in `order` (batch j of the result is batch order[j])."""
        return Batches(self.values, self.starts[order], self.ends[order])

    def map(self, table: np.ndarray) -> "Batches":
        """Every index i replaced by table[i] (e.g. a sampled epoch's positions -> dataset indices)."""
        return Batches(np.asarray(table)[self.values], self.starts, self.ends)


def make_batches(src_sizes, tgt_sizes, max_tokens: int, max_sentences: int | None = None,
                 seed: int = 1, epoch: int = 1, shuffle: bool = True,
                 required_multiple: int = 1) -> Batches:
    """Cut example indices into batches of at most `max_tokens` padded tokens.

    Sizes are the collated lengths (LanguagePairDataset.src_sizes/tgt_sizes, eos included).
    Examples are sorted by max(src, tgt) so batches hold similar lengths (little padding); ties
    are broken by a permutation seeded with (seed, epoch) so batch contents vary per epoch.
    A batch is closed when one more example would make bsz * max_len > max_tokens or exceed
    `max_sentences`; its size is then rounded down to a multiple of `required_multiple` where
    possible. With `shuffle`, the batch order is permuted with the same (seed, epoch) RNG.
    Without it, the order is deterministic and independent of seed/epoch (for validation).
    Returns Batches (a sequence of int64 index arrays) covering every example exactly once.

    The same batches, for the same arguments, as fairseq-style greedy batching one example at a time (the
    checkpoints' data positions depend on it), computed per batch and per length instead: a counting sort in
    chunks and a walk over the runs of equal lengths, so 36M pairs take seconds and a few bytes per example.
    """
    src_sizes, tgt_sizes = np.asarray(src_sizes), np.asarray(tgt_sizes)
    if src_sizes.shape != tgt_sizes.shape:
        raise ValueError(f"src_sizes {src_sizes.shape} and tgt_sizes {tgt_sizes.shape} differ")
    if max_tokens is None or max_tokens < 1:
        raise UserError(f"max_tokens {max_tokens}: must be a positive integer")
    if max_sentences is not None and max_sentences < 1:
        raise UserError(f"max_sentences {max_sentences}: must be a positive integer or unset")
    if required_multiple < 1:
        raise UserError(f"required_multiple {required_multiple}: must be >= 1")
    n = len(src_sizes)
    # max(src, tgt) a chunk at a time, straight into the smallest type (every length <= max_tokens once checked)
    lengths = np.empty(n, dtype=np.uint16 if max_tokens < 1 << 16 else np.int64)
    counts = np.zeros(1, dtype=np.int64)  # examples of each length
    for c in range(0, n, _SORT_CHUNK):
        chunk = np.maximum(src_sizes[c : c + _SORT_CHUNK], tgt_sizes[c : c + _SORT_CHUNK])
        if chunk.min() < 0:
            raise ValueError("sizes must be >= 0")
        if chunk.max() > max_tokens:
            i = c + int(chunk.argmax())
            raise UserError(
                f"example {i} has {int(chunk.max())} tokens (eos included) but max_tokens is {max_tokens}; "
                f"raise max_tokens or filter long pairs with a smaller --max-len"
            )
        lengths[c : c + len(chunk)] = chunk
        here = np.bincount(chunk)  # (np.bincount widens its input to int64: one chunk, never the whole array)
        counts = np.pad(counts, (0, max(0, len(here) - len(counts))))
        counts[: len(here)] += here

    rng = np.random.default_rng([seed, epoch])
    perm = None
    if shuffle:
        perm = np.arange(n, dtype=np.int32 if n < 1 << 31 else np.int64)
        rng.shuffle(perm)  # the very permutation (and RNG state after it) of rng.permutation(n), in int32
    order = _sort_by_length(lengths, perm, counts)
    del perm
    starts, ends = _cut(counts, n, max_tokens, max_sentences or n or 1, required_multiple)
    if shuffle:
        j = rng.permutation(len(starts))
        starts, ends = starts[j], ends[j]
    return Batches(order, starts, ends)


def _sort_by_length(lengths: np.ndarray, perm: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """perm[argsort(lengths[perm], kind="stable")] (perm None: the identity), as a counting sort done a chunk at a
    time: the examples of each length keep perm's order and go after the shorter lengths' (counts: how many
    examples each length has)."""
    n = len(lengths)
    order = np.empty(n, dtype=perm.dtype if perm is not None else (np.int32 if n < 1 << 31 else np.int64))
    start = np.cumsum(counts) - counts  # where each length's examples begin in the order
    for c in range(0, n, _SORT_CHUNK):
        ids = perm[c : c + _SORT_CHUNK] if perm is not None else np.arange(c, min(c + _SORT_CHUNK, n))
        keys = lengths[ids]
        within = np.argsort(keys, kind="stable")
        sorted_keys = keys[within]
        here = np.bincount(keys, minlength=len(counts))
        rank = np.arange(len(keys)) - (np.cumsum(here) - here)[sorted_keys]  # position among its length's
        order[start[sorted_keys] + rank] = ids[within]
        start += here
    return order


def _cut(counts: np.ndarray, n: int, max_tokens: int, cap: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the batches over the length-sorted examples: from each start, as many examples as fit
    (count <= cap and count * the last one's length <= max_tokens), then rounded down to `multiple` unless
    fewer remain; the rest carry over to the next batch. The last batch takes whatever is left. Walks the runs
    of equal length (a few per batch), not the examples."""
    present = np.flatnonzero(counts)
    run_len = present.tolist()  # the lengths that occur, ascending
    run_end = np.cumsum(counts[present]).tolist()
    run_start = [0] + run_end[:-1]
    starts, ends = [], []
    s, r = 0, 0
    while s < n:
        while run_end[r] <= s:
            r += 1
        e, q = s, r
        while q < len(run_len):
            reach = s + (min(cap, max_tokens // run_len[q]) if run_len[q] else cap)
            if reach <= run_start[q]:  # not one example of this length fits: nor of any longer one
                break
            e = min(reach, run_end[q])
            if e < run_end[q]:
                break
            q += 1
        if e >= n:
            starts.append(s)
            ends.append(n)
            break
        size = e - s
        keep = max(multiple * (size // multiple), size % multiple)
        starts.append(s)
        ends.append(s + keep)
        s += keep
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


class EpochIterator:
    """Iterator over one epoch's collated batches that counts what it has handed out."""

    def __init__(self, dataset, batches: Batches, start: int):
        self._dataset, self._batches = dataset, batches
        self.count = start  # batches consumed so far in this epoch (incl. before a resume)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> "EpochIterator":
        return self

    def has_next(self) -> bool:
        return self.count < len(self._batches)

    def __next__(self) -> dict:
        if not self.has_next():
            raise StopIteration
        batch = self._batches[self.count]
        # Counted as consumed the moment it is handed out: a checkpoint saved after training
        # on it must resume at the next one.
        self.count += 1
        return self._dataset.collate(batch)


class EpochBatchIterator:
    """Per-epoch batching of a LanguagePairDataset with exact mid-epoch resume and sharding.

    Epochs are numbered from 1. Batches of epoch e depend only on (dataset sizes, batching
    arguments, seed, e), so a resumed run re-derives the same list and skips what was consumed.
    A dataset with `epoch_indices(seed, epoch)` (a temperature-sampled MultilingualDataset) is
    batched over that epoch's draw instead of over all its items.
    With num_shards > 1 every rank computes the same global list and takes batches
    i % num_shards == shard_id; the list is truncated to a multiple of num_shards so all ranks
    run the same number of steps (the dropped tail differs per epoch when shuffling).
    """

    def __init__(self, dataset, max_tokens: int, max_sentences: int | None = None, seed: int = 1,
                 shuffle: bool = True, required_multiple: int = 1, num_shards: int = 1,
                 shard_id: int = 0):
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
        self.dataset = dataset
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.seed, self.shuffle, self.required_multiple = seed, shuffle, required_multiple
        self.num_shards, self.shard_id = num_shards, shard_id
        self.epoch = 0  # last epoch started (or restored); 0 = none yet
        self._itr: EpochIterator | None = None
        self._offset = 0  # batches consumed in `epoch` when restored and not yet iterating
        self._cache: tuple[int, Batches] | None = None

    def batches_for_epoch(self, epoch: int) -> Batches:
        """This shard's index batches for `epoch` (cached for the latest epoch asked)."""
        if self._cache is None or self._cache[0] != epoch:
            # a multilingual dataset with a sampling temperature draws which pairs this epoch uses
            draw = getattr(self.dataset, "epoch_indices", None)
            sample = draw(self.seed, epoch) if draw is not None else None
            src_sizes, tgt_sizes = self.dataset.src_sizes, self.dataset.tgt_sizes
            if sample is not None:
                src_sizes, tgt_sizes = src_sizes[sample], tgt_sizes[sample]
            full = make_batches(src_sizes, tgt_sizes, self.max_tokens, self.max_sentences, self.seed, epoch,
                                self.shuffle, self.required_multiple)
            if sample is not None:
                full = full.map(sample)
            n = len(full) // self.num_shards * self.num_shards
            if not full:
                raise UserError("the dataset has no examples to batch")
            if n == 0:
                raise UserError(
                    f"the data makes only {len(full)} batches, fewer than {self.num_shards} "
                    f"data-parallel ranks; lower max_tokens or use fewer ranks"
                )
            self._cache = (epoch, full[self.shard_id : n : self.num_shards])
        return self._cache[1]

    def next_epoch_itr(self) -> EpochIterator:
        """Iterator for the next epoch, or for the rest of a restored unfinished epoch."""
        if self._itr is None and self.epoch > 0 and self._offset < len(self.batches_for_epoch(self.epoch)):
            start = self._offset
        else:
            self.epoch += 1
            start = 0
        self._offset = 0
        self._itr = EpochIterator(self.dataset, self.batches_for_epoch(self.epoch), start)
        return self._itr

    def update_groups(self, update_freq: int):
        """Endless lists of `update_freq` batches (one optimizer update each), crossing epoch boundaries.
        Batches are drawn only when a group is asked for, so state_dict() between groups is exact."""
        batches = self.next_epoch_itr()
        while True:
            group = []
            while len(group) < update_freq:
                try:
                    group.append(next(batches))
                except StopIteration:
                    batches = self.next_epoch_itr()
            yield group

    @property
    def iterations_in_epoch(self) -> int:
        return self._itr.count if self._itr is not None else self._offset

    def end_of_epoch(self) -> bool:
        """True when the current epoch has been fully consumed (or none was started)."""
        if self.epoch == 0:
            return True
        return self.iterations_in_epoch >= len(self.batches_for_epoch(self.epoch))

    def __len__(self) -> int:
        """Batches per epoch on this shard, for the current (or first) epoch."""
        return len(self.batches_for_epoch(max(self.epoch, 1)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "iterations_in_epoch": self.iterations_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; the next next_epoch_itr() continues exactly after it
        (or starts epoch + 1 if that epoch was finished)."""
        epoch, k = int(state["epoch"]), int(state["iterations_in_epoch"])
        if epoch < 0 or k < 0:
            raise UserError(f"checkpoint data position (epoch {epoch}, batch {k}) is invalid")
        n = len(self.batches_for_epoch(epoch)) if epoch > 0 else 0
        if k > n:
            raise UserError(
                f"checkpoint data position (epoch {epoch}, batch {k}) is past the {n} batches this "
                f"epoch has now; max_tokens, max_sentences, seed, data or rank count changed since it was saved"
            )
        self.epoch, self._offset, self._itr = epoch, k, None
