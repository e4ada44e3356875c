"""Reading a step directory into one rank's layout: only the tensors, and the slices of them, that rank owns.

    reader = StepReader(step_dir, meta)
    reader.region("model", name, want)      # one parameter's slice, assembled from the shards that hold it
    reader.bytes_read                        # everything read so far (indexes and data blocks / whole files)

Every parameter (and each of its Adam moments) is held by the shards of one pipeline position, split over its
tensor-parallel ranks along one dim (or whole). `want` is the slice a reading rank owns: (dim, lo, hi) in the
single-process tensor's coordinates, or None for the whole tensor. Only the shards whose part overlaps it are
opened, and of a format-3 shard only the rows inside it are read (the split dim is stored leading, so they are
contiguous: shard_format.py). ZeRO-1 moments live in flat per-data-parallel-rank vectors; a parameter's rows
map to one flat range, read from the data-parallel files it overlaps. Format-2 shards (.pt) are checked whole
and memory-mapped (torch.load(mmap=True)), then sliced before anything is copied. Nothing here assembles more
than the one tensor asked for.
"""

from __future__ import annotations

import math
import os

import torch

from ..errors import UserError
from ..parallel.zero import flat_range
from .reading import META, load_file, shard_name
from .shard_format import ShardFile, tensor_key

MOMENTS = ("exp_avg", "exp_avg_sq")


class _Piece:
    """One shard's part of a tensor: split along `split` (-1: whole) from `start`, local `shape`; `read(a, b)`
    returns rows [a, b) along `lead` (the dim that is cheap to cut) as a tensor in the logical layout."""

    def __init__(self, split: int, start: int, shape: tuple, lead: int, read):
        self.split, self.start, self.shape, self.lead, self.read = split, start, shape, lead, read

    def span(self, dim: int) -> tuple[int, int]:
        """Where this piece lies along `dim`, in the full tensor's coordinates."""
        off = self.start if dim == self.split else 0
        return off, off + self.shape[dim]


def _overlap(a: tuple, b: tuple) -> tuple[int, int]:
    return max(a[0], b[0]), min(a[1], b[1])


def assemble(pieces: list[_Piece], want: tuple | None) -> torch.Tensor:
    """The slice `want` ((dim, lo, hi) or None: all) of the tensor the pieces make up, reading only what it needs."""
    parts = []
    for pc in sorted(pieces, key=lambda x: x.start):
        if want is not None:
            lo, hi = _overlap(pc.span(want[0]), want[1:])
            if lo >= hi:
                continue
        if want is not None and want[0] == pc.lead:
            off = pc.span(pc.lead)[0]
            t = pc.read(lo - off, hi - off)
        else:
            t = pc.read(0, pc.shape[pc.lead])
            if want is not None:
                t = t.narrow(want[0], lo - pc.span(want[0])[0], hi - lo)
        parts.append(t)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=pieces[0].split)
    return out.contiguous().clone()


def want_of(p) -> tuple | None:
    """The slice of its single-process tensor that parameter `p` (tp_split_dim / tp_rank / tp_size) holds."""
    dim = getattr(p, "tp_split_dim", None)
    if dim is None:
        return None
    n = p.shape[dim]
    return dim, p.tp_rank * n, (p.tp_rank + 1) * n


class _Shard:
    """The common face of a shard of either format: parts of its tree, pieces of its parameters and moments,
    ranges of its ZeRO-1 flat vectors."""

    root: dict

    def load(self, node):
        return node

    def get(self, *path):
        """The part of the shard object at `path` (None if absent), its tensors read."""
        node = self.root
        for k in path:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return self.load(node)


