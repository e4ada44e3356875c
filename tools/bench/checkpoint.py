"""Resharding a checkpoint on load, slice reads against the full merge, and the stall of an async save, on 4 gloo
CPU processes.

    python -m tools.bench.checkpoint                                 # 48L-48L d=256 ffn 1024, vocab 8000, Adam state
    python -m tools.bench.checkpoint --layers 8 --d-model 64 --ffn 256 --vocab 1000     # a quick look

A (1, 1) step directory with random weights and Adam moments is written first (one process). Then, for each hop
(1,1) -> (2,2) -> (1,4) -> (4,1), four fresh processes each load the previous layout's checkpoint into their
place of the new grid twice (slice first, then full merge):

* slice: megabranch.checkpoint.load_for_rank, what --resume does: only the slices this rank owns;
* full merge: what load_for_rank did before (issue 14) for any layout change: consolidate every shard into full
  tensors (checkpoint.consolidate), then cut this rank's slices out (checkpoint.cut / cut_optimizer).

Per rank: bytes read / the bytes it owns (fp32 parameters + two Adam moments), peak RSS growth (VmHWM after the
load minus RSS before it, /proc/self/status; the peak is reset first) / the bytes it owns, and wall time. The
slice results are then published as that layout's checkpoint (save_step), the next hop's source.

Last, the training stall of a save: the engine (Trainer) on the (2, 2) grid takes one step, then saves with
log.async_save off (the step waits for the whole write and publication) and on (it waits for the host copy);
the async save's background time until publication is shown too. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megabranch import checkpoint
from megabranch.config import Config
from megabranch.convert import rank_params, write_layout
from megabranch.model import meta_model
from megabranch.parallel.parallelize import split_info
from megabranch.training.engine import Trainer

HOPS = [((1, 1), (2, 2)), ((2, 2), (1, 4)), ((1, 4), (4, 1))]


def _config(args) -> Config:
    cfg = Config()
    m = cfg.model
    m.encoder_layers = m.decoder_layers = args.layers
    m.d_model, m.n_heads, m.ffn_dim, m.dropout, m.max_positions = args.d_model, 4, args.ffn, 0.0, 64
    cfg.log.keep_last = 0
    return cfg


def _stages(layers: int, pp: int) -> str:
    """An even stage layout: the encoder on the first half of the stages, the decoder on the second."""
    if pp == 1:
        return ""
    per = 2 * layers // pp
    return "|".join(f"{s}{i}-{i + per - 1}" for s in "ED" for i in range(0, layers, per))


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset VmHWM to the current RSS
        fh.write("5")


def _measure(load) -> tuple[dict, float, int]:
    gc.collect()
    _reset_peak()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    out = load()
    return out, time.perf_counter() - t0, _status("VmHWM") - before


def _write_source(cfg: Config, vocab: int, out: str) -> int:
    """A (1, 1) step directory: random weights and Adam moments (the moments' values do not matter here)."""
    g = torch.Generator().manual_seed(0)
    names = {n: tuple(p.shape) for n, p in meta_model(cfg.model, vocab).named_parameters()}
    model = {n: torch.randn(s, generator=g) * 0.02 for n, s in names.items()}
    opt = {
        "step": {n: torch.tensor(100.0) for n in names},
        "exp_avg": {n: torch.randn(s, generator=g) * 1e-3 for n, s in names.items()},
        "exp_avg_sq": {n: torch.rand(s, generator=g) * 1e-6 for n, s in names.items()},
        "hyper": {"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.0},
    }
    meta = {"config": cfg.to_dict(), "vocab_size": vocab, "tgt_vocab_size": vocab, "step": 100, "vocab_sha256": None}
    write_layout(out, cfg, meta, model, opt, 1, 1, 1)
    return sum(t.numel() for t in model.values())


def _hop(rank, world, port, cfg_dict, vocab, src, dst, tp, pp, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = Config.from_dict(cfg_dict)
    t, p = rank % tp, rank // tp
    lay, ranks, leads = rank_params(cfg, vocab, vocab, tp, pp, 1, _stages(cfg.model.encoder_layers, pp))
    params = ranks[(t, p)]
    meta = checkpoint.read_meta(src)
    position = dict(tp=tp, pp=pp, vpp=1, dp=1, layout=str(lay), zero=False, tp_rank=t, pp_rank=p, dp_rank=0)
    own = sum(3 * 4 * q.numel() for q in params.values())
    row = {"rank": rank, "own": own}

    def full_merge():
        reader = checkpoint.StepReader(src, meta)
        model, opt = checkpoint.consolidate(src, meta, reader=reader)
        out = {"model": checkpoint.cut(model, params), "optimizer": checkpoint.cut_optimizer(opt, params)}
        del model, opt
        return out, reader.bytes_read

    def sliced():
        reader = checkpoint.StepReader(src, meta)
        return checkpoint.load_for_rank(src, meta, position, params, reader), reader.bytes_read

    # the slice first, on a fresh process (so freed memory cannot hide its growth); its result is saved below
    (state, nbytes), wall, grew = _measure(sliced)
    row["slice"] = {"read": nbytes, "rss": grew, "wall": wall}
    (merged, nbytes), wall, grew = _measure(full_merge)
    row["full"] = {"read": nbytes, "rss": grew, "wall": wall}
    del merged
    files = {
        checkpoint.shard_name(t, p): {
            "model": state["model"],
            "split": split_info(params),
            "lead": leads[(t, p)],
            "optimizer": state["optimizer"],
            "scaler": {},
            "step": state["step"],
            "rank": {"data": None, "rng": None, "zero": None},
        }
    }
    c = cfg.to_dict()
    c["parallel"].update(tp=tp, pp=pp, layout=str(lay) if pp > 1 else "")
    meta_out = {k: v for k, v in meta.items() if k not in ("files", "format", "versions", "layout", "config", "holds")}
    meta_out.update(config=c, layout={"tp": tp, "pp": pp, "vpp": 1, "dp": 1, "layout": str(lay), "zero": False})
    t0 = time.perf_counter()
    checkpoint.save_step(os.path.dirname(dst), int(state["step"]), files, meta_out)
    row["save"] = time.perf_counter() - t0
    results.put(row)
    dist.destroy_process_group()


def _stall(rank, world, port, cfg_dict, vocab, root, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = Config.from_dict(cfg_dict)
    cfg.parallel.tp, cfg.parallel.pp, cfg.optim.update_freq = 2, 2, 2
    cfg.parallel.layout = _stages(cfg.model.encoder_layers, 2)
    tr = Trainer(cfg, vocab)
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(4, vocab, (2, 8), generator=g), torch.randint(4, vocab, (2, 8), generator=g)
    batch = {
        "src_tokens": src,
        "prev_output_tokens": torch.cat([torch.full((2, 1), 2), tgt[:, :-1]], 1),
        "target": tgt,
        "ntokens": int(tgt.numel()),
    }
    tr.train_step([batch, batch])  # Adam has state now
    row = {"rank": rank}
    for mode in (False, True, False, True):
        cfg.log.async_save = mode
        tr.step += 1  # a new step directory each time
        save_dir = os.path.join(root, "stall", f"async_{mode}")
        dist.barrier()
        t0 = time.perf_counter()
        tr.save(save_dir, {"epoch": 1, "iterations_in_epoch": tr.step}, 1.0, 1.0, False)
        stall = time.perf_counter() - t0
        tr.finish_saves()
        row.setdefault(mode, []).append((stall, time.perf_counter() - t0))
    results.put(row)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(fn, args=(4, _free_port(), *args, results), nprocs=4, join=True, start_method="spawn")
    rows = []
    while not results.empty():
        rows.append(results.get())
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--workdir", default=None, help="where the step directories go (default: a temporary one)")
    args = ap.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="bench_ckpt_")
    cfg = _config(args)
    src = os.path.join(root, "tp1pp1", "step_100")
    n = _write_source(cfg, args.vocab, src)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{args.layers}L-{args.layers}L d={args.d_model} ffn {args.ffn} vocab {args.vocab}: {n / 1e6:.1f}M parameters, "
        f"{3 * 4 * n / 2**20:.0f} MiB with Adam moments"
    )
    print(
        "| hop | rank | owns (MiB) | slice: read / owned | full merge: read / owned | slice: RSS growth / owned "
        "| full merge: RSS growth / owned | slice wall (s) | full merge wall (s) | save (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for a, b in HOPS:
        dst = os.path.join(root, f"tp{b[0]}pp{b[1]}", "step_100")
        for r in _spawn(_hop, cfg.to_dict(), args.vocab, src, dst, b[0], b[1]):
            s, f, own = r["slice"], r["full"], r["own"]
            print(
                f"| {a} -> {b} | {r['rank']} | {own / 2**20:.1f} | {s['read'] / own:.3f} | {f['read'] / own:.2f} "
                f"| {s['rss'] / own:.2f} | {f['rss'] / own:.2f} | {s['wall']:.2f} | {f['wall']:.2f} | {r['save']:.2f} |"
            )
        src = dst
    rows = _spawn(_stall, cfg.to_dict(), args.vocab, root)
    print("\n| save (tp 2, pp 2) | training stall (s), max over ranks | until published (s) |")
    print("|---|---|---|")
    for mode, label in ((False, "synchronous"), (True, "async (log.async_save)")):
        stall = statistics.median(max(r[mode][i][0] for r in rows) for i in range(2))
        done = statistics.median(max(r[mode][i][1] for r in rows) for i in range(2))
        print(f"| {label} | {stall:.3f} | {done:.3f} |")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
