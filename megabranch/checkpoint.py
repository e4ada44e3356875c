"""Checkpoints: sharded step directories, atomic publication, safe loading, resharding, averaging.

A save directory:

    <save_dir>/step_<N>/meta.json                 layout, model config, vocabulary hash, versions, sha256 per file
    <save_dir>/step_<N>/shard_tp<t>_pp<p>.pt      written by data-parallel rank 0 of grid position (t, p): its
                                                  parameters (by single-process name, tensor-parallel slices),
                                                  optimizer state, step, alpha, its own RNG / data position
    <save_dir>/step_<N>/shard_tp<t>_pp<p>_dp<d>.pt  every other data-parallel rank d: RNG states, data position,
                                                  and its ZeRO-1 optimizer slice when parallel.zero
    <save_dir>/latest, <save_dir>/best            one line each: the name of a step directory

Publication: every rank writes into `step_<N>.tmp-<id>`; the ranks then exchange their files' sha256 (which
is the barrier: rank 0 goes on only when every rank has finished writing), rank 0 writes meta.json, renames the
directory to step_<N>, then rewrites `latest` (and `best`) atomically, last. A kill at any moment leaves
`latest` pointing at a complete step directory; stale `.tmp-*` directories are removed by the next save.
keep-last-K cleanup never removes what `latest` or `best` point to.

Loading: only `torch.load(weights_only=True)` (plain tensors, numbers, strings, lists, dicts), never arbitrary
pickle; every file's sha256 is checked against meta.json first. Any problem is a one-line UserError naming the
file. A checkpoint from another (tp, pp, vpp) layout is resharded on load: the shards are merged into full
single-process tensors (each parameter carries its tensor-parallel split dimension) and cut again for the
reading rank (`load_for_rank`).

Optimizer state travels in a layout-free "canonical" form: per parameter name, AdamW's step / exp_avg /
exp_avg_sq shaped like that rank's parameter slice (ZeRO-1 shards keep their own flat form per data-parallel
rank and are unflattened by name when resharding).

This module knows files, layouts and tensors; nothing about the training loop.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from .errors import UserError

FORMAT_VERSION = 2
META = "meta.json"
_STEP_RE = re.compile(r"step_(\d+)")


# --- small helpers --------------------------------------------------------------------------------------


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write to a temporary file next to `path`, fsync, rename over it: readers see the old or the new file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_file(obj, path: str) -> str:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return sha256_file(path)


def shard_name(tp_rank: int, pp_rank: int, dp_rank: int = 0) -> str:
    return f"shard_tp{tp_rank}_pp{pp_rank}.pt" if dp_rank == 0 else f"shard_tp{tp_rank}_pp{pp_rank}_dp{dp_rank}.pt"


def versions() -> dict:
    from . import __version__

    return {"torch": torch.__version__, "megabranch": __version__}


# --- save -----------------------------------------------------------------------------------------------


def step_dirs(save_dir: str) -> list[tuple[int, str]]:
    """Published step_<N> directories sorted by N."""
    found = []
    for p in glob.glob(os.path.join(save_dir, "step_*")):
        m = _STEP_RE.fullmatch(os.path.basename(p))
        if m and os.path.isdir(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def _pointer(save_dir: str, name: str) -> str | None:
    path = os.path.join(save_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return fh.read().strip() or None


def has_checkpoints(save_dir: str) -> bool:
    return bool(step_dirs(save_dir)) or _pointer(save_dir, "latest") is not None or bool(
        glob.glob(os.path.join(save_dir, "checkpoint_*.pt")) + glob.glob(os.path.join(save_dir, "rank*", "checkpoint_*.pt"))
    )


def write_step_dir(final: str, files: dict, meta: dict) -> str:
    """Write a complete step directory from one process (converters, averaging): files name -> object."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shas = {name: _save_file(obj, os.path.join(tmp, name)) for name, obj in files.items()}
    _publish(tmp, final, dict(meta, files=shas))
    return final


