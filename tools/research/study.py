"""A multi-seed study over `megabranch-train`: variants x seeds, each a checkpointed, resumable training run, then
the final checkpoint's test BLEU / chrF and Figures 8-9 analysis; a report with means and spreads over seeds.

    python -m tools.research.study --config configs/en_es_depth_study.yaml --out runs/study --seeds 1,2,3 \
        --variant post_ln:model.residual=post_ln \
        --variant deepnorm:model.residual=deepnorm,model.deepnorm_init=true \
        --variant branchnorm

A variant is NAME or NAME:KEY=VALUE,KEY=VALUE (config overrides on top of --config and --set). Run <v>-seed<s>
trains into <out>/runs/<v>-seed<s>/ (checkpoints every log.valid_interval steps, log.jsonl with every step's loss
and gradient norm) and, once trained and evaluated, writes <out>/results/<v>-seed<s>.json. Re-running the same
command skips finished runs and resumes an unfinished one from its latest checkpoint (bit for bit on the CPU), so
a stopped study continues where it stopped. Runs go seed by seed (every variant of seed 1 first). Writes
<out>/report.md and, into --img-dir (default <out>), study_gnorm_loss.png (Figure 3 style) and
study_layers.png (Figures 8-9 style, per-layer means over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time

import numpy as np
import sacrebleu
import torch

from megabranch import analysis, checkpoint, metrics
from megabranch import decoding as gen
from megabranch import train as megatrain
from megabranch.config import ints, load_config
from megabranch.data import load_split, pair_batches
from megabranch.errors import UserError, cli_main
from megabranch.training import health as monitor

from .results import gnorm_stats, load_results

NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
# what every run of a study logs: every step (the Figure 3 curves), no TensorBoard, no progress bar
LOGGING = ["log.log_interval=1", "log.tensorboard=false", "log.progress=none"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name' or 'name:a.b=c,d.e=f' -> (name, ['a.b=c', 'd.e=f'])."""
    name, _, sets = text.partition(":")
    if not NAME.match(name):
        raise UserError(
            f"--variant {text!r}: the name must be letters, digits or _.+- (e.g. deepnorm:model.residual=deepnorm)"
        )
    items = [s.strip() for s in sets.split(",") if s.strip()]
    for s in items:
        if "=" not in s:
            raise UserError(f"--variant {text!r}: {s!r} is not KEY=VALUE")
    return name, items


def plan(variants: list[tuple[str, list[str]]], seeds: list[int]) -> list[tuple[str, list[str], int]]:
    """Seed-major: every variant of the first seed, then of the second, ... (a stopped study has whole seeds)."""
    return [(name, sets, seed) for seed in seeds for name, sets in variants]


def run_config(args, sets: list[str], seed: int, save_dir: str):
    return load_config(args.config, [*args.set, *sets, f"seed={seed}", f"log.save_dir={save_dir}", *LOGGING])


def stop_run(stats: dict) -> bool:
    """The run loop's on_step: stop a run whose loss or gradient norm is no longer finite (diverged)."""
    return not (math.isfinite(stats["loss"]) and math.isfinite(stats["gnorm"]))


def read_log(save_dir: str) -> tuple[dict, dict]:
    """({step: train record}, {step: valid record}) of a run's log.jsonl as metrics.read_log reads it (a resumed
    run's replayed steps dropped, start / stop / compile records skipped), non-finite values (null) as NaN."""
    path = os.path.join(save_dir, "log.jsonl")
    if not os.path.isfile(path):
        return {}, {}

    def by_step(tag: str) -> dict:
        return {r["step"]: {k: math.nan if v is None else v for k, v in r.items()} for r in metrics.read_log(path, tag)}

    return by_step("train"), by_step("valid")


def health_profile(save_dir: str, last: int = 100) -> dict:
    """What the training health monitor recorded (log.jsonl "health" records), per stack: the median gradient
    norm of every layer over the last `last` records (bottom first; the median, since a few spikes would carry a
    mean), its bottom / top ratio, and the first step at which the monitor's warning rule held (bottom over
    monitor.WARN_RATIO below the top for WARN_INTERVALS records in a row; None: never)."""
    path = os.path.join(save_dir, "log.jsonl")
    rows = metrics.read_log(path, "health") if os.path.isfile(path) else []
    out = {}
    for stack in monitor.STACKS:
        series = [(r["step"], r["grad_norm"][stack]) for r in rows if stack in r.get("grad_norm", {})]
        if not series:
            continue
        tail = np.array([g for _, g in series[-last:]], dtype=np.float64)
        profile = [float(x) for x in np.nanmedian(np.where(np.isfinite(tail), tail, np.nan), axis=0)]
        starved_at, run = None, 0
        for step, g in series:
            run = run + 1 if (g[-1] > 0 and math.isfinite(g[-1]) and g[0] * monitor.WARN_RATIO < g[-1]) else 0
            if run >= monitor.WARN_INTERVALS:
                starved_at = step
                break
        out[stack] = {
            "profile": profile,
            "bottom_over_top": profile[0] / profile[-1] if profile[-1] > 0 else None,
            "starved_at": starved_at,
            "records": len(series),
            "last": min(last, len(series)),
        }
    return out


