"""Full single-process tensors -> a step directory for any (tp, pp, vpp) grid, built with no processes."""

from __future__ import annotations

from .. import checkpoint
from ..config import Config
from ..errors import UserError
from ..model import canonical_parameters
from ..parallel.grid import Grid
from ..parallel.parallelize import natural_split_dims, split_info
from ..parallel.stage import build_stage
from ..planning.partition import plan_layout


def rank_params(cfg: Config, vocab: int, tgt_vocab: int | None, tp: int, pp: int, vpp: int, layout: str = ""):
    """-> (Layout, {(tp_rank, pp_rank): {canonical name: meta parameter}}, {(tp_rank, pp_rank): {canonical name:
    the dim its checkpoint tensors store leading}}) for a (tp, pp, vpp) grid, built on the meta device with no
    processes (what every rank of such a run would hold)."""
    if vpp > 1 and pp == 1:
        raise UserError(f"--vpp {vpp} needs --pp > 1")
    p = cfg.parallel
    lay = plan_layout(
        cfg.model, pp, vpp, vocab, tgt_vocab or vocab, tp, layout=layout, by=p.balance, recompute=p.recompute
    )
    out, leads = {}, {}
    for pr in range(pp):
        for tr in range(tp):
            grid = Grid(tp=tp, pp=pp, vpp=vpp, tp_rank=tr, pp_rank=pr)
            chunks = build_stage(cfg.model, lay, grid, vocab, tgt_vocab, seed=None, device="meta")
            out[(tr, pr)] = canonical_parameters(chunks, cfg.model)
            dims = natural_split_dims(chunks)
            leads[(tr, pr)] = {n: dims.get(id(q), 0) for n, q in out[(tr, pr)].items()}
    return lay, out, leads


def write_layout(
    out: str,
    cfg: Config,
    meta: dict,
    model: dict,
    opt: dict | None,
    tp: int,
    pp: int,
    vpp: int,
    layout: str = "",
    data: dict | None = None,
) -> str:
    """Write full single-process tensors (and a canonical optimizer state) as a step directory for a grid."""
    vocab, tgt_vocab = meta["vocab_size"], meta.get("tgt_vocab_size")
    lay, ranks, leads = rank_params(cfg, vocab, tgt_vocab, tp, pp, vpp, layout)
    files = {}
    for (t, p), params in ranks.items():
        files[checkpoint.shard_name(t, p)] = {
            "model": checkpoint.cut(model, params),
            "split": split_info(params),
            "lead": leads[(t, p)],
            "optimizer": checkpoint.cut_optimizer(opt, params),
            "scaler": {},
            "step": int(meta["step"]),
            "rank": {"data": data, "rng": None, "zero": None},
        }
    c = cfg.to_dict()
    c["parallel"].update(tp=tp, pp=pp, vpp=vpp, layout=str(lay) if pp > 1 else "")
    new_meta = {k: v for k, v in meta.items() if k not in ("files", "format", "versions", "layout", "config")}
    new_meta.update(config=c, layout={"tp": tp, "pp": pp, "vpp": vpp, "dp": 1, "layout": str(lay), "zero": False})
    if tp == pp == 1:  # the single-process trainer's own layout: it resumes without resharding
        new_meta["layout"]["layout"] = "single"
        files[checkpoint.shard_name(0, 0)]["split"] = {
            n: [-1, *map(int, t.shape)] for n, t in model.items() if n in files[checkpoint.shard_name(0, 0)]["model"]
        }
    return checkpoint.write_step_dir(out, files, new_meta)
