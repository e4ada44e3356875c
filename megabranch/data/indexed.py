"""Binarized, memory-mapped token dataset: `<prefix>.bin` (tokens) + `<prefix>.idx` (offsets).

`.idx` layout (little endian): 8-byte magic, uint32 version, uint8 dtype code, 3 pad bytes,
int64 item count N, then N+1 int64 offsets (in tokens) into `.bin`. `.bin` is the concatenation
of all items in the stored dtype. Memory-mapping means a multi-GB corpus costs no RAM and every
data-parallel rank can open the same files.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from megabranch.errors import UserError

_MAGIC = b"MBIDX\x00\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<8sIB3xq")  # magic, version, dtype code, pad, count
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<i4")}
_CODES = {v: k for k, v in _DTYPES.items()}


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536, halves the file), else int32."""
    return _DTYPES[1] if vocab_size < 65536 else _DTYPES[2]


def _paths(prefix) -> tuple[Path, Path]:
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


_CHUNK_ITEMS = 1 << 20  # offsets read per step when an index is checked or its sizes computed (8 MiB)
_CHUNK_BYTES = 1 << 24  # .bin bytes read per step by max_id


class IndexedDatasetBuilder:
    """Append token sequences, then `finalize()` to publish `<prefix>.bin/.idx`.

    Streams both files as items come (the offsets too), so memory stays flat however large the corpus. Writes to
    `.tmp` files renamed on finalize, so an interrupted run never leaves a complete-looking but partial dataset.
    Usable as a context manager (finalize on success, discard on exception). `max_id`: the largest token id
    written (-1 before any).
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in _CODES:
            raise ValueError(f"dtype must be uint16 or int32, got {dtype}")
        self._bin, self._idx = _paths(prefix)
        self._bin.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self._bin.with_name(self._bin.name + ".tmp")
        self._tmp_idx = self._idx.with_name(self._idx.name + ".tmp")
        self._f = open(self._tmp_bin, "wb")
        self._fi = open(self._tmp_idx, "wb")
        self._fi.write(_HEADER.pack(_MAGIC, _VERSION, _CODES[self.dtype], 0))  # the count is filled in on finalize
        self._fi.write(np.zeros(1, "<i8").tobytes())
        self._count, self._tokens, self.max_id = 0, 0, -1
        self._hi = np.iinfo(self.dtype).max

    def add_item(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"add_item expects a 1-D sequence, got shape {arr.shape}")
        self.add_items(arr, [arr.size])

    def add_items(self, tokens, sizes) -> None:
        """Append several items at once: `tokens` their ids end to end, `sizes` how many each has."""
        arr, sizes = np.asarray(tokens), np.asarray(sizes, dtype=np.int64)
        if arr.ndim != 1 or sizes.ndim != 1 or sizes.sum() != arr.size or (sizes.size and sizes.min() < 0):
            raise ValueError(f"add_items: {arr.size} tokens do not split into sizes summing to {sizes.sum()}")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > self._hi:
                raise ValueError(f"token ids out of range for {self.dtype}: [{lo}, {hi}]")
            self.max_id = max(self.max_id, hi)
        self._f.write(arr.astype(self.dtype, copy=False).tobytes())
        self._fi.write((self._tokens + np.cumsum(sizes)).astype("<i8").tobytes())
        self._count += sizes.size
        self._tokens += arr.size

    def __len__(self) -> int:
        return self._count

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def finalize(self) -> None:
        self._f.close()
        self._fi.seek(0)
        self._fi.write(_HEADER.pack(_MAGIC, _VERSION, _CODES[self.dtype], self._count))
        self._fi.close()
        os.replace(self._tmp_bin, self._bin)
        os.replace(self._tmp_idx, self._idx)

    def discard(self) -> None:
        self._f.close()
        self._fi.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.finalize() if exc_type is None else self.discard()


class IndexedDataset:
    """Read-only view of `<prefix>.bin/.idx`; item i is an int64 numpy array (a copy).

    Both files are memory-mapped; opening reads the index once, in chunks, to check it (so it costs no memory
    beyond the chunk, however many items), and `sizes` reads it again.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        bin_path, idx_path = _paths(prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise UserError(f"{p}: binarized data file not found (run megabranch-preprocess)")
        self._idx_path = idx_path
        size = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise UserError(f"{idx_path}: truncated index header ({len(head)} bytes); re-run megabranch-preprocess")
        magic, version, code, n = _HEADER.unpack_from(head)
        if magic != _MAGIC or version != _VERSION or code not in _DTYPES or n < 0:
            raise UserError(f"{idx_path}: not a megabranch index file (bad magic/version/dtype); re-run megabranch-preprocess")
        if size != _HEADER.size + 8 * (n + 1):
            raise UserError(f"{idx_path}: size {size} bytes does not match {n} items (truncated or corrupt)")
        self._n = n
        last = 0
        for k, chunk in enumerate(self._offset_chunks()):  # (they overlap by one offset: every step is seen)
            if (k == 0 and chunk[0] != 0) or np.any(np.diff(chunk) < 0):
                raise UserError(f"{idx_path}: offsets are not increasing (corrupt index)")
            last = chunk[-1]
        self.offsets = np.memmap(idx_path, dtype="<i8", mode="r", offset=_HEADER.size, shape=(n + 1,))
        self.dtype = _DTYPES[code]
        expected = int(last) * self.dtype.itemsize
        actual = bin_path.stat().st_size
        if actual != expected:
            raise UserError(f"{bin_path}: size {actual} bytes, index expects {expected} (truncated or corrupt)")
        self._bin_path = bin_path
        # np.memmap cannot map an empty file.
        self._data = np.memmap(bin_path, dtype=self.dtype, mode="r") if expected else np.empty(0, self.dtype)

    def _offset_chunks(self):
        """The n + 1 offsets in chunks of _CHUNK_ITEMS + 1, each starting where the last one ended."""
        with open(self._idx_path, "rb") as f:
            for start in range(0, max(self._n, 1), _CHUNK_ITEMS):
                f.seek(_HEADER.size + 8 * start)
                yield np.fromfile(f, dtype="<i8", count=min(_CHUNK_ITEMS, self._n - start) + 1)

    @property
    def sizes(self) -> np.ndarray:
        """Tokens of every item (int32; read from the index on each call: keep the result)."""
        out = np.empty(self._n, dtype=np.int32)
        for k, chunk in enumerate(self._offset_chunks()):
            out[k * _CHUNK_ITEMS : k * _CHUNK_ITEMS + chunk.size - 1] = np.diff(chunk)
        return out

    def max_id(self) -> int:
        """The largest token id in `.bin` (-1 when empty), read through in chunks (megabranch-preprocess records it
        in meta.json; this is for directories written before it did)."""
        hi = -1
        with open(self._bin_path, "rb") as f:
            while (chunk := np.fromfile(f, dtype=self.dtype, count=_CHUNK_BYTES // self.dtype.itemsize)).size:
                hi = max(hi, int(chunk.max()))
        return hi

    @staticmethod
    def exists(prefix: str | os.PathLike) -> bool:
        return all(p.is_file() for p in _paths(prefix))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> np.ndarray:
        n = self._n
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        i %= n
        return np.asarray(self._data[self.offsets[i] : self.offsets[i + 1]], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])
