"""Moving checkpoints between (tp, pp, vpp, dp) layouts, and the single-process view of any checkpoint.

A rank resuming from another layout reads only what it owns (`load_for_rank` over slice_reader.StepReader):
for each of its parameters the slice of the single-process tensor it holds, taken from the shards that hold
the overlapping parts, and the same slices of the Adam moments (per parameter, or from ZeRO-1's flat vectors).
Nothing is merged into full tensors except by `consolidate`, the single-process view (conversion, averaging,
decoding), which assembles every tensor whole.
"""

from __future__ import annotations

from ..errors import UserError
from ..parallel.parallelize import full_shape, shard_of
from ..parallel.zero import flat_range
from .reading import read_meta, resolve, shard_name
from .slice_reader import MOMENTS, StepReader, want_of


def consolidate(
    step_dir: str, meta: dict | None = None, optimizer: bool = True, reader: StepReader | None = None
) -> tuple[dict, dict | None]:
    """-> (full single-process parameters by name, full canonical optimizer state or None): the whole model in
    memory, for single-process consumers."""
    meta = meta if meta is not None else read_meta(step_dir)
    reader = reader or StepReader(step_dir, meta)
    names = reader.names()
    model = {n: reader.region("model", n, None) for n in names}
    if not (optimizer and reader.has_moments()):
        return model, None
    opt = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}, "hyper": reader.hyper()}
    for n in names:
        moments = {k: reader.region(k, n, None) for k in MOMENTS}
        if all(v is not None for v in moments.values()):
            opt["step"][n] = reader.moment_step(n)
            for k, v in moments.items():
                opt[k][n] = v
    return model, opt


def cut(full: dict, params: dict) -> dict:
    """Full tensors -> the slices held by `params` (name -> parameter carrying tp_split_dim / tp_rank / tp_size,
    real or meta)."""
    out = {}
    for name, p in params.items():
        if name not in full:
            raise UserError(f"checkpoint has no parameter {name}; it was written for another model")
        t = full[name]
        if tuple(t.shape) != full_shape(p):
            raise UserError(f"checkpoint parameter {name} has shape {tuple(t.shape)}, this model needs {full_shape(p)}")
        out[name] = shard_of(t, p).clone()
    return out


def cut_optimizer(opt: dict | None, params: dict) -> dict | None:
    """A full canonical optimizer state -> the slices of the parameters in `params` that it has state for."""
    if opt is None:
        return None
    held = {n: q for n, q in params.items() if n in opt["exp_avg"]}
    return {
        "step": {n: opt["step"][n] for n in held},
        "exp_avg": cut(opt["exp_avg"], held),
        "exp_avg_sq": cut(opt["exp_avg_sq"], held),
        "hyper": opt["hyper"],
    }


def _same_layout(lay: dict, pos: dict) -> bool:
    return all(lay.get(k) == pos.get(k) for k in ("tp", "pp", "vpp", "layout"))


def _zero_names(position: dict, params: dict) -> set:
    """The parameters whose flat ranges overlap the slice a ZeRO-1 rank of `position` owns."""
    numel = sum(p.numel() for p in params.values())
    start, end = flat_range(numel, position["dp"], position["dp_rank"])
    out, off = set(), 0
    for name, p in params.items():
        if off < end and off + p.numel() > start:
            out.add(name)
        off += p.numel()
    return out


def _sliced_optimizer(reader: StepReader, position: dict, params: dict) -> dict | None:
    """The canonical optimizer state of `params`' slices (a ZeRO-1 rank: only of the parameters its flat
    slice overlaps), read from whatever form the checkpoint holds."""
    if not reader.has_moments():
        return None
    names = _zero_names(position, params) if position.get("zero") else set(params)
    out = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}, "hyper": reader.hyper()}
    for name, p in params.items():
        if name not in names:
            continue
        moments = {k: reader.region(k, name, want_of(p), full_shape(p)) for k in MOMENTS}
        if all(v is not None for v in moments.values()):
            out["step"][name] = reader.moment_step(name)
            for k, v in moments.items():
                out[k][name] = v
    return out