def test_scores(model, dataset, tokenizer, beam: int, lenpen: float) -> dict:
    """{direction: {"bleu", "chrf", "hyps"}} of decoding each direction of `dataset` whole (sacreBLEU defaults)."""
    out = {}
    for name, part in gen.directions_of(dataset):
        hyps = gen.translate(model, part, tokenizer, beam, lenpen)
        refs, _ = gen.references(part, tokenizer, len(hyps))
        out[name] = {
            "bleu": gen.bleu(hyps, refs)[0].score,
            "chrf": sacrebleu.metrics.CHRF().corpus_score(hyps, [refs]).score,
            "hyps": hyps,
        }
    return out


def train_and_evaluate(args, variant: str, sets: list[str], seed: int, log) -> dict:
    """Train (or resume) one run to optim.max_updates, evaluate its final checkpoint -> its result record."""
    name = f"{variant}-seed{seed}"
    save_dir = os.path.join(args.out, "runs", name)
    cfg = run_config(args, sets, seed, save_dir)
    t0 = time.time()
    resumed_from = None
    if checkpoint.has_checkpoints(save_dir):
        resumed_from = checkpoint.read_meta(checkpoint.resolve(save_dir, "latest"))["step"]
        log(f"    resuming from step {resumed_from}")
    elif os.path.isdir(save_dir):
        shutil.rmtree(save_dir)  # stopped before its first checkpoint: start it again
    status = "ok"
    if resumed_from is None or resumed_from < cfg.optim.max_updates:
        megatrain.run(cfg, resume="last" if resumed_from is not None else None, device="cpu", on_step=stop_run)
    train_log, valid_log = read_log(save_dir)
    steps = sorted(train_log)
    gnorms = [train_log[s].get("gnorm", float("nan")) for s in steps]
    losses = [train_log[s]["loss"] for s in steps]
    if steps and (steps[-1] < cfg.optim.max_updates or not all(map(math.isfinite, losses[-1:] + gnorms[-1:]))):
        status = "nan"
    walls = np.diff([train_log[s]["wall"] for s in steps])
    result = {
        "name": name,
        "variant": variant,
        "seed": seed,
        "overrides": sets,
        "status": status,
        "config": cfg.to_dict(),
        "steps_done": steps[-1] if steps else 0,
        "resumed_from": resumed_from,
        "seconds_this_invocation": round(time.time() - t0, 1),
        "s_per_step": float(np.median(walls[walls > 0])) if (walls > 0).any() else None,
        "gnorm_stats": gnorm_stats(gnorms, args.gnorm_steps),
        "max_loss_rise": max_loss_rise(losses),
        "valid": {
            str(s): {k: v for k, v in r.items() if k not in ("tag", "step", "wall")} for s, r in valid_log.items()
        },
        "health": health_profile(save_dir),
    }
    if status == "ok":
        loaded = checkpoint.load_model(os.path.join(save_dir, "latest"), fused_kernels=False)
        model, mcfg = loaded.model, loaded.config
        if not args.no_test:
            result["test"] = evaluate_test(args, model, mcfg, save_dir)
        valid_set = load_split(mcfg.data.data_dir, "valid").dataset
        batches = pair_batches(valid_set, mcfg.data.max_tokens, args.analysis_sentences)
        result["analysis"] = analysis.analyze_batches(model, batches, mcfg.optim.label_smoothing)
    result["seconds_this_invocation"] = round(time.time() - t0, 1)
    return result