class _V3(_Shard):
    """A format-3 shard: the tree comes from its index, tensors (or rows of them) from the data file."""

    def __init__(self, step_dir, name, meta, counter):
        self.f = ShardFile(step_dir, name, meta, counter)
        self.tree = self.root = self.f.tree

    def load(self, node):
        return self.f.materialize(node)

    def names(self) -> list:
        return list(self.tree.get("model") or {})

    def shape(self, name: str) -> tuple:
        return self.f.shape(tensor_key(self.tree["model"][name]))

    def has_moments(self) -> bool:
        return isinstance(self.tree.get("optimizer"), dict)

    def piece(self, kind: str, name: str, split: int, start: int) -> _Piece | None:
        node = self.tree["model"] if kind == "model" else self.tree["optimizer"][kind]
        if name not in node:  # a parameter that never had a gradient has no Adam state
            return None
        key = tensor_key(node[name])
        lead = self.f.lead(key)
        return _Piece(split, start, self.f.shape(key), lead, lambda a, b: self.f.rows(key, a, b).movedim(0, lead))

    def zero(self) -> dict | None:
        """The ZeRO-1 state of this file's data-parallel rank without its tensors (layout, step, hyper)."""
        z = (self.tree.get("rank") or {}).get("zero")
        if not z:
            return None
        return {
            "shard": self.f.materialize(z["shard"]),
            "step": z["state"]["step"],
            "param_groups": self.f.materialize(z["param_groups"]),
        }

    def flat(self, kind: str, a: int, b: int) -> torch.Tensor:
        """Elements [a, b) of this rank's flat ZeRO-1 vector `kind`."""
        return self.f.rows(tensor_key(self.tree["rank"]["zero"]["state"][kind]), a, b)


class _V2(_Shard):
    """A format-2 .pt shard: its sha256 checked over the whole file, then memory-mapped and sliced on demand."""

    def __init__(self, step_dir, name, meta, counter):
        path = os.path.join(step_dir, name + ".pt")
        self.obj = self.root = load_file(step_dir, name + ".pt", meta, mmap=True)
        counter["bytes"] += os.path.getsize(path)

    def names(self) -> list:
        return list(self.obj.get("model") or {})

    def shape(self, name: str) -> tuple:
        return tuple(self.obj["model"][name].shape)

    def has_moments(self) -> bool:
        return isinstance(self.obj.get("optimizer"), dict)

    def piece(self, kind: str, name: str, split: int, start: int) -> _Piece | None:
        held = self.obj["model"] if kind == "model" else self.obj["optimizer"][kind]
        if name not in held:
            return None
        t = held[name]
        lead = max(split, 0)
        return _Piece(split, start, tuple(t.shape), lead, lambda a, b: t.narrow(lead, a, b - a))

    def zero(self) -> dict | None:
        z = (self.obj.get("rank") or {}).get("zero")
        if not z:
            return None
        return {"shard": z["shard"], "step": z["state"]["step"], "param_groups": z["param_groups"]}

    def flat(self, kind: str, a: int, b: int) -> torch.Tensor:
        return self.obj["rank"]["zero"]["state"][kind][a:b]


