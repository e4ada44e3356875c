"""Parallel vs single-process equivalence check (the torchrun half of launch/torchrun_check.sh).

    python launch/torchrun_check.py reference --nproc 4 --spec "tp=2 pp=2 vpp=2" --out ref.pt
    torchrun --standalone --nproc_per_node 4 launch/torchrun_check.py run --spec "tp=2 pp=2 vpp=2" --ref ref.pt

spec keys: tp pp vpp (data parallel = nproc / (tp*pp)), schedule (gpipe | 1f1b | interleaved; default interleaved
when vpp > 1, else 1f1b), layout (default: the layers split evenly by count; "auto": the cost model's),
recompute, zero (0/1), steps (20), m (micro-batches per replica per step; default pp, at least 2),
enc / dec (layers, default 4 / 4), residual (branchnorm). A tiny d=32 model, dropout off, float32; the
micro-batches of every step have different shapes.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests.helpers.configs import make_cfg  # noqa: E402
from tests.helpers.reference import assert_matches, parallel_losses, reference_run  # noqa: E402


def parse_spec(spec: str, nproc: int) -> dict:
    kv = dict(item.split("=", 1) for item in spec.split())
    out = {"tp": int(kv.pop("tp", 1)), "pp": int(kv.pop("pp", 1)), "vpp": int(kv.pop("vpp", 1))}
    out["schedule"] = kv.pop("schedule", "interleaved" if out["vpp"] > 1 else "1f1b")
    out["recompute"] = int(kv.pop("recompute", 0))
    out["zero"] = bool(int(kv.pop("zero", 0)))
    steps, m = int(kv.pop("steps", 20)), int(kv.pop("m", max(out["pp"], 2)))
    enc, dec = int(kv.pop("enc", 4)), int(kv.pop("dec", 4))
    residual = kv.pop("residual", "branchnorm")
    layout = kv.pop("layout", "")
    if kv:
        raise SystemExit(f"torchrun_check: unknown spec keys {sorted(kv)}")
    k = out["pp"] * out["vpp"]
    if not layout:  # even by layer count
        layers = [f"E{i}" for i in range(enc)] + [f"D{i}" for i in range(dec)]
        if k > len(layers):
            raise SystemExit(f"torchrun_check: {k} stages need at least {k} layers (enc=, dec=)")
        cuts = [round(c * len(layers) / k) for c in range(k + 1)]
        parts = []
        for c in range(k):
            span = layers[cuts[c] : cuts[c + 1]]
            groups: dict = {}
            for name in span:
                groups.setdefault(name[0], []).append(int(name[1:]))
            parts.append(",".join(f"{kind}{v[0]}-{v[-1]}" for kind, v in groups.items()))
        layout = "|".join(parts)
    elif layout == "auto":
        layout = ""
    out["layout"] = layout
    if nproc % (out["tp"] * out["pp"]):
        raise SystemExit(f"torchrun_check: {nproc} processes cannot hold tp*pp = {out['tp'] * out['pp']}")
    return dict(
        parallel=out, steps=steps, m=m, enc=enc, dec=dec, residual=residual, dp=nproc // (out["tp"] * out["pp"])
    )


def cfg_of(s: dict, parallel: bool):
    kw = dict(s["parallel"]) if parallel else {}
    return make_cfg(s["enc"], s["dec"], m=s["m"], residual=s["residual"], **kw)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("reference", "run"))
    ap.add_argument("--spec", default="tp=2 pp=2 vpp=2")
    ap.add_argument("--nproc", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    ap.add_argument("--out")
    ap.add_argument("--ref")
    args = ap.parse_args()
    s = parse_spec(args.spec, args.nproc)
    if args.mode == "reference":
        torch.save(reference_run(cfg_of(s, False), s["steps"], dp=s["dp"]), args.out)
        return 0
    from megabranch.parallel.grid import init_distributed
    from megabranch.training.engine import Trainer

    init_distributed("gloo")
    torch.set_num_threads(1)
    ref = torch.load(args.ref)
    tr = Trainer(cfg_of(s, True), 40)
    losses = parallel_losses(tr, s["steps"])
    rank = torch.distributed.get_rank()
    if rank == 0:
        print(
            f"{tr.grid.describe()}, schedule {s['parallel']['schedule']}, layout {tr.layout}, "
            f"{s['m']} micro-batches per replica"
        )
        print("step  single-process   parallel         rel.diff")
        for i, (a, b) in enumerate(zip(losses, ref[0])):
            print(f"{i:4d}  {b:.10f}  {a:.10f}  {abs(a - b) / abs(b):.2e}")
    ok = torch.ones(1)
    try:
        assert_matches(tr, losses, ref, f"rank {rank}")
    except AssertionError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        ok.zero_()
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if rank == 0:
        print(
            "OK: per-step losses within 1e-5 and parameters equal to the single-process run"
            if ok.item()
            else "FAILED: see the messages above"
        )
    torch.distributed.destroy_process_group()
    return 0 if ok.item() else 1


if __name__ == "__main__":
    sys.exit(main())
