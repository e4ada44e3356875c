"""Reading step directories: find them, check them, load them safely.

Format 3 (written since issue 14) keeps each shard as a safetensors data file plus a JSON index
(shard_format.py): nothing is unpickled, and what is read is checked block by block. Format 2 step directories
(one torch.save .pt file per shard) are still read: only with `torch.load(weights_only=True)` (plain tensors,
numbers, strings, lists, dicts), never arbitrary pickle, after the file's sha256 is checked against meta.json.
Any problem is a one-line UserError naming the file. Every file a reader opens is first resolved inside its
directory (paths.py): a pointer, meta.json or an index naming `../../x` or `/etc/passwd` is refused. Every
pickle-based file megabranch reads (format 2, torchscale, fairseq, DeepSpeed) goes through safe_load. The names
of a save directory's files (FORMAT_VERSION, META, shard_name, step_<N>, the latest/best pointers) are defined
here, once, for the writer too.
"""

from __future__ import annotations

import glob
import json
import os
import re

import torch

from ..errors import UserError
from .paths import contained
from .shard_format import DATA, INDEX, ShardFile, check_data_file, sha256_file

FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)
META = "meta.json"
_STEP_RE = re.compile(r"step_(\d+)")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")  # the class torch's weights_only unpickler refused


def shard_name(tp_rank: int, pp_rank: int, dp_rank: int = 0) -> str:
    """The shard of grid position (tp_rank, pp_rank) written by data-parallel rank dp_rank, without its file
    ending: format 3 has <name>.safetensors + <name>.json, format 2 one <name>.pt."""
    return f"shard_tp{tp_rank}_pp{pp_rank}" if dp_rank == 0 else f"shard_tp{tp_rank}_pp{pp_rank}_dp{dp_rank}"


def shard_files(name: str, fmt: int = FORMAT_VERSION) -> list[str]:
    """The files of shard `name` in format `fmt`."""
    return [name + DATA, name + INDEX] if fmt >= 3 else [name + ".pt"]


def step_dirs(save_dir: str) -> list[tuple[int, str]]:
    """Published step_<N> directories sorted by N."""
    found = []
    for p in glob.glob(os.path.join(save_dir, "step_*")):
        m = _STEP_RE.fullmatch(os.path.basename(p))
        if m and os.path.isdir(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_pointer(save_dir: str, name: str) -> str | None:
    """The step directory name that the pointer file `name` ("latest" or "best") of `save_dir` holds, or None."""
    path = os.path.join(save_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return fh.read().strip() or None


def has_checkpoints(save_dir: str) -> bool:
    return (
        bool(step_dirs(save_dir))
        or read_pointer(save_dir, "latest") is not None
        or bool(
            glob.glob(os.path.join(save_dir, "checkpoint_*.pt"))
            + glob.glob(os.path.join(save_dir, "rank*", "checkpoint_*.pt"))
        )
    )


def resolve(path: str, prefer: str = "latest") -> str:
    """A step directory, a save directory (-> its `prefer` pointer, then the other one), or a `latest` /
    `best` pointer file -> the step directory."""
    if os.path.isfile(path) and os.path.basename(path) in ("latest", "best"):
        save_dir = os.path.dirname(path) or "."
        return _check_target(save_dir, read_pointer(save_dir, os.path.basename(path)) or "", path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, META)):
            return path
        order = [prefer] + [p for p in ("latest", "best") if p != prefer]
        for name in order:
            target = read_pointer(path, name)
            if target:
                return _check_target(path, target, os.path.join(path, name))
        complete = [p for _, p in step_dirs(path) if os.path.isfile(os.path.join(p, META))]
        if complete:  # a kill between the first save's rename and its pointer: the newest complete one
            return complete[-1]
        if glob.glob(os.path.join(path, "checkpoint_*.pt")):
            raise UserError(
                f"{path} holds old single-file checkpoints (checkpoint_*.pt); this megabranch reads "
                "step_<N>/ directories only"
            )
        raise UserError(f"no checkpoint in {path} (no latest/best pointer and no meta.json)")
    if path.endswith(".pt") and os.path.isfile(path):
        raise UserError(
            f"{path} is a single file; pass the step directory that holds it (step_<N>/) or the save directory"
        )
    raise UserError(f"checkpoint not found: {path}")


def _check_target(save_dir: str, target: str, pointer: str) -> str:
    step_dir = contained(save_dir, target, pointer) if target else save_dir
    if not target or not os.path.isfile(os.path.join(step_dir, META)):
        raise UserError(f"{pointer} points at {step_dir}, which is missing or incomplete")
    return step_dir


def read_meta(step_dir: str) -> dict:
    path = os.path.join(step_dir, META)
    if not os.path.isfile(path):
        raise UserError(f"{step_dir} is not a megabranch checkpoint: {META} missing")
    contained(step_dir, META)
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") not in READABLE_FORMATS
        or not isinstance(meta.get("files"), dict)
    ):
        raise UserError(
            f"{path} is not a megabranch checkpoint description (format {' or '.join(map(str, READABLE_FORMATS))})"
        )
    return meta