class StepReader:
    """The shards of one step directory, opened when first needed, with the bytes read counted."""

    def __init__(self, step_dir: str, meta: dict):
        self.step_dir, self.meta, self.layout = step_dir, meta, meta["layout"]
        size = os.path.getsize(os.path.join(step_dir, META))
        self.counter = {"bytes": size, "metadata": size}
        self._shards: dict = {}
        self._holder: dict | None = None

    @property
    def bytes_read(self) -> int:
        """Everything read so far: meta.json, indexes, data blocks (format 2: whole files)."""
        return self.counter["bytes"]

    @property
    def metadata_bytes(self) -> int:
        """The part of bytes_read that is meta.json and shard indexes."""
        return self.counter["metadata"]

    def shard(self, t: int, p: int, d: int = 0):
        key = (t, p, d)
        if key not in self._shards:
            cls = _V3 if self.meta["format"] >= 3 else _V2
            self._shards[key] = cls(self.step_dir, shard_name(t, p, d), self.meta, self.counter)
        return self._shards[key]

    def holder(self, name: str) -> int:
        """The first pipeline position whose shards hold parameter `name` (a tied table may be on several)."""
        if self._holder is None:
            holds = self.meta.get("holds") or {}  # format 3: meta.json says; format 2: the shards do
            self._holder = {}
            for p in reversed(range(self.layout["pp"])):  # reversed: the first position wins
                names = holds.get(shard_name(0, p)) or self.shard(0, p).names()
                self._holder.update({n: p for n in names})
        if name not in self._holder:
            raise UserError(f"checkpoint {self.step_dir} has no parameter {name}; it was written for another model")
        return self._holder[name]

    def names(self) -> list:
        """Every parameter name of the checkpoint (single-process names), in the order of the shards."""
        out = []
        for p in range(self.layout["pp"]):
            out += [n for n in self.shard(0, p).names() if self.holder(n) == p]
        return out

    def split(self, name: str) -> list:
        """[split dim (-1: whole), *full shape] of parameter `name`."""
        return self.shard(0, self.holder(name)).get("split", name)

    def has_moments(self) -> bool:
        """Whether the checkpoint holds optimizer state (canonical per parameter, or ZeRO-1 flat)."""
        first = self.shard(0, 0)
        return first.has_moments() or first.zero() is not None

    def _tp_ranks(self, split: int, full: list, want: tuple | None) -> list[int]:
        """The tensor-parallel positions whose part of a tensor overlaps `want`."""
        tp = self.layout["tp"]
        if split < 0:
            return [0]
        n = full[split] // tp
        if want is None or want[0] != split:
            return list(range(tp))
        return [t for t in range(tp) if t * n < want[2] and (t + 1) * n > want[1]]

    def region(self, kind: str, name: str, want: tuple | None, full_shape: tuple | None = None) -> torch.Tensor | None:
        """Slice `want` of parameter `name` ("model") or of its Adam moment ("exp_avg" / "exp_avg_sq"; None
        where it has none)."""
        p = self.holder(name)
        split, *full = self.split(name)
        if full_shape is not None and tuple(full) != tuple(full_shape):
            raise UserError(
                f"checkpoint parameter {name} has shape {tuple(full)}, this model needs {tuple(full_shape)}"
            )
        pieces = []
        for t in self._tp_ranks(split, full, want):
            sh = self.shard(t, p)
            start = t * (full[split] // self.layout["tp"]) if split >= 0 else 0
            if split >= 0 and tuple(sh.shape(name)) == tuple(full):  # an unsplit copy under a split table
                split, start = -1, 0
            if kind == "model" or sh.has_moments():
                piece = sh.piece(kind, name, split, start)
            else:
                piece = self._zero_piece(kind, name, t, p, split, start)
            if piece is None:
                return None
            pieces.append(piece)
            if split < 0:
                break
        return assemble(pieces, want)

    def moment_step(self, name: str) -> torch.Tensor:
        sh = self.shard(0, self.holder(name))
        if sh.has_moments():
            return sh.get("optimizer", "step", name).clone()
        return torch.tensor(float(sh.zero()["step"]))

    def hyper(self) -> dict:
        sh = self.shard(0, 0)
        if sh.has_moments():
            return sh.get("optimizer", "hyper")
        return dict(sh.zero()["param_groups"][0])

    def _zero_piece(self, kind: str, name: str, t: int, p: int, split: int, start: int) -> _Piece:
        """A parameter's moment inside the flat ZeRO-1 vectors of position (t, p): rows along dim 0 are one flat
        range, read from the data-parallel files that it overlaps."""
        main = self.shard(t, p)
        offset, off, shape = None, 0, None
        for n in main.names():
            s = main.shape(n)
            if n == name:
                offset, shape = off, s
            off += math.prod(s)
        numel, dp = off, self.layout["dp"]
        row = math.prod(shape[1:]) if len(shape) > 1 else 1

        def read(a: int, b: int) -> torch.Tensor:
            lo, hi = offset + a * row, offset + b * row
            parts = []
            for d in range(dp):
                zs, ze = flat_range(numel, dp, d)
                x, y = max(lo, zs), min(hi, ze)
                if x < y:
                    parts.append(self.shard(t, p, d).flat(kind, x - zs, y - zs))
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            return flat.reshape((b - a,) + tuple(shape[1:]))

        return _Piece(split, start, tuple(shape), 0, read)