def _publish(tmp: str, final: str, meta: dict) -> None:
    meta = dict(meta, format=FORMAT_VERSION, versions=versions())
    atomic_write_bytes((json.dumps(meta, indent=1, sort_keys=True) + "\n").encode(), os.path.join(tmp, META))
    parent, base = os.path.dirname(os.path.abspath(final)), os.path.basename(final)
    old, repoint = None, []
    if os.path.exists(final):  # the same step saved again (a resume from an older step): replace it
        # pointers naming it are moved to the complete new copy first, so none ever dangles
        repoint = [n for n in ("latest", "best") if _pointer(parent, n) == base]
        for n in repoint:
            _set_pointer(parent, n, os.path.basename(tmp))
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(parent)
    for n in repoint:
        _set_pointer(parent, n, base)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_step(save_dir: str, step: int, files: dict, meta: dict, is_best: bool = False, keep_last: int = 0) -> str:
    """Collective when torch.distributed is initialised: every rank passes its own files (name -> object,
    possibly none). Returns the published step directory."""
    rank, world = _dist_world()
    final = os.path.join(save_dir, f"step_{step}")
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        pointed = {_pointer(save_dir, "latest"), _pointer(save_dir, "best")}
        for stale in glob.glob(os.path.join(save_dir, "step_*.tmp-*")) + glob.glob(os.path.join(save_dir, "step_*.old-*")):
            if os.path.basename(stale) not in pointed:  # a killed save's leftovers (never what a pointer names)
                shutil.rmtree(stale, ignore_errors=True)
        tmp = f"{final}.tmp-{os.getpid()}"
        os.makedirs(tmp)
        names = [tmp]
    else:
        names = [None]
    if world > 1:
        dist.broadcast_object_list(names, src=0)
    tmp = names[0]
    mine = {name: _save_file(obj, os.path.join(tmp, name)) for name, obj in files.items()}
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, mine)  # the barrier: nobody gets here before every rank has written
    else:
        gathered = [mine]
    if rank == 0:
        shas = {}
        for part in gathered:
            shas.update(part)
        _publish(tmp, final, dict(meta, step=step, files=shas))
        _set_pointer(save_dir, "latest", os.path.basename(final))
        if is_best:
            _set_pointer(save_dir, "best", os.path.basename(final))
        if keep_last > 0:
            prune(save_dir, keep_last)
    if world > 1:
        dist.barrier()
    return final


def _set_pointer(save_dir: str, name: str, target: str) -> None:
    atomic_write_bytes((target + "\n").encode(), os.path.join(save_dir, name))