def evaluate_test(args, model, mcfg, save_dir: str) -> dict:
    """The test split decoded whole (hypotheses written beside the run), BLEU / chrF averaged over directions."""
    test = load_split(mcfg.data.data_dir, args.test_split)
    test_set, tgt_tok = test.dataset, test.tgt_tok
    scores = test_scores(model, test_set, tgt_tok, args.beam, args.lenpen)
    for direction, sc in scores.items():
        suffix = "" if direction == "all" else f".{direction}"
        with open(os.path.join(save_dir, f"{args.test_split}{suffix}.hyp"), "w") as fh:
            fh.writelines(h + "\n" for h in sc.pop("hyps"))
    return {
        "split": args.test_split,
        "beam": args.beam,
        "lenpen": args.lenpen,
        "bleu": statistics.mean(s["bleu"] for s in scores.values()),
        "chrf": statistics.mean(s["chrf"] for s in scores.values()),
        "directions": scores,
    }


def max_loss_rise(losses: list[float], window: int = 10) -> float | None:
    """The largest rise of the `window`-step mean training loss above its running minimum (nats)."""
    if len(losses) < window or not all(map(math.isfinite, losses)):
        return None
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    return round(float(np.max(smooth - np.minimum.accumulate(smooth))), 4)


def run_study(args, log) -> list[dict]:
    results_dir = os.path.join(args.out, "results")
    os.makedirs(results_dir, exist_ok=True)
    runs = plan(args.variants, args.seeds)
    done = [n for n, _, s in runs if os.path.exists(os.path.join(results_dir, f"{n}-seed{s}.json"))]
    log(f"study: {len(runs)} runs, {len(done)} already finished (skipped), results in {results_dir}")
    t_start = time.time()
    for k, (variant, sets, seed) in enumerate(runs, 1):
        name = f"{variant}-seed{seed}"
        path = os.path.join(results_dir, name + ".json")
        if os.path.exists(path):
            continue
        log(f"[{k}/{len(runs)}] {name} ({time.time() - t_start:.0f}s into this invocation)")
        res = train_and_evaluate(args, variant, sets, seed, log)
        checkpoint.atomic_write_bytes(json.dumps(res).encode(), path)
        test = res.get("test", {})
        log(
            f"    -> {res['status']} at step {res['steps_done']}, test BLEU {test.get('bleu', float('nan')):.2f} "
            f"chrF {test.get('chrf', float('nan')):.2f}, {res['seconds_this_invocation']:.0f}s"
        )
    return load_results(args.out, "results", "study")


# --- the report ----------------------------------------------------------------------------------------------


