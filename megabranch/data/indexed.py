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


class IndexedDatasetBuilder:
    """Append token sequences, then `finalize()` to publish `<prefix>.bin/.idx`.

    Writes to `.tmp` files renamed on finalize, so an interrupted run never leaves a
    complete-looking but partial dataset. Usable as a context manager (finalize on success,
    discard on exception).
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in _CODES:
            raise ValueError(f"dtype must be uint16 or int32, got {dtype}")
        self._bin, self._idx = _paths(prefix)
        self._bin.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self._bin.with_name(self._bin.name + ".tmp")
        self._f = open(self._tmp_bin, "wb")
        self._offsets = [0]
        self._hi = np.iinfo(self.dtype).max

    def add_item(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"add_item expects a 1-D sequence, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > self._hi):
            raise ValueError(f"token ids out of range for {self.dtype}: [{arr.min()}, {arr.max()}]")
        self._f.write(arr.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def finalize(self) -> None:
        self._f.close()
        offsets = np.asarray(self._offsets, dtype="<i8")
        tmp_idx = self._idx.with_name(self._idx.name + ".tmp")
        with open(tmp_idx, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, _CODES[self.dtype], len(offsets) - 1))
            f.write(offsets.tobytes())
        os.replace(self._tmp_bin, self._bin)
        os.replace(tmp_idx, self._idx)

    def discard(self) -> None:
        self._f.close()
        self._tmp_bin.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.finalize() if exc_type is None else self.discard()


class IndexedDataset:
    """Read-only view of `<prefix>.bin/.idx`; item i is an int64 numpy array (a copy)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        bin_path, idx_path = _paths(prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise UserError(f"{p}: binarized data file not found (run megabranch-preprocess)")
        raw = idx_path.read_bytes()
        if len(raw) < _HEADER.size:
            raise UserError(f"{idx_path}: truncated index header ({len(raw)} bytes); re-run megabranch-preprocess")
        magic, version, code, n = _HEADER.unpack_from(raw)
        if magic != _MAGIC or version != _VERSION or code not in _DTYPES or n < 0:
            raise UserError(f"{idx_path}: not a megabranch index file (bad magic/version/dtype); re-run megabranch-preprocess")
        if len(raw) != _HEADER.size + 8 * (n + 1):
            raise UserError(f"{idx_path}: size {len(raw)} bytes does not match {n} items (truncated or corrupt)")
        self.offsets = np.frombuffer(raw, dtype="<i8", count=n + 1, offset=_HEADER.size)
        if self.offsets[0] != 0 or (n and np.any(np.diff(self.offsets) < 0)):
            raise UserError(f"{idx_path}: offsets are not increasing (corrupt index)")
        self.dtype = _DTYPES[code]
        expected = int(self.offsets[-1]) * self.dtype.itemsize
        actual = bin_path.stat().st_size
        if actual != expected:
            raise UserError(f"{bin_path}: size {actual} bytes, index expects {expected} (truncated or corrupt)")
        # np.memmap cannot map an empty file.
        self._data = np.memmap(bin_path, dtype=self.dtype, mode="r") if expected else np.empty(0, self.dtype)
        self.sizes = np.diff(self.offsets).astype(np.int64)

    @staticmethod
    def exists(prefix: str | os.PathLike) -> bool:
        return all(p.is_file() for p in _paths(prefix))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        i %= n
        return np.asarray(self._data[self.offsets[i] : self.offsets[i + 1]], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])
