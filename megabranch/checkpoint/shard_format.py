"""Format 3 shard files: a safetensors data file and a small JSON index, so that a rank reads only its slices.

    shard_tp<t>_pp<p>[_dp<d>].safetensors   every tensor of the shard (a standard safetensors file)
    shard_tp<t>_pp<p>[_dp<d>].json          the shard's structure with each tensor replaced by {"__tensor__": key}
                                            (step, alpha, split table, hyperparameters, data position: plain
                                            JSON, nothing to unpickle) and, per tensor, its dtype, logical
                                            shape, the dim stored leading, its byte range in the data file and
                                            the sha256 of every block of rows

A tensor is stored with its tensor-parallel split dim (`lead`; parallelize.natural_split_dims, also at tp = 1)
moved to the front, so the rows that any tensor-parallel rank of any tp size owns are one contiguous byte range.
Every block of whole rows (about BLOCK_BYTES) carries its own sha256: a reader memory-maps only the blocks it
needs, checks each and copies out the rows it owns; the index itself is checked against meta.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os

import torch
from safetensors.torch import save_file

from ..errors import UserError
from .paths import contained

BLOCK_BYTES = 1 << 16
DATA, INDEX = ".safetensors", ".json"
_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH = {v: k for k, v in _DTYPES.items()}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _raw(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


# --- writing ---------------------------------------------------------------------------------------------------


def _encode(node, path: tuple, tensors: dict, lead_of):
    """The JSON form of a shard object; tensors are collected into `tensors` (key -> (tensor, lead dim))."""
    if torch.is_tensor(node):
        key = "/".join(path)
        tensors[key] = (node, lead_of(path) if node.dim() else 0)
        return {"__tensor__": key}
    if isinstance(node, dict):
        if all(isinstance(k, str) for k in node):
            return {k: _encode(v, path + (k,), tensors, lead_of) for k, v in node.items()}
        return {"__pairs__": [[k, _encode(v, path + (str(k),), tensors, lead_of)] for k, v in node.items()]}
    if isinstance(node, tuple):
        return {"__tuple__": [_encode(v, path + (str(i),), tensors, lead_of) for i, v in enumerate(node)]}
    if isinstance(node, list):
        return [_encode(v, path + (str(i),), tensors, lead_of) for i, v in enumerate(node)]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"cannot store a {type(node).__name__} at {'/'.join(path)} in a checkpoint")


def _lead_of(lead: dict):
    """Parameters and their Adam moments are stored with their split dim leading; everything else as it is."""

    def of(path: tuple) -> int:
        if path[:1] == ("model",) or path[:2] in (("optimizer", "exp_avg"), ("optimizer", "exp_avg_sq")):
            return lead.get(path[-1], 0)
        return 0

    return of


def _header(path: str) -> tuple[int, dict]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


def _fsynced(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_shard(directory: str, base: str, obj: dict) -> dict:
    """Write one shard object (the dict a checkpoint file holds; its optional "lead" table names the split dim
    of each parameter) as base.safetensors + base.json into `directory` -> {file name: sha256}."""
    tensors: dict = {}
    tree = _encode(obj, (), tensors, _lead_of(obj.get("lead") or {}))
    stored, entries, seen = {}, {}, set()
    for key, (t, lead) in tensors.items():
        s = t.detach().to("cpu")
        s = (s.movedim(lead, 0) if s.dim() else s).contiguous()
        if s.numel() and s.untyped_storage().data_ptr() in seen:
            s = s.clone()  # the package refuses tensors sharing memory
        seen.add(s.untyped_storage().data_ptr())
        row = s.element_size() * (math.prod(s.shape[1:]) if s.dim() else 1)
        rows = s.shape[0] if s.dim() else 1
        per = max(1, BLOCK_BYTES // max(row, 1))
        raw = _raw(s)
        blocks = (
            [hashlib.sha256(raw[i * row : min(i + per, rows) * row]).hexdigest() for i in range(0, rows, per)]
            if s.numel()
            else []
        )
        stored[key] = s
        entries[key] = {
            "dtype": _DTYPES[s.dtype],
            "shape": list(t.shape),
            "lead": lead,
            "row_bytes": row,
            "block_rows": per,
            "blocks": blocks,
        }
    data_path = os.path.join(directory, base + DATA)
    save_file(stored, data_path)
    _fsynced(data_path)
    start, header = _header(data_path)
    for key, e in entries.items():
        a, b = header[key]["data_offsets"]
        e["bytes"] = [start + a, start + b]
    index = json.dumps({"format": 3, "data": base + DATA, "tree": tree, "tensors": entries})  # tree in order
    index_path = os.path.join(directory, base + INDEX)
    with open(index_path, "w") as fh:
        fh.write(index)
        fh.flush()
        os.fsync(fh.fileno())
    return {base + DATA: sha256_file(data_path), base + INDEX: hashlib.sha256(index.encode()).hexdigest()}


# --- reading ---------------------------------------------------------------------------------------------------


_WHOLE = object()


def _entry_ok(e) -> bool:
    """Whether one tensor's index entry is what write_shard writes: a known dtype, a shape, its lead dim, and row
    size, block count and byte range that agree with them (rows() relies on each)."""
    try:
        shape, lead, per, (a, b) = e["shape"], e["lead"], e["block_rows"], e["bytes"]
        if not all(isinstance(x, int) and x >= 0 for x in [*shape, lead, per, a, b]) or per < 1:
            return False
        if not (lead < len(shape) or (not shape and lead == 0)):
            return False
        stored = [shape[lead]] + shape[:lead] + shape[lead + 1 :] if shape else []
        n, row = (stored[0] if stored else 1), _TORCH[e["dtype"]].itemsize * math.prod(stored[1:])
        blocks = math.ceil(n / per) if n * row else 0
        return (
            e["row_bytes"] == row
            and b - a == n * row
            and len(e["blocks"]) == blocks
            and all(isinstance(h, str) for h in e["blocks"])
        )
    except (KeyError, TypeError, ValueError, IndexError):
        return False


def _parsed_index(blob: bytes, path: str) -> dict:
    """A shard index, checked for the structure the reader relies on: meta.json's sha256 proves the index is the
    one meta.json names, not that it is well formed (both may come from a stranger)."""
    try:
        index = json.loads(blob)
    except (ValueError, RecursionError) as e:
        raise UserError(f"checkpoint shard index {path} is not JSON: {str(e)[:120]}") from None
    tensors = index.get("tensors") if isinstance(index, dict) else None
    if not (isinstance(tensors, dict) and isinstance(index.get("data"), str) and isinstance(index.get("tree"), dict)):
        raise UserError(f"checkpoint shard index {path} is malformed: it needs a tree, a data file name and tensors")
    bad = next((k for k, e in tensors.items() if not _entry_ok(e)), None)
    if bad is not None:
        raise UserError(
            f"checkpoint shard index {path} is malformed: the entry of {bad!r} does not describe a "
            "tensor as megabranch writes it (dtype, shape, rows, blocks and byte range agree)"
        )
    return index


class ShardFile:
    """One format-3 shard: its index (checked against meta.json's sha256 of it) and its data file, opened on
        first use. `counter["bytes"]` grows by every byte read (index and data blocks), counter["metadata"] by the
    index's."""

    def __init__(self, step_dir: str, base: str, meta: dict, counter: dict):
        self.path_index = os.path.join(step_dir, base + INDEX)
        want = meta["files"].get(base + INDEX)
        if want is None:
            raise UserError(f"{self.path_index} is not listed in {os.path.join(step_dir, 'meta.json')}")
        if not os.path.isfile(self.path_index):
            raise UserError(f"checkpoint shard missing: {self.path_index}")
        contained(step_dir, base + INDEX)
        with open(self.path_index, "rb") as fh:
            blob = fh.read()
        counter["bytes"] += len(blob)
        counter["metadata"] = counter.get("metadata", 0) + len(blob)
        if hashlib.sha256(blob).hexdigest() != want:
            raise UserError(
                f"checkpoint shard {self.path_index} is corrupt: its sha256 differs from meta.json "
                "(truncated or modified)"
            )
        index = _parsed_index(blob, self.path_index)
        self.tree, self.entries = index["tree"], index["tensors"]
        self.path_data = contained(step_dir, index["data"], self.path_index)
        self.counter = counter
        self._fh, self._size = None, 0

    def _file(self):
        """The data file, opened once its size is the one its index describes: a truncated (or appended-to) file
        is refused before any byte of it is read, also when the part a reader needs is intact."""
        if self._fh is None:
            if not os.path.isfile(self.path_data):
                raise UserError(f"checkpoint shard missing: {self.path_data}")
            fh = open(self.path_data, "rb")  # kept open while the reader lives
            size, want = os.fstat(fh.fileno()).st_size, data_size(self.entries)
            if want is not None and size != want:
                fh.close()
                how = "truncated" if size < want else "longer than its index says (appended to or replaced)"
                raise UserError(
                    f"checkpoint shard {self.path_data} is {how}: {size:,} bytes, its index "
                    f"{os.path.basename(self.path_index)} describes {want:,}"
                )
            self._fh, self._size = fh, size
        return self._fh

    def rows(self, key: str, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        """Rows [lo, hi) of the stored tensor `key` (stored layout: its lead dim first), a fresh copy; only the
        blocks that hold them are mapped and read, each checked against its sha256, and unmapped again (so the
        pages read do not stay in this process's memory)."""
        e = self._entry(key)
        shape = list(e["shape"])
        lead = e["lead"]
        stored = [shape[lead]] + shape[:lead] + shape[lead + 1 :] if shape else []
        n = stored[0] if stored else 1
        lo, hi = 0 if lo is None else lo, n if hi is None else hi
        dtype = _TORCH[e["dtype"]]
        if hi <= lo or not e["blocks"]:
            return torch.empty([max(hi - lo, 0)] + stored[1:], dtype=dtype)
        fh, row, per, base = self._file(), e["row_bytes"], e["block_rows"], e["bytes"][0]
        if self._size < e["bytes"][1]:
            raise UserError(f"checkpoint shard {self.path_data} is truncated: {key} ends at byte {e['bytes'][1]}")
        first, last = lo // per, (hi - 1) // per
        a, b = base + first * per * row, base + min((last + 1) * per, n) * row
        at = a - a % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fh.fileno(), b - at, offset=at, access=mmap.ACCESS_READ) as window:
            with memoryview(window) as view:
                chunk = view[a - at :]
                bad = [
                    i
                    for i in range(first, last + 1)
                    if hashlib.sha256(
                        chunk[(i - first) * per * row : (min((i + 1) * per, n) - first * per) * row]
                    ).hexdigest()
                    != e["blocks"][i]
                ]
                skip = (lo - first * per) * row
                data = None if bad else bytearray(chunk[skip : skip + (hi - lo) * row])
                chunk.release()
        if bad:
            raise UserError(
                f"checkpoint shard {self.path_data} is corrupt: block {bad[0]} of {key} differs from its "
                f"sha256 in {os.path.basename(self.path_index)} (truncated or modified)"
            )
        self.counter["bytes"] += b - a
        return torch.frombuffer(data, dtype=dtype).reshape([hi - lo] + stored[1:])

    def _entry(self, key: str) -> dict:
        if key not in self.entries:
            raise UserError(f"checkpoint shard index {self.path_index} refers to a tensor {key!r} it does not describe")
        return self.entries[key]

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor `key` in its logical layout."""
        e = self._entry(key)
        t = self.rows(key)
        return t.movedim(0, e["lead"]) if e["shape"] else t.reshape(())

    def materialize(self, node=_WHOLE):
        """A part of the tree (default: all of it) with every tensor in it read."""
        node = self.tree if node is _WHOLE else node
        if isinstance(node, dict):
            if "__tensor__" in node:
                return self.tensor(node["__tensor__"])
            if "__pairs__" in node:
                return {k: self.materialize(v) for k, v in node["__pairs__"]}
            if "__tuple__" in node:
                return tuple(self.materialize(v) for v in node["__tuple__"])
            return {k: self.materialize(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.materialize(v) for v in node]
        return node

    def shape(self, key: str) -> tuple:
        return tuple(self._entry(key)["shape"])

    def lead(self, key: str) -> int:
        return self._entry(key)["lead"]


def data_size(entries: dict) -> int | None:
    """The size of a data file from its index: safetensors stores the tensors back to back after its header,
    so the file ends where the last tensor does (None for a shard without tensors)."""
    return max((e["bytes"][1] for e in entries.values()), default=None)


def tensor_key(node) -> str | None:
    """The tensor key of a tree leaf ({"__tensor__": key}), or None."""
    return node.get("__tensor__") if isinstance(node, dict) else None


def check_data_file(step_dir: str, base: str, meta: dict) -> None:
    """Every block of a shard's data file against its index (verify())."""
    sf = ShardFile(step_dir, base, meta, {"bytes": 0})
    for key in sf.entries:
        sf.rows(key)