def prune(save_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` step directories, never one that `latest` or `best` names."""
    protected = {_pointer(save_dir, "latest"), _pointer(save_dir, "best")}
    removed = []
    for _, path in step_dirs(save_dir)[:-keep_last]:
        if os.path.basename(path) not in protected:
            # renamed first (atomic), so a kill during the deletion never leaves a half-deleted step_<N>
            doomed = f"{path}.old-{os.getpid()}"
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            removed.append(path)
    return removed


# --- load -----------------------------------------------------------------------------------------------


def resolve(path: str, prefer: str = "latest") -> str:
    """A step directory, a save directory (-> its `prefer` pointer, then the other one), or a `latest` /
    `best` pointer file -> the step directory."""
    if os.path.isfile(path) and os.path.basename(path) in ("latest", "best"):
        target = _pointer(os.path.dirname(path) or ".", os.path.basename(path))
        return _check_target(os.path.join(os.path.dirname(path) or ".", target or ""), path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, META)):
            return path
        order = [prefer] + [p for p in ("latest", "best") if p != prefer]
        for name in order:
            target = _pointer(path, name)
            if target:
                return _check_target(os.path.join(path, target), os.path.join(path, name))
        if glob.glob(os.path.join(path, "checkpoint_*.pt")):
            raise UserError(f"{path} holds old single-file checkpoints (checkpoint_*.pt); this megabranch reads "
                            "step_<N>/ directories only")
        raise UserError(f"no checkpoint in {path} (no latest/best pointer and no meta.json)")
    if path.endswith(".pt") and os.path.isfile(path):
        raise UserError(f"{path} is a single file; pass the step directory that holds it (step_<N>/) or the save directory")
    raise UserError(f"checkpoint not found: {path}")


def _check_target(step_dir: str, pointer: str) -> str:
    if not os.path.isfile(os.path.join(step_dir, META)):
        raise UserError(f"{pointer} points at {step_dir}, which is missing or incomplete")
    return step_dir


def read_meta(step_dir: str) -> dict:
    path = os.path.join(step_dir, META)
    if not os.path.isfile(path):
        raise UserError(f"{step_dir} is not a megabranch checkpoint: {META} missing")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("files"), dict):
        raise UserError(f"{path} is not a megabranch checkpoint description (format {FORMAT_VERSION})")
    return meta


def load_file(step_dir: str, name: str, meta: dict | None = None) -> dict:
    """One shard, its sha256 checked against meta.json, loaded with weights_only=True."""
    meta = meta if meta is not None else read_meta(step_dir)
    path = os.path.join(step_dir, name)
    want = meta["files"].get(name)
    if want is None:
        raise UserError(f"{path} is not listed in {os.path.join(step_dir, META)}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint shard missing: {path}")
    if sha256_file(path) != want:
        raise UserError(f"checkpoint shard {path} is corrupt: its sha256 differs from {META} (truncated or modified)")
    return safe_load(path)


def safe_load(path: str):
    """torch.load(weights_only=True); any failure is a one-line UserError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle with code, bit rot: all the file's fault
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot load checkpoint file {path} (corrupt, truncated or carrying code): {first}") from None


def verify(step_dir: str) -> dict:
    """Check every file's sha256 and that each loads safely; -> meta."""
    meta = read_meta(step_dir)
    for name in sorted(meta["files"]):
        load_file(step_dir, name, meta)
    return meta


# --- canonical optimizer state --------------------------------------------------------------------------


def is_zero(optimizer) -> bool:
    return hasattr(optimizer, "gather_full_state")


def optimizer_to_canonical(optimizer, names: list[str]) -> dict | None:
    """torch AdamW state -> {"step"|"exp_avg"|"exp_avg_sq": {name: tensor}, "hyper": {...}}; None for ZeRO-1
    (whose per-rank flat shards are saved as they are)."""
    if is_zero(optimizer):
        return None
    sd = optimizer.state_dict()
    (group,) = sd["param_groups"]
    out = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}, "hyper": {k: v for k, v in group.items() if k != "params"}}
    for i, name in zip(group["params"], names):
        st = sd["state"].get(i)
        if st:
            for k in ("step", "exp_avg", "exp_avg_sq"):
                out[k][name] = st[k].detach().clone()
    return out


def _flat_to_canonical(zero_states: list[dict], shapes: dict) -> dict:
    """ZeRO-1 shards of one (tp, pp) position (in dp order) -> canonical state for `shapes` (name -> local
    shape, in the optimizer's parameter order)."""
    numel = zero_states[0]["shard"]["numel"]
    flat = {k: torch.cat([z["state"][k].reshape(-1) for z in zero_states])[:numel] for k in ("exp_avg", "exp_avg_sq")}
    step = torch.tensor(float(zero_states[0]["state"]["step"]))
    out = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}, "hyper": dict(zero_states[0]["param_groups"][0])}
    off = 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= int(s)
        out["step"][name] = step.clone()
        for k in ("exp_avg", "exp_avg_sq"):
            out[k][name] = flat[k][off : off + n].reshape(shape).clone()
        off += n
    return out


@torch.no_grad()
def load_optimizer(optimizer, names: list[str], state: dict) -> bool:
    """Restore `optimizer` (torch AdamW or ZeRO-1) from load_for_rank's result. A checkpoint without optimizer
    state (averaged, imported, converted with --no-optimizer) leaves it fresh: -> False."""
    canon, zero = state.get("optimizer"), state.get("zero")
    if canon is None and zero is None:
        return False
    if is_zero(optimizer):
        if zero is not None and zero.get("shard") == optimizer._layout():
            optimizer.load_state_dict(zero)
            return True
        if canon is None:
            raise UserError("checkpoint holds no optimizer state for this rank")
        params = optimizer._params
        full = {"step": int(float(canon["step"][names[0]])) if canon["step"] else 0, "master": None,
                "param_groups": [{k: v for k, v in canon["hyper"].items() if k in optimizer.param_groups[0]}],
                "numel": optimizer.numel}
        for k in ("exp_avg", "exp_avg_sq"):
            full[k] = torch.cat([canon[k].get(n, torch.zeros_like(p)).reshape(-1).float() for n, p in zip(names, params)])
        optimizer.load_full_state(full)
        return True
    if canon is None:
        raise UserError("checkpoint holds no optimizer state for this rank (a ZeRO-1 shard for another layout)")
    sd = optimizer.state_dict()
    group = sd["param_groups"][0]
    for k, v in canon["hyper"].items():
        if k in group:
            group[k] = tuple(v) if k == "betas" else v
    sd["state"] = {}
    for i, name in zip(group["params"], names):
        if name in canon["exp_avg"]:
            sd["state"][i] = {k: canon[k][name].clone() for k in ("step", "exp_avg", "exp_avg_sq")}
    optimizer.load_state_dict(sd)
    return True


@torch.no_grad()
def restore(params: dict, optimizer, state: dict) -> None:
    """Copy load_for_rank's parameters into a trainer's `params` (name -> parameter) and restore its optimizer."""
    for k, p in params.items():
        p.copy_(state["model"][k])
    load_optimizer(optimizer, list(params), state)


# --- shards: merge and cut ------------------------------------------------------------------------------


def split_info(params: dict) -> dict:
    """name -> [split dim (-1: not split), *full shape] for parameters that may carry tp_split_dim."""
    from .parallel.parallelize import full_shape

    return {n: [getattr(p, "tp_split_dim", None) if getattr(p, "tp_split_dim", None) is not None else -1,
                *[int(s) for s in full_shape(p)]] for n, p in params.items()}


def _merge(pieces: dict, split: dict) -> dict:
    """pieces: name -> {tp_rank: slice} -> name -> full tensor."""
    out = {}
    for name, by_tp in pieces.items():
        dim = split[name][0]
        if dim < 0 or len(by_tp) == 1 and tuple(next(iter(by_tp.values())).shape) == tuple(split[name][1:]):
            out[name] = next(iter(by_tp.values()))
        else:
            out[name] = torch.cat([by_tp[t] for t in sorted(by_tp)], dim=dim)
    return out


def consolidate(step_dir: str, meta: dict | None = None, optimizer: bool = True) -> tuple[dict, dict | None]:
    """-> (full single-process parameters by name, full canonical optimizer state or None)."""
    meta = meta if meta is not None else read_meta(step_dir)
    lay = meta["layout"]
    pieces: dict = {}
    opt_pieces: dict = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}}
    split: dict = {}
    hyper = None
    have_opt = optimizer
    for p in range(lay["pp"]):
        for t in range(lay["tp"]):
            shard = load_file(step_dir, shard_name(t, p), meta)
            split.update(shard["split"])
            for name, tensor in shard["model"].items():
                pieces.setdefault(name, {}).setdefault(t, tensor)  # a tied table held by several stages: first copy
            if not have_opt:
                continue
            canon = shard.get("optimizer")
            if canon is None and lay.get("zero"):
                zs = [shard["rank"]["zero"]] + [load_file(step_dir, shard_name(t, p, d), meta)["rank"]["zero"]
                                                for d in range(1, lay["dp"])]
                canon = _flat_to_canonical(zs, {n: tuple(v.shape) for n, v in shard["model"].items()})
            if canon is None:
                have_opt = False
                continue
            hyper = hyper or canon["hyper"]
            for k in opt_pieces:
                for name, tensor in canon[k].items():
                    opt_pieces[k].setdefault(name, {}).setdefault(t, tensor)
    model = _merge(pieces, split)
    if not have_opt:
        return model, None
    opt = {k: _merge(opt_pieces[k], split) if k != "step" else {n: next(iter(v.values())) for n, v in opt_pieces[k].items()}
           for k in opt_pieces}
    opt["hyper"] = hyper or {}
    return model, opt


def cut(full: dict, params: dict) -> dict:
    """Full tensors -> the slices held by `params` (name -> parameter carrying tp_split_dim / tp_rank / tp_size,
    real or meta)."""
    from .parallel.parallelize import full_shape, shard_of

    out = {}
    for name, p in params.items():
        if name not in full:
            raise UserError(f"checkpoint has no parameter {name}; it was written for another model")
        t = full[name]
        if tuple(t.shape) != full_shape(p):
            raise UserError(f"checkpoint parameter {name} has shape {tuple(t.shape)}, this model needs {full_shape(p)}")
        out[name] = shard_of(t, p).clone()
    return out


def _same_layout(lay: dict, pos: dict) -> bool:
    return all(lay.get(k) == pos.get(k) for k in ("tp", "pp", "vpp", "layout"))


def load_for_rank(step_dir: str, meta: dict, position: dict, params: dict) -> dict:
    """What one rank needs to resume: {"model": {name: slice}, "optimizer": canonical or None, "zero": this
    rank's ZeRO-1 shard or None, "rng", "data", "step", "scaler" (fp16 loss scaler state or None), "resharded"}.

    position: tp, pp, vpp, layout, dp, zero, tp_rank, pp_rank, dp_rank of the reading rank; params: its
    parameters by canonical name. Same (tp, pp, vpp, layout): its own shard is read (and its own data-parallel
    rank file: RNG, data position, ZeRO slice). Otherwise every shard is read, merged and cut for this rank."""
    lay = meta["layout"]
    t, p, d = position["tp_rank"], position["pp_rank"], position["dp_rank"]
    if _same_layout(lay, position):
        shard = load_file(step_dir, shard_name(t, p), meta)
        shapes_ok = set(shard["model"]) == set(params) and all(
            tuple(shard["model"][n].shape) == tuple(q.shape) for n, q in params.items())
        if shapes_ok:
            mine = shard["rank"]
            if lay.get("dp") == position.get("dp") and d > 0:
                mine = load_file(step_dir, shard_name(t, p, d), meta)["rank"]
            same_dp = lay.get("dp") == position.get("dp")
            out = {"model": shard["model"], "optimizer": shard.get("optimizer"), "zero": mine.get("zero") if same_dp else None,
                   "rng": mine.get("rng") if same_dp else None, "data": mine.get("data"), "step": int(shard["step"]),
                   "scaler": shard.get("scaler") or None, "resharded": False}
            if out["optimizer"] is None and out["zero"] is None:  # ZeRO-1 state under another dp size
                _, opt = consolidate(step_dir, meta)
                out["optimizer"] = cut_optimizer(opt, params)
            return out
    model, opt = consolidate(step_dir, meta)
    first = load_file(step_dir, shard_name(0, 0), meta)
    return {"model": cut(model, params), "optimizer": cut_optimizer(opt, params), "zero": None, "rng": None,
            "data": first["rank"].get("data"), "step": int(first["step"]), "scaler": first.get("scaler") or None,
            "resharded": True}


def cut_optimizer(opt: dict | None, params: dict) -> dict | None:
    """A full canonical optimizer state -> the slices of the parameters in `params` that it has state for."""
    if opt is None:
        return None
    held = {n: q for n, q in params.items() if n in opt["exp_avg"]}
    return {"step": {n: opt["step"][n] for n in held}, "exp_avg": cut(opt["exp_avg"], held),
            "exp_avg_sq": cut(opt["exp_avg_sq"], held), "hyper": opt["hyper"]}


# --- single-process view (generation, analysis, conversion) --------------------------------------------


def load_checkpoint(path: str, prefer: str = "latest") -> dict:
    """Any checkpoint (step dir, save dir, pointer file) -> {"model": single-process parameters by name (full
    tensors), "config", "vocab_size", "tgt_vocab_size", "vocab_sha256", "step", "meta", "step_dir"}."""
    step_dir = resolve(path, prefer)
    meta = read_meta(step_dir)
    model, _ = consolidate(step_dir, meta, optimizer=False)
    if meta["config"].get("model", {}).get("share_all_embeddings") and "encoder.embed.table.weight" in model:
        model.setdefault("decoder.embed.table.weight", model["encoder.embed.table.weight"])  # build_model's alias
    return {"model": model, "config": meta["config"], "vocab_size": meta["vocab_size"],
            "tgt_vocab_size": meta.get("tgt_vocab_size"), "vocab_sha256": meta.get("vocab_sha256"),
            "step": int(meta["step"]), "meta": meta, "step_dir": step_dir}


def single_process_files(model: dict, step: int, optimizer: dict | None = None, rank: dict | None = None) -> dict:
    """The files of a (tp, pp) = (1, 1) checkpoint holding full tensors."""
    split = {n: [-1, *[int(s) for s in t.shape]] for n, t in model.items()}
    return {shard_name(0, 0): {"model": model, "split": split, "optimizer": optimizer, "step": step,
                               "rank": rank or {}}}


def single_layout() -> dict:
    return {"tp": 1, "pp": 1, "vpp": 1, "dp": 1, "layout": "single", "zero": False}


def average(step_dirs_: list[str]) -> tuple[dict, dict]:
    """fairseq's average_checkpoints: the mean (in float64, cast back) of the parameters of several
    checkpoints of one model, any layouts. -> (full parameters, meta of the newest)."""
    if not step_dirs_:
        raise UserError("no checkpoints to average")
    metas = [read_meta(s) for s in step_dirs_]
    models = [consolidate(s, m, optimizer=False)[0] for s, m in zip(step_dirs_, metas)]
    keys = set(models[0])
    for s, m in zip(step_dirs_, models):
        if set(m) != keys or any(m[k].shape != models[0][k].shape for k in keys):
            raise UserError(f"{s} has different parameters than {step_dirs_[0]}; cannot average")
    avg = {}
    for k in models[0]:
        t = models[0][k]
        avg[k] = (sum(m[k].double() for m in models) / len(models)).to(t.dtype) if t.is_floating_point() else t
    newest = max(zip(metas, step_dirs_), key=lambda x: int(x[0]["step"]))[0]
    return avg, newest
