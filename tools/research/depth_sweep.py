"""Depth / residual-scheme / hyper-parameter sweep that checks the BranchNorm paper's claims at small scale.

    python -m tools.research.depth_sweep --data data-bin/kjv_web --out runs/depth_sweep --depths 6,18,36

Trains the same tiny config with post_ln, pre_ln, deepnorm and branchnorm (linear / exp / sigmoid alpha) at each
depth, then deepnorm vs branchnorm over learning rates, warmups and (BranchNorm) T at --sens-layers; records
divergence (NaN or loss blow-up), final valid loss and BLEU, early gradient-norm statistics and, for the depth
runs, per-layer cosine similarity / FFN sparsity / gradient norms. Each run's result is <out>/runs/<name>.json;
finished runs are skipped, so re-running the same command resumes. Writes <out>/report.md (Markdown tables in
the style of the paper's Tables 1-2) and PNGs (Figures 3, 6-7, 8-9 style): sweep_plan.py makes the run list,
sweep_report.py the report; every run goes through megabranch's one training loop (no checkpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from megabranch.analysis import analyze_model
from megabranch.checkpoint import atomic_write_bytes
from megabranch.config import load_config
from megabranch.data import load_split, pair_batches
from megabranch.decoding import quick_bleu
from megabranch.errors import UserError, cli_main
from megabranch.generate import meta_vocab_hash
from megabranch.train import build_engine
from megabranch.training.loop import RunData, train

from .results import gnorm_stats, load_results
from .sweep_plan import SCHEMES, RunSpec, overrides, plan
from .sweep_report import report


class Watch:
    """The run loop's on_step: records every step's loss and gradient norm, marks a run "nan" (a non-finite loss
    or norm: stop) or "blowup" (the smoothed loss rose `blowup` nats above its running minimum; stop at twice
    that), and prints a progress line every `every` steps."""

    def __init__(self, blowup: float, every: int, total: int, log):
        self.blowup, self.every, self.total, self.log = blowup, every, total, log
        self.losses, self.gnorms, self.status = [], [], "ok"
        self.smooth_min, self.worst_rise, self.t0, self.steps = float("inf"), 0.0, time.time(), 0

    def __call__(self, st: dict) -> bool:
        self.steps += 1
        self.losses.append(st["loss"])
        self.gnorms.append(st["gnorm"])
        if not (math.isfinite(st["loss"]) and math.isfinite(st["gnorm"])):
            self.status = "nan"
            return True
        smooth = float(np.mean(self.losses[-10:]))
        if len(self.losses) >= 10:
            self.smooth_min = min(self.smooth_min, smooth)
            self.worst_rise = max(self.worst_rise, smooth - self.smooth_min)
            if self.worst_rise > self.blowup:
                self.status = "blowup"
            if self.worst_rise > 2 * self.blowup:
                return True
        if self.every and self.steps % self.every == 0:
            self.log(
                f"    step {self.steps}/{self.total} loss {smooth:.3f} gnorm {st['gnorm']:.3g} alpha {st['alpha']:.3f} "
                f"({time.time() - self.t0:.0f}s)"
            )
        return False


def train_one(spec: RunSpec, args, log=print) -> dict:
    """Train one run through megabranch's run loop (no checkpoints; its log.jsonl under <out>/logs/<name>/) and
    return its result record (also what is written to its JSON)."""
    log_dir = os.path.join(args.out, "logs", spec.name)
    shutil.rmtree(log_dir, ignore_errors=True)  # a run stopped half-way starts again from scratch
    sets = overrides(spec, args) + [
        f"log.save_dir={log_dir}",
        f"log.valid_interval={spec.steps}",
        "log.bleu_sentences=0",
        "log.tensorboard=false",
        "log.progress=none",
    ]
    cfg = load_config(None, sets)
    data = load_split(cfg.data.data_dir, "train")
    train_set, src_tok, tgt_tok = data.dataset, data.src_tok, data.tgt_tok
    valid_set = load_split(cfg.data.data_dir, "valid").dataset
    engine = build_engine(cfg, src_tok.vocab_size, tgt_tok.vocab_size, meta_vocab_hash(data.meta), device="cpu")
    vb = pair_batches(valid_set, cfg.data.max_tokens, args.valid_sentences)
    watch = Watch(args.blowup, args.progress_every, spec.steps, log)
    t0 = time.time()
    valid = train(engine, cfg, RunData(train_set, valid_set, tgt_tok), valid_batches=vb, on_step=watch, save=False)
    train_s = time.time() - t0
    losses, gnorms, status = watch.losses, watch.gnorms, watch.status
    result = {
        "name": spec.name,
        "spec": asdict(spec),
        "config": cfg.to_dict(),
        "status": status,
        "steps_done": engine.step,
        "train_seconds": round(train_s, 1),
        "s_per_step": round(train_s / max(engine.step, 1), 4),
        "losses": [round(x, 5) if math.isfinite(x) else None for x in losses],
        "gnorms": [float(f"{x:.5g}") if math.isfinite(x) else None for x in gnorms],
        "gnorm_stats": gnorm_stats(gnorms, args.gnorm_steps),
        "final_train_loss": float(np.mean(losses[-10:])) if losses and status != "nan" else None,
        "max_loss_rise": round(watch.worst_rise, 4),
        "valid_sentences": args.valid_sentences,
    }
    if status != "nan":
        v = valid or engine.valid_loss(vb)  # the loop validated at the last step unless the run stopped early
        result["valid_loss"] = v["loss"] if math.isfinite(v["loss"]) else None
        result["valid_nll"] = v["nll_loss"] if math.isfinite(v["nll_loss"]) else None
        model = engine.whole_model()  # one process: the engine's own model (its only chunk)
        if args.bleu_sentences > 0 and result["valid_loss"] is not None:
            result["bleu"] = quick_bleu(model, valid_set, tgt_tok, 1, args.bleu_sentences)
        if ("depth" in spec.groups or "stress" in spec.groups) and result["valid_loss"] is not None:
            result["analysis"] = analyze_model(model, vb[len(vb) // 2], cfg.optim.label_smoothing)
    result["total_seconds"] = round(time.time() - t0, 1)
    return result


def run_sweep(args, log=print) -> list[dict]:
    runs_dir = os.path.join(args.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    specs = plan(args)
    if args.limit:
        specs = specs[: args.limit]
    done = [s for s in specs if os.path.exists(os.path.join(runs_dir, s.name + ".json"))]
    log(f"sweep: {len(specs)} runs, {len(done)} already finished (skipped), results in {runs_dir}")
    t_start = time.time()
    for k, spec in enumerate(specs, 1):
        path = os.path.join(runs_dir, spec.name + ".json")
        if os.path.exists(path):
            continue
        log(f"[{k}/{len(specs)}] {spec.name} ({time.time() - t_start:.0f}s into this sweep)")
        res = train_one(spec, args, log)
        atomic_write_bytes(json.dumps(res).encode(), path)
        extra = f" valid {res.get('valid_loss') or float('nan'):.3f} bleu {res.get('bleu', float('nan'))}"
        log(f"    -> {res['status']} after {res['steps_done']} steps, {res['s_per_step']:.3f} s/step,{extra}")
    return load_results(args.out)


def add_arguments(ap) -> None:
    a = ap.add_argument
    a("--data", default="data-bin/kjv_web", help="binarized data dir (megabranch-preprocess output)")
    a("--out", default="runs/depth_sweep", help="where runs/<name>.json, report.md and the PNGs go")
    a("--img-dir", help="where the PNGs go (default: --out)")
    a("--schemes", default=",".join(SCHEMES), help=f"comma list from {', '.join(SCHEMES)}")
    a("--depths", default="6,18,36", help="encoder=decoder depths, comma list")
    a("--steps", type=int, default=300, help="updates per depth run")
    a("--lr", type=float, default=3e-3)
    a("--warmup", type=int, default=50, help="lr warmup updates")
    a("--T", type=int, default=100, help="BranchNorm alpha warmup steps")
    a("--stress-lr", type=float, default=0.0, help="also run every scheme at this high lr (0: no stress runs)")
    a("--stress-warmup", type=int, default=20)
    a("--stress-steps", type=int, default=150)
    a("--stress-depths", default="", help="depths of the stress runs (default: --depths)")
    a("--sens-layers", type=int, default=18, help="depth of the lr / warmup / T sensitivity runs")
    a("--sens-steps", type=int, default=150)
    a("--sens-schemes", default="deepnorm,branchnorm_linear")
    a("--lrs", default="1e-3,3e-3,6e-3", help="learning rates of the lr sweep ('' for none)")
    a("--sens-lr", type=float, default=0.0, help="lr of the warmup and T sweeps (0: --lr)")
    a("--warmups", default="5,50,150", help="warmups of the warmup sweep ('' for none)")
    a("--Ts", default="10,100,1000", help="BranchNorm T values of the T sweep ('' for none)")
    a("--d-model", type=int, default=64)
    a("--n-heads", type=int, default=4)
    a("--dropout", type=float, default=0.1)
    a("--clip-norm", type=float, default=0.0)
    a("--max-tokens", type=int, default=1024)
    a("--seed", type=int, default=1)
    a("--blowup", type=float, default=1.5, help="nats above the running minimum that count as a loss blow-up")
    a("--gnorm-steps", type=int, default=100, help="how many first steps the gradient-norm statistics cover")
    a("--valid-sentences", type=int, default=300)
    a("--bleu-sentences", type=int, default=100, help="greedy-decoded valid sentences for BLEU (0: off)")
    a("--progress-every", type=int, default=25, help="print a progress line every N steps (0: off)")
    a("--limit", type=int, default=0, help="run only the first N runs of the plan")
    a("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP spin-wait collapse on a shared CPU)")
    a("--report-only", action="store_true", help="only rebuild the table and plots from the finished runs")
    a("--dry-run", action="store_true", help="print the plan and exit")
    a(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a megabranch-train config override applied to every run (repeatable), e.g. model.deepnorm_init=false",
    )


def parse_lists(args) -> None:
    def nums(text, typ):
        try:
            return [typ(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"cannot parse the list {text!r}: expected comma-separated numbers") from None

    args.schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    args.sens_schemes = [s.strip() for s in args.sens_schemes.split(",") if s.strip()]
    for s in args.schemes + args.sens_schemes:
        if s not in SCHEMES:
            raise UserError(f"--schemes: unknown scheme {s!r} (valid: {', '.join(SCHEMES)})")
    args.depths = nums(args.depths, int)
    args.stress_depths = nums(args.stress_depths, int) if args.stress_depths else list(args.depths)
    if not args.depths or min(args.depths) < 1:
        raise UserError("--depths: need at least one depth >= 1")
    args.lrs, args.warmups, args.Ts = nums(args.lrs, float), nums(args.warmups, int), nums(args.Ts, int)
    if not os.path.isfile(os.path.join(args.data, "meta.json")):
        raise UserError(f"--data {args.data}: no meta.json there; run megabranch-preprocess first")


def main_sweep(args, log=None) -> str:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    parse_lists(args)
    torch.set_num_threads(args.threads)
    if args.dry_run:
        for k, s in enumerate(plan(args)[: args.limit or None], 1):
            print(f"{k:3d} {s.name}  [{', '.join(s.groups)}]")
        return ""
    results = load_results(args.out) if args.report_only else run_sweep(args, log)
    text = report(results, args.out, args.img_dir)
    log(f"report: {os.path.join(args.out, 'report.md')}")
    return text


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="depth_sweep", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    text = main_sweep(args)
    if text:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