def load_for_rank(step_dir: str, meta: dict, position: dict, params: dict, reader: StepReader | None = None) -> dict:
    """What one rank needs to resume: {"model": {name: slice}, "optimizer": canonical or None, "zero": this
    rank's ZeRO-1 shard or None, "rng", "data", "step", "scaler" (fp16 loss scaler state or None), "resharded",
    "bytes_read"}.

    position: tp, pp, vpp, layout, dp, zero, tp_rank, pp_rank, dp_rank of the reading rank; params: its
    parameters by canonical name. Same (tp, pp, vpp, layout): its own shard is read (and its own data-parallel
    rank file: RNG, data position, ZeRO slice). Otherwise it reads the slices it owns, and only those."""
    reader = reader or StepReader(step_dir, meta)
    lay = meta["layout"]
    t, p, d = position["tp_rank"], position["pp_rank"], position["dp_rank"]
    same_dp = lay.get("dp") == position.get("dp")
    if _same_layout(lay, position):
        own = reader.shard(t, p)
        if set(own.names()) == set(params) and all(tuple(own.shape(n)) == tuple(q.shape) for n, q in params.items()):
            mine = reader.shard(t, p, d) if same_dp and d > 0 else own
            zero = mine.get("rank", "zero") if same_dp and position.get("zero") and lay.get("zero") else None
            opt = own.get("optimizer") if zero is None and not position.get("zero") else None
            if zero is None and opt is None:  # ZeRO-1 state under another dp size, or to or from ZeRO-1
                opt = _sliced_optimizer(reader, position, params)
            return {
                "model": {n: own.get("model", n) for n in params},
                "optimizer": opt,
                "zero": zero,
                "rng": mine.get("rank", "rng") if same_dp else None,
                "data": mine.get("rank", "data"),
                "step": int(own.get("step")),
                "scaler": own.get("scaler") or None,
                "resharded": False,
                "bytes_read": reader.bytes_read,
            }
    model = {name: reader.region("model", name, want_of(q), full_shape(q)) for name, q in params.items()}
    first = reader.shard(0, 0)
    return {
        "model": model,
        "optimizer": _sliced_optimizer(reader, position, params),
        "zero": None,
        "rng": None,
        "data": first.get("rank", "data"),
        "step": int(first.get("step")),
        "scaler": first.get("scaler") or None,
        "resharded": True,
        "bytes_read": reader.bytes_read,
    }


# --- single-process view (generation, analysis, conversion) --------------------------------------------


def load_checkpoint(path: str, prefer: str = "latest") -> dict:
    """Any checkpoint (step dir, save dir, pointer file) -> {"model": single-process parameters by name (full
    tensors), "config", "vocab_size", "tgt_vocab_size", "vocab_sha256", "step", "meta", "step_dir"}."""
    step_dir = resolve(path, prefer)
    meta = read_meta(step_dir)
    model, _ = consolidate(step_dir, meta, optimizer=False)
    if meta["config"].get("model", {}).get("share_all_embeddings") and "encoder.embed.table.weight" in model:
        model.setdefault("decoder.embed.table.weight", model["encoder.embed.table.weight"])  # build_model's alias
    return {
        "model": model,
        "config": meta["config"],
        "vocab_size": meta["vocab_size"],
        "tgt_vocab_size": meta.get("tgt_vocab_size"),
        "vocab_sha256": meta.get("vocab_sha256"),
        "step": int(meta["step"]),
        "meta": meta,
        "step_dir": step_dir,
    }


def single_process_files(model: dict, step: int, optimizer: dict | None = None, rank: dict | None = None) -> dict:
    """The files of a (tp, pp) = (1, 1) checkpoint holding full tensors."""
    split = {n: [-1, *[int(s) for s in t.shape]] for n, t in model.items()}
    return {
        shard_name(0, 0): {"model": model, "split": split, "optimizer": optimizer, "step": step, "rank": rank or {}}
    }


def single_layout() -> dict:
    """The layout entry of meta.json for the single-process trainer's checkpoints."""
    return {"tp": 1, "pp": 1, "vpp": 1, "dp": 1, "layout": "single", "zero": False}
