"""Moving checkpoints between (tp, pp, vpp) layouts, and the single-process view of any checkpoint.

A checkpoint from another layout is resharded on load: the shards are merged into full single-process tensors
(each parameter carries its tensor-parallel split dimension in the shard's "split" table) and cut again for the
reading rank (`load_for_rank`). Optimizer state is merged and cut the same way, in its canonical form
(optimizer_state.py).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..parallel.parallelize import full_shape, shard_of
from .optimizer_state import zero_flat_to_canonical
from .reading import load_file, read_meta, resolve, shard_name


def split_info(params: dict) -> dict:
    """name -> [split dim (-1: not split), *full shape] for parameters that may carry tp_split_dim."""
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


def merge_slices(pieces: dict, split: dict) -> dict:
    """name -> {tp_rank: slice} -> name -> full tensor, by the split table of split_info (for tensors that
    arrive some other way than a step directory: the parallel engine's gathered model)."""
    return _merge(pieces, split)


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
                canon = zero_flat_to_canonical(zs, {n: tuple(v.shape) for n, v in shard["model"].items()})
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
    return {"step": {n: opt["step"][n] for n in held}, "exp_avg": cut(opt["exp_avg"], held),
            "exp_avg_sq": cut(opt["exp_avg_sq"], held), "hyper": opt["hyper"]}


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
    """The layout entry of meta.json for the single-process trainer's checkpoints."""
    return {"tp": 1, "pp": 1, "vpp": 1, "dp": 1, "layout": "single", "zero": False}