def load_file(step_dir: str, name: str, meta: dict | None = None, mmap: bool = False) -> dict:
    """One format-2 .pt file, its sha256 checked against meta.json, loaded with weights_only=True (mmap: its
    tensors stay memory-mapped, read when touched)."""
    meta = meta if meta is not None else read_meta(step_dir)
    path = contained(step_dir, name, os.path.join(step_dir, META))
    want = meta["files"].get(name)
    if want is None:
        raise UserError(f"{path} is not listed in {os.path.join(step_dir, META)}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint shard missing: {path}")
    if sha256_file(path) != want:
        raise UserError(f"checkpoint shard {path} is corrupt: its sha256 differs from {META} (truncated or modified)")
    return safe_load(path, mmap)


def load_shard(step_dir: str, name: str, meta: dict | None = None) -> dict:
    """One whole shard (shard_name(...)) of either format, checked, every tensor in memory (tools and tests;
    resuming reads slices: slice_reader.py)."""
    meta = meta if meta is not None else read_meta(step_dir)
    if meta["format"] >= 3:
        return ShardFile(step_dir, name, meta, {"bytes": 0}).materialize()
    return load_file(step_dir, name + ".pt", meta)


def safe_load(path: str, mmap: bool = False, allowed: tuple = ()) -> dict:
    """The one way megabranch unpickles a file (format-2 shards, torchscale and fairseq checkpoints, DeepSpeed
    layer files): torch.load(weights_only=True), which builds tensors, numbers, strings, lists and dicts and
    refuses any other class (nothing in the file can run code), plus the plain classes in `allowed` (fairseq's
    argparse.Namespace). The file must hold a dict. Any failure is a one-line UserError naming the file and what
    is wrong; torch's own text, which advises weights_only=False, is never passed on."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, pickle with code, bit rot: all the file's fault
        if "Weights only load failed" in str(e):
            found = _GLOBAL_RE.search(str(e))
            what = f" ({found.group(1)})" if found else ""
            raise UserError(
                f"refusing to load {path}: it holds pickled objects other than tensors and plain data"
                f"{what}, and code could run on loading; megabranch loads only tensors, numbers, "
                "strings, lists and dicts"
            ) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot load checkpoint file {path} (corrupt or truncated): {first}") from None
    if not isinstance(obj, dict):
        raise UserError(
            f"cannot use {path}: it holds a {type(obj).__name__}, not a dict of tensors (a state dict or a checkpoint)"
        )
    return obj


def verify(step_dir: str) -> dict:
    """Check every file's sha256 and that each loads safely (format 3: every block against its index); -> meta."""
    meta = read_meta(step_dir)
    for name in sorted(meta["files"]):
        path = contained(step_dir, name, os.path.join(step_dir, META))
        if not os.path.isfile(path):
            raise UserError(f"checkpoint shard missing: {path}")
        if meta["format"] < 3:
            load_file(step_dir, name, meta)
        elif sha256_file(path) != meta["files"][name]:
            raise UserError(
                f"checkpoint shard {path} is corrupt: its sha256 differs from {META} (truncated or modified)"
            )
        elif name.endswith(INDEX):
            check_data_file(step_dir, name[: -len(INDEX)], meta)
    return meta
