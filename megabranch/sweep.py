"""Depth / scheme / hyper-parameter sweeps that check the BranchNorm paper's claims at small scale.

One run = one tiny training job driven through `train.Trainer` (no checkpoints, so a sweep costs only
training time), stopped early once it has clearly diverged. Each finished run writes
<out>/runs/<name>.json (atomically); a re-started sweep skips the runs whose JSON exists, so a sweep is
resumable at run granularity. `report` turns the JSONs into a Markdown table and PNG plots.

A run is marked
  - "nan":     a non-finite loss or gradient norm (training stops there);
  - "blowup":  the smoothed training loss (mean of the last 10 steps) rose more than `blowup` nats above its
               running minimum at some point (training stops once it is 2x that far above);
  - "ok" otherwise.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .checkpoint import atomic_write_bytes
from .config import load_config
from .errors import UserError

SCHEMES = {  # sweep name -> (model.residual, model.alpha_schedule)
    "post_ln": ("post_ln", "linear"),
    "pre_ln": ("pre_ln", "linear"),
    "deepnorm": ("deepnorm", "linear"),
    "branchnorm_linear": ("branchnorm", "linear"),
    "branchnorm_exp": ("branchnorm", "exp"),
    "branchnorm_sigmoid": ("branchnorm", "sigmoid"),
}


@dataclass
class RunSpec:
    groups: list  # which tables the run belongs to: depth | lr | warmup | T
    scheme: str  # a key of SCHEMES
    layers: int  # encoder layers = decoder layers
    lr: float
    warmup: int  # optim.warmup_updates
    T: int  # model.alpha_warmup_steps (BranchNorm)
    steps: int
    extra: list = field(default_factory=list)  # further config overrides "a.b=c"

    @property
    def name(self) -> str:
        return f"{self.scheme}-L{self.layers}-lr{self.lr:g}-wu{self.warmup}-T{self.T}-s{self.steps}"


def plan(args) -> list[RunSpec]:
    """The run list, most important first: depth runs at the largest depth, sensitivity runs, smaller depths."""
    depths = sorted(args.depths, reverse=True)
    stress = sorted(args.stress_depths, reverse=True) if args.stress_lr else []

    def depth_runs(group, depth, lr, warmup, steps):
        return [RunSpec([group], s, depth, lr, warmup, args.T, steps) for s in args.schemes]

    runs: list[RunSpec] = depth_runs("depth", depths[0], args.lr, args.warmup, args.steps)
    if stress:  # the same schemes at a high lr and short warmup, where divergence shows within few steps
        runs += depth_runs("stress", stress[0], args.stress_lr, args.stress_warmup, args.stress_steps)
    d, st = args.sens_layers, args.sens_steps
    slr = args.sens_lr or args.lr  # the lr of the warmup and T sweeps
    for s in args.sens_schemes:
        runs += [RunSpec(["lr"], s, d, lr, args.warmup, args.T, st) for lr in args.lrs]
        runs += [RunSpec(["warmup"], s, d, slr, wu, args.T, st) for wu in args.warmups]
    for s in [x for x in args.sens_schemes if x.startswith("branchnorm")][:1]:
        runs += [RunSpec(["T"], s, d, slr, args.warmup, t, st) for t in args.Ts]
    for depth in stress[1:]:
        runs += depth_runs("stress", depth, args.stress_lr, args.stress_warmup, args.stress_steps)
    for depth in depths[1:]:
        runs += depth_runs("depth", depth, args.lr, args.warmup, args.steps)
    seen: dict[str, RunSpec] = {}
    for r in runs:  # one run can serve several tables (e.g. the default lr is also the default warmup)
        if r.name in seen:
            seen[r.name].groups += [g for g in r.groups if g not in seen[r.name].groups]
        else:
            seen[r.name] = r
    return list(seen.values())


def overrides(spec: RunSpec, args) -> list[str]:
    residual, schedule = SCHEMES[spec.scheme]
    return [
        f"seed={args.seed}",
        f"model.residual={residual}", f"model.alpha_schedule={schedule}", f"model.alpha_warmup_steps={spec.T}",
        f"model.encoder_layers={spec.layers}", f"model.decoder_layers={spec.layers}",
        f"model.d_model={args.d_model}", f"model.n_heads={args.n_heads}", f"model.ffn_dim={4 * args.d_model}",
        f"model.dropout={args.dropout}",
        f"optim.lr={spec.lr}", f"optim.warmup_updates={spec.warmup}", f"optim.max_updates={spec.steps}",
        f"optim.clip_norm={args.clip_norm}",
        f"data.data_dir={args.data}", f"data.max_tokens={args.max_tokens}",
        *spec.extra,
        *getattr(args, "set", []),  # the user's own overrides last, e.g. model.deepnorm_init=false
    ]


def gnorm_stats(gnorms: list[float], first: int) -> dict:
    """Statistics of the first `first` steps' gradient norms (the paper's Figure 3 is about these)."""
    g = np.array([x for x in gnorms[:first] if math.isfinite(x)], dtype=np.float64)
    if g.size == 0:
        return {"n": 0}
    lg = np.log(np.maximum(g, 1e-30))
    return {
        "n": int(g.size), "mean": float(g.mean()), "std": float(g.std()), "max": float(g.max()),
        "min": float(g.min()), "max_over_median": float(g.max() / max(np.median(g), 1e-30)),
        # mean |log g_t - log g_{t-1}|: 0 for a flat curve, large for a spiky one
        "mean_abs_dlog": float(np.abs(np.diff(lg)).mean()) if g.size > 1 else 0.0,
    }


def train_one(spec: RunSpec, args, log=print) -> dict:
    """Train one run and return its result record (also what is written to its JSON)."""
    from .analysis import analyze_model, sentence_batches
    from .data import EpochBatchIterator, load_split
    from .generate import quick_bleu
    from .model import build_model
    from .train import Trainer

    cfg = load_config(None, overrides(spec, args))
    torch.manual_seed(cfg.seed)
    train_set, tok, _ = load_split(cfg.data.data_dir, "train")
    valid_set, _, _ = load_split(cfg.data.data_dir, "valid")
    src_tok, tgt_tok = tok if isinstance(tok, tuple) else (tok, tok)
    model = build_model(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, seed=cfg.seed)
    trainer = Trainer(cfg, model, torch.device("cpu"))
    itr = EpochBatchIterator(train_set, cfg.data.max_tokens, seed=cfg.seed)
    groups = itr.update_groups(1)
    losses, gnorms, status, t0 = [], [], "ok", time.time()
    smooth_min, worst_rise = float("inf"), 0.0
    while trainer.step < spec.steps:
        st = trainer.train_step(next(groups))
        losses.append(st["loss"])
        gnorms.append(st["gnorm"])
        if not (math.isfinite(st["loss"]) and math.isfinite(st["gnorm"])):
            status = "nan"
            break
        smooth = float(np.mean(losses[-10:]))
        if len(losses) >= 10:
            smooth_min = min(smooth_min, smooth)
            worst_rise = max(worst_rise, smooth - smooth_min)
            if worst_rise > args.blowup:
                status = "blowup"
            if worst_rise > 2 * args.blowup:
                break
        if args.progress_every and trainer.step % args.progress_every == 0:
            log(f"    step {trainer.step}/{spec.steps} loss {smooth:.3f} gnorm {st['gnorm']:.3g} "
                f"alpha {st['alpha']:.3f} ({time.time() - t0:.0f}s)")
    train_s = time.time() - t0
    result = {
        "name": spec.name, "spec": asdict(spec), "config": cfg.to_dict(), "status": status,
        "steps_done": trainer.step, "train_seconds": round(train_s, 1),
        "s_per_step": round(train_s / max(trainer.step, 1), 4),
        "losses": [round(x, 5) if math.isfinite(x) else None for x in losses],
        "gnorms": [float(f"{x:.5g}") if math.isfinite(x) else None for x in gnorms],
        "gnorm_stats": gnorm_stats(gnorms, args.gnorm_steps),
        "final_train_loss": float(np.mean(losses[-10:])) if losses and status != "nan" else None,
        "max_loss_rise": round(worst_rise, 4),
        "valid_sentences": args.valid_sentences,
    }
    if status != "nan":
        vb = sentence_batches(valid_set, args.valid_sentences, cfg.data.max_tokens)
        v = trainer.valid_loss(vb)
        result["valid_loss"] = v["loss"] if math.isfinite(v["loss"]) else None
        result["valid_nll"] = v["nll_loss"] if math.isfinite(v["nll_loss"]) else None
        if args.bleu_sentences > 0 and result["valid_loss"] is not None:
            result["bleu"] = quick_bleu(trainer.model, valid_set, tgt_tok, 1, args.bleu_sentences)
        if ("depth" in spec.groups or "stress" in spec.groups) and result["valid_loss"] is not None:
            stats = analyze_model(trainer.model, vb[len(vb) // 2], cfg.optim.label_smoothing)
            result["analysis"] = stats
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


def load_results(out: str) -> list[dict]:
    runs_dir = os.path.join(out, "runs")
    if not os.path.isdir(runs_dir):
        raise UserError(f"no sweep results under {runs_dir}; run the sweep first")
    res = []
    for f in sorted(os.listdir(runs_dir)):
        if f.endswith(".json"):
            with open(os.path.join(runs_dir, f)) as fh:
                res.append(json.load(fh))
    return res


# --- report: Markdown tables and plots -----------------------------------------------------------------------

def _cell(r: dict | None) -> str:
    if r is None:
        return "—"
    if r["status"] == "nan":
        return f"**diverged** (NaN @ {r['steps_done']})"
    txt = f"{r['valid_loss']:.2f}" if r.get("valid_loss") is not None else "?"
    if "bleu" in r:
        txt += f" / {r['bleu']:.1f}"
    if r["status"] == "blowup":
        txt = f"**diverged** (loss +{r['max_loss_rise']:.1f}) {txt}"
    return txt


def init_grad_norms(runs: list[dict]) -> dict:
    """{scheme: layer_grad_norms at step 0} for the runs' own configs and seed, on the batch the trained
    analysis used (the middle batch of the first valid sentences); {} when the data is not at hand."""
    from .analysis import layer_grad_norms, sentence_batches
    from .config import Config
    from .data import load_split
    from .model import build_model

    out = {}
    for r in runs:
        cfg = Config.from_dict(r["config"])
        cfg.model.fused_kernels = False
        try:
            valid_set, tok, _ = load_split(cfg.data.data_dir, "valid")
        except Exception:  # noqa: BLE001 - report without this table when the data moved
            return {}
        src_tok, tgt_tok = tok if isinstance(tok, tuple) else (tok, tok)
        n = r.get("valid_sentences", 300)
        vb = sentence_batches(valid_set, n, cfg.data.max_tokens)
        model = build_model(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, seed=cfg.seed)
        out[r["spec"]["scheme"]] = layer_grad_norms(model, vb[len(vb) // 2], cfg.optim.label_smoothing)
    return out


def _order(schemes):
    return [s for s in SCHEMES if s in schemes]


def report(results: list[dict], out: str, img_dir: str | None = None) -> str:
    """Write <out>/report.md and the PNGs (into img_dir, default <out>); return the Markdown."""
    img_dir = img_dir or out
    os.makedirs(img_dir, exist_ok=True)
    by_group: dict[str, list[dict]] = {}
    for r in results:
        for g in r["spec"]["groups"]:
            by_group.setdefault(g, []).append(r)
    md = []
    titles = {"depth": "Depth (Table 1 style)", "stress": "Depth at a high learning rate (stress test)"}
    for group, title in titles.items():
        depth = by_group.get(group, [])
        if not depth:
            continue
        depths = sorted({r["spec"]["layers"] for r in depth})
        schemes = _order({r["spec"]["scheme"] for r in depth})
        first = depth[0]["spec"]
        md.append(f"### {title}: valid loss / BLEU after {first['steps']} steps, lr {first['lr']:g}, "
                  f"warmup {first['warmup']}, T {first['T']}\n")
        md.append("| scheme | " + " | ".join(f"{d}L-{d}L" for d in depths) + " |")
        md.append("|---|" + "---|" * len(depths))
        for s in schemes:
            cells = [_cell(next((r for r in depth if r["spec"]["scheme"] == s and r["spec"]["layers"] == d), None)) for d in depths]
            md.append(f"| {s} | " + " | ".join(cells) + " |")
        md.append("")
        deepest = depths[-1]
        md.append(f"Gradient norms of the first steps (Figure 3 style), {group} runs at {deepest}L-{deepest}L, and the "
                  f"final training loss (mean of the last 10 steps):\n")
        md.append("| scheme | steps | mean | std | max | max/median | mean abs dlog | final train loss |")
        md.append("|---|---|---|---|---|---|---|---|")
        for s in schemes:
            r = next((r for r in depth if r["spec"]["scheme"] == s and r["spec"]["layers"] == deepest), None)
            g = (r or {}).get("gnorm_stats", {})
            if g.get("n"):
                ftl = r.get("final_train_loss")
                md.append(f"| {s} | {g['n']} | {g['mean']:.3g} | {g['std']:.3g} | {g['max']:.3g} | "
                          f"{g['max_over_median']:.2f} | {g['mean_abs_dlog']:.3f} | {'—' if ftl is None else f'{ftl:.3f}'} |")
        md.append("")
        init = init_grad_norms([r for r in depth if r["spec"]["layers"] == deepest])
        if init:
            md.append(f"Per-layer gradient norms at initialisation (step 0, before any update) vs after training, "
                      f"{deepest}L-{deepest}L, one valid batch; layer 1 is the bottom:\n")
            md.append("| scheme | enc L1 init | enc L{0} init | dec L1 init | dec L{0} init | enc L1 trained | enc L{0} trained "
                      "| dec L1 trained | dec L{0} trained |".format(deepest))
            md.append("|---|---|---|---|---|---|---|---|---|")
            for s in schemes:
                r = next((r for r in depth if r["spec"]["scheme"] == s and r["spec"]["layers"] == deepest), None)
                if r is None or s not in init:
                    continue
                g0 = init[s]
                cells = [g0["encoder"][0], g0["encoder"][-1], g0["decoder"][0], g0["decoder"][-1]]
                a = r.get("analysis")
                cells += [a["encoder"]["grad_norm"][0], a["encoder"]["grad_norm"][-1], a["decoder"]["grad_norm"][0],
                          a["decoder"]["grad_norm"][-1]] if a else [float("nan")] * 4
                md.append(f"| {s} | " + " | ".join(f"{c:.2e}" for c in cells) + " |")
            md.append("")
        analysed = [r for r in depth if r.get("analysis") and r["spec"]["layers"] == deepest]
        if analysed:
            md.append(f"Representations after training (Figures 8-9 style), {group} runs at {deepest}L-{deepest}L, "
                      f"means over layers:\n")
            md.append("| scheme | enc mean cos | dec mean cos | enc FFN non-zero | dec FFN non-zero |")
            md.append("|---|---|---|---|---|")
            for s in schemes:
                r = next((r for r in analysed if r["spec"]["scheme"] == s), None)
                if r:
                    a = r["analysis"]
                    md.append(f"| {s} | {np.mean(a['encoder']['cosine']):.4f} | {np.mean(a['decoder']['cosine']):.4f} | "
                              f"{np.mean(a['encoder']['ffn_nonzero']):.4f} | {np.mean(a['decoder']['ffn_nonzero']):.4f} |")
            md.append("")
    for group, key, label in (("lr", "lr", "learning rate"), ("warmup", "warmup", "warmup steps"), ("T", "T", "T")):
        rs = by_group.get(group, [])
        if not rs:
            continue
        vals = sorted({r["spec"][key] for r in rs})
        schemes = _order({r["spec"]["scheme"] for r in rs})
        sp = rs[0]["spec"]
        md.append(f"### Sensitivity to {label} ({sp['layers']}L-{sp['layers']}L, {sp['steps']} steps; valid loss / BLEU)\n")
        md.append(f"| scheme | " + " | ".join(f"{key}={v:g}" for v in vals) + " |")
        md.append("|---|" + "---|" * len(vals))
        for s in schemes:
            cells = [_cell(next((r for r in rs if r["spec"]["scheme"] == s and r["spec"][key] == v), None)) for v in vals]
            md.append(f"| {s} | " + " | ".join(cells) + " |")
        md.append("")
    _plots(by_group, img_dir)
    text = "\n".join(md)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(text + "\n")
    return text


def _plots(by_group: dict, img_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .analysis import plot_analysis

    for group in ("depth", "stress"):
        depth = by_group.get(group, [])
        if not depth:
            continue
        deepest = max(r["spec"]["layers"] for r in depth)
        rs = sorted((r for r in depth if r["spec"]["layers"] == deepest), key=lambda r: list(SCHEMES).index(r["spec"]["scheme"]))
        sp = rs[0]["spec"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for r in rs:
            g = [x if x is not None else float("nan") for x in r["gnorms"]]
            axes[0].plot(range(1, len(g) + 1), g, lw=1, label=r["spec"]["scheme"])
            l = [x if x is not None else float("nan") for x in r["losses"]]
            axes[1].plot(range(1, len(l) + 1), l, lw=1, label=r["spec"]["scheme"])
        axes[0].set_yscale("log")
        axes[0].set_title(f"gradient norm, {deepest}L-{deepest}L, lr {sp['lr']:g} (Fig. 3 style)", fontsize=9)
        axes[1].set_title("training loss", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(img_dir, f"fig3_{group}_gnorm_loss.png"), dpi=80)
        plt.close(fig)
        analysed = {r["spec"]["scheme"]: r["analysis"] for r in rs if r.get("analysis")}
        if analysed:
            plot_analysis(analysed, os.path.join(img_dir, f"fig8_9_{group}_layers.png"),
                          f"{deepest}L-{deepest}L after {sp['steps']} steps at lr {sp['lr']:g} (Figs. 8-9 style)")
    panels = [(g, k, l) for g, k, l in (("lr", "lr", "learning rate"), ("warmup", "warmup", "warmup steps"), ("T", "T", "BranchNorm T"))
              if by_group.get(g)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
        for ax, (group, key, label) in zip(axes[0], panels):
            rs = by_group[group]
            for s in _order({r["spec"]["scheme"] for r in rs}):
                pts = sorted((r["spec"][key], r) for r in rs if r["spec"]["scheme"] == s)
                xs = [p[0] for p in pts]
                ys = [p[1]["valid_loss"] if p[1]["status"] == "ok" and p[1].get("valid_loss") is not None else float("nan") for p in pts]
                line = ax.plot(xs, ys, marker="o", lw=1.2, label=s)[0]
                bad = [x for x, (_, r) in zip(xs, pts) if r["status"] != "ok"]
                if bad:
                    top = np.nanmax([y for y in ys if y == y] or [0]) if any(y == y for y in ys) else 10
                    ax.scatter(bad, [top] * len(bad), marker="x", s=60, color=line.get_color())
            ax.set_xscale("log")
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel("valid loss (x = diverged)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        fig.suptitle("sensitivity (Figs. 6-7 style)", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(img_dir, "fig6_7_sensitivity.png"), dpi=80)
        plt.close(fig)


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
    a("--set", action="append", default=[], metavar="KEY=VALUE",
      help="a megabranch-train config override applied to every run (repeatable), e.g. model.deepnorm_init=false")


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
