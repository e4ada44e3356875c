"""Token-budget batching (fairseq style) and a resumable, shardable epoch iterator."""

from __future__ import annotations

import numpy as np

from megabranch.errors import UserError


def make_batches(src_sizes, tgt_sizes, max_tokens: int, max_sentences: int | None = None,
                 seed: int = 1, epoch: int = 1, shuffle: bool = True,
                 required_multiple: int = 1) -> list[np.ndarray]:
    """Cut example indices into batches of at most `max_tokens` padded tokens.

    Sizes are the collated lengths (LanguagePairDataset.src_sizes/tgt_sizes, eos included).
    Examples are sorted by max(src, tgt) so batches hold similar lengths (little padding); ties
    are broken by a permutation seeded with (seed, epoch) so batch contents vary per epoch.
    A batch is closed when one more example would make bsz * max_len > max_tokens or exceed
    `max_sentences`; its size is then rounded down to a multiple of `required_multiple` where
    possible. With `shuffle`, the batch order is permuted with the same (seed, epoch) RNG.
    Without it, the order is deterministic and independent of seed/epoch (for validation).
    Returns a list of int64 index arrays covering every example exactly once.
    """
    src_sizes = np.asarray(src_sizes, dtype=np.int64)
    tgt_sizes = np.asarray(tgt_sizes, dtype=np.int64)
    if src_sizes.shape != tgt_sizes.shape:
        raise ValueError(f"src_sizes {src_sizes.shape} and tgt_sizes {tgt_sizes.shape} differ")
    if max_tokens is None or max_tokens < 1:
        raise UserError(f"max_tokens {max_tokens}: must be a positive integer")
    if max_sentences is not None and max_sentences < 1:
        raise UserError(f"max_sentences {max_sentences}: must be a positive integer or unset")
    if required_multiple < 1:
        raise UserError(f"required_multiple {required_multiple}: must be >= 1")
    lengths = np.maximum(src_sizes, tgt_sizes)
    if lengths.size and lengths.max() > max_tokens:
        i = int(lengths.argmax())
        raise UserError(
            f"example {i} has {int(lengths[i])} tokens (eos included) but max_tokens is {max_tokens}; "
            f"raise max_tokens or filter long pairs with a smaller --max-len"
        )

    rng = np.random.default_rng([seed, epoch])
    if shuffle:
        perm = rng.permutation(len(lengths))
        order = perm[np.argsort(lengths[perm], kind="stable")]
    else:
        order = np.argsort(lengths, kind="stable")
    cap = max_sentences or len(order) or 1

    batches, start = [], 0
    # Ascending order means the newest example is the batch's longest, so the padded
    # size of order[start:end+1] is simply (end + 1 - start) * lengths[order[end]].
    sorted_len = lengths[order].tolist()  # python ints: this loop is per example
    end = 0
    while end < len(order):
        bsz = end - start
        if bsz > 0 and (bsz + 1 > cap or (bsz + 1) * sorted_len[end] > max_tokens):
            keep = max(required_multiple * (bsz // required_multiple), bsz % required_multiple)
            batches.append(order[start : start + keep])
            start += keep
            continue  # re-test `end` against the carried-over remainder
        end += 1
    if start < len(order):
        batches.append(order[start:])

    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return [np.asarray(b, dtype=np.int64) for b in batches]


class EpochIterator:
    """Iterator over one epoch's collated batches that counts what it has handed out."""

    def __init__(self, dataset, batches: list[np.ndarray], start: int):
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
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def batches_for_epoch(self, epoch: int) -> list[np.ndarray]:
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
                full = [sample[b] for b in full]
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