def mean_sd(xs: list[float]) -> str:
    """'m ± sd' (sample standard deviation, n - 1) of the finite values, 'm' for one, '—' for none."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def _by_variant(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        out.setdefault(r["variant"], []).append(r)
    return out


def _final_valid(r: dict) -> float | None:
    if r["status"] != "ok" or not r["valid"]:
        return None
    return r["valid"][str(max(int(s) for s in r["valid"]))]["loss"]


def report(results: list[dict], out: str, img_dir: str | None = None, order: list[str] | None = None) -> str:
    """Write <out>/report.md and the PNGs (into img_dir, default <out>); return the Markdown."""
    groups = _by_variant(results)
    names = [n for n in (order or []) if n in groups] + sorted(n for n in groups if n not in (order or []))
    md = [
        "| variant | seeds | diverged | valid loss | test BLEU | test chrF | BLEU per seed | early gnorm max "
        "| s/update |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        rs = groups[n]
        bleus = [r.get("test", {}).get("bleu") for r in rs]
        md.append(
            f"| {n} | {','.join(str(r['seed']) for r in rs)} | {sum(r['status'] != 'ok' for r in rs)} | "
            f"{mean_sd([_final_valid(r) for r in rs])} | {mean_sd(bleus)} | "
            f"{mean_sd([r.get('test', {}).get('chrf') for r in rs])} | "
            f"{' / '.join('—' if b is None else f'{b:.2f}' for b in bleus)} | "
            f"{mean_sd([r['gnorm_stats'].get('max') for r in rs])} | "
            f"{mean_sd([r['s_per_step'] for r in rs])} |"
        )
    md.append("")
    steps = sorted({int(s) for r in results for s in r["valid"]})
    if len(steps) > 1:
        md.append("Valid loss by step (mean ± sd over seeds):\n")
        md.append("| variant | " + " | ".join(f"step {s}" for s in steps) + " |")
        md.append("|---|" + "---|" * len(steps))
        for n in names:
            cells = [mean_sd([r["valid"].get(str(s), {}).get("loss") for r in groups[n]]) for s in steps]
            md.append(f"| {n} | " + " | ".join(cells) + " |")
        md.append("")
    dirs = sorted({d for r in results for d in r.get("test", {}).get("directions", {}) if d != "all"})
    if dirs:
        md.append("Test BLEU per direction (mean ± sd over seeds):\n")
        md.append("| variant | " + " | ".join(dirs) + " |")
        md.append("|---|" + "---|" * len(dirs))
        for n in names:
            cells = [
                mean_sd([r.get("test", {}).get("directions", {}).get(d, {}).get("bleu") for r in groups[n]])
                for d in dirs
            ]
            md.append(f"| {n} | " + " | ".join(cells) + " |")
        md.append("")
    means = layer_means(groups)
    if means:
        md.append(
            "Trained checkpoints, Figures 8-9 style (means over layers, then mean ± sd over seeds); gradient "
            "norms of layer 1 (the bottom) and of the top layer on one valid batch:\n"
        )
        md.append(
            "| variant | enc adjacent cos | dec adjacent cos | enc FFN non-zero | dec FFN non-zero | "
            "enc L1 grad | enc top grad | dec L1 grad | dec top grad |"
        )
        md.append("|---|---|---|---|---|---|---|---|---|")
        for n in names:
            rs = [r for r in groups[n] if r.get("analysis")]
            if not rs:
                continue
            a = [r["analysis"] for r in rs]
            cells = [
                mean_sd([float(np.mean(x[st][k])) for x in a])
                for k in ("cosine", "ffn_nonzero")
                for st in ("encoder", "decoder")
            ]  # the header's order: cos enc, dec; FFN enc, dec
            cells += [
                f"{statistics.mean(x[st]['grad_norm'][i] for x in a):.2e}"
                for st in ("encoder", "decoder")
                for i in (0, -1)
            ]
            md.append(f"| {n} | " + " | ".join(cells) + " |")
        md.append("")
    md += health_table(groups, names)
    img_dir = img_dir or out
    os.makedirs(img_dir, exist_ok=True)
    _plot_curves(groups, names, out, os.path.join(img_dir, "study_gnorm_loss.png"))
    _plot_health_profiles(groups, names, os.path.join(img_dir, "study_health.png"))
    if means:
        analysis.plot_analysis(
            {n: means[n] for n in names if n in means},
            os.path.join(img_dir, "study_layers.png"),
            "trained checkpoints, per-layer means over seeds (Figs. 8-9 style)",
        )
    text = "\n".join(md)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(text + "\n")
    return text


def health_table(groups: dict[str, list[dict]], names: list[str]) -> list[str]:
    """The monitor's view of training: per variant, each stack's bottom-layer / top-layer gradient norm (mean of
    the last records, geometric mean over seeds) and the seeds on which the monitor's warning rule held."""
    rows = []
    for n in names:
        hs = [r.get("health", {}) for r in groups[n]]
        if not any(hs):
            continue
        cells = []
        for stack in monitor.STACKS:
            ratios = [h[stack]["bottom_over_top"] for h in hs if h.get(stack, {}).get("bottom_over_top")]
            cells.append(f"{math.exp(statistics.mean(math.log(x) for x in ratios)):.1e}" if ratios else "—")
            starved = [
                f"{r['seed']}@{r['health'][stack]['starved_at']}"
                for r, h in zip(groups[n], hs)
                if h.get(stack, {}).get("starved_at") is not None
            ]
            cells.append(", ".join(starved) or "none")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    last = max(h[stack]["last"] for rs in groups.values() for r in rs for h in [r.get("health", {})] for stack in h)
    return [
        f"Health monitor, training gradients (median of the last {last} records per layer; geometric mean over "
        f"seeds of bottom layer / top layer) and the seeds on which its warning rule held (bottom more than "
        f"{monitor.WARN_RATIO:.0e} below the top for {monitor.WARN_INTERVALS} records in a row: seed@first step):\n",
        "| variant | enc bottom/top | enc warned | dec bottom/top | dec warned |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def layer_means(groups: dict[str, list[dict]]) -> dict[str, dict]:
    """{variant: per-layer cosine / FFN density / gradient norm averaged over its analysed seeds}."""
    out = {}
    for n, rs in groups.items():
        a = [r["analysis"] for r in rs if r.get("analysis")]
        if a:
            out[n] = {
                st: {k: list(np.mean([x[st][k] for x in a], axis=0)) for k in ("cosine", "ffn_nonzero", "grad_norm")}
                for st in ("encoder", "decoder")
            }
    return out


def _plot_curves(groups, names, out, path, early: int = 400, window: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, n in enumerate(names):
        for j, r in enumerate(groups[n]):
            train_log, _ = read_log(os.path.join(out, "runs", r["name"]))
            steps = sorted(train_log)
            g = [train_log[s].get("gnorm", float("nan")) for s in steps if s <= early]
            label = n if j == 0 else None
            c = colors[k % len(colors)]
            axes[0].plot(steps[: len(g)], g, lw=0.7, color=c, alpha=0.8, label=label)
            loss = np.array([train_log[s]["loss"] for s in steps], dtype=float)
            if len(loss) >= window:
                sm = np.convolve(loss, np.ones(window) / window, mode="valid")
                axes[1].plot(steps[window - 1 :], sm, lw=1, color=c, alpha=0.8, label=label)
    axes[0].set_yscale("log")
    axes[0].set_title(f"gradient norm, first {early} updates (Fig. 3 style; one line per seed)", fontsize=9)
    axes[1].set_title(f"training loss ({window}-update mean)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("update", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_health_profiles(groups, names, path) -> None:
    """Per variant, the monitor's per-layer training gradient norm at the end of training (mean over seeds of
    log10), encoder and decoder side by side, bottom layer at the left."""
    have = [n for n in names if any(r.get("health") for r in groups[n])]
    if not have:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for n in have:
        for ax, stack in zip(axes, monitor.STACKS):
            profiles = [
                np.log10(np.maximum(r["health"][stack]["profile"], 1e-45))
                for r in groups[n]
                if stack in r.get("health", {})
            ]
            if profiles:
                m = np.mean(profiles, axis=0)
                ax.plot(np.arange(1, len(m) + 1), m, marker=".", label=n)
    for ax, stack in zip(axes, monitor.STACKS):
        ax.set_title(f"{stack}: log10 training gradient norm per layer, end of training (mean over seeds)", fontsize=8)
        ax.set_xlabel("layer (1 = bottom)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- the command ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="study", description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--config", help="the megabranch-train config every run starts from (YAML or JSON)")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run (repeatable)")
    a(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[:KEY=VALUE,...]",
        help="a configuration to compare (repeatable, in report order)",
    )
    a("--seeds", default="1,2,3", help="comma list of config seeds (init, data order, dropout)")
    a("--out", default="runs/study")
    a("--img-dir", help="where the PNGs go (default: --out)")
    a("--test-split", default="test")
    a("--no-test", action="store_true", help="skip decoding the test split (a sweep that reads valid loss and health)")
    a("--beam", type=int, default=4)
    a("--lenpen", type=float, default=0.6)
    a("--analysis-sentences", type=int, default=200, help="first N valid sentences for the Figures 8-9 analysis")
    a("--gnorm-steps", type=int, default=100, help="how many first updates the gradient-norm statistics cover")
    a("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP spin-waiting on a shared CPU)")
    a("--report-only", action="store_true", help="only rebuild the report from the finished runs")
    a("--dry-run", action="store_true", help="print the runs and exit")
    args = ap.parse_args(argv)
    if not args.variant:
        raise UserError(
            "--variant: give at least one, e.g. --variant branchnorm --variant deepnorm:model.residual=deepnorm"
        )
    args.variants = [parse_variant(v) for v in args.variant]
    names = [n for n, _ in args.variants]
    if len(set(names)) != len(names):
        raise UserError(f"--variant: names must differ (got {', '.join(names)})")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds {args.seeds!r}: give at least one seed, each once")
    ints(1).check_flag("--beam", args.beam)
    return args


def main_study(args, log=None) -> str:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.set_num_threads(args.threads)
    runs = plan(args.variants, args.seeds)
    for name, sets, seed in runs:  # every config is checked before the first run spends any time
        run_config(args, sets, seed, os.path.join(args.out, "runs", f"{name}-seed{seed}"))
    if args.dry_run:
        for k, (name, sets, seed) in enumerate(runs, 1):
            print(f"{k:3d} {name}-seed{seed}  {' '.join(sets)}")
        return ""
    if args.report_only:  # the monitor's profile read again from each run's log, where the run is still there
        results = load_results(args.out, "results", "study")
        for r in results:
            run_dir = os.path.join(args.out, "runs", r["name"])
            if os.path.isfile(os.path.join(run_dir, "log.jsonl")):
                r["health"] = health_profile(run_dir)
    else:
        results = run_study(args, log)
    text = report(results, args.out, args.img_dir, [n for n, _ in args.variants])
    log(f"report: {os.path.join(args.out, 'report.md')}")
    return text


@cli_main(prog="study")
def main(argv=None):
    text = main_study(parse_args(argv))
    if text:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
