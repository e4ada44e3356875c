"""The report of a sweep (depth_sweep.py): Markdown tables in the style of the BranchNorm paper's Tables 1-2
and PNG plots in the style of its Figures 3, 6-7 and 8-9, from the runs' JSON results."""

from __future__ import annotations

import os

import numpy as np

from megabranch.analysis import layer_grad_norms, plot_analysis
from megabranch.config import Config
from megabranch.data import load_split, pair_batches
from megabranch.model import build_model, draw_init_seed

from .sweep_plan import SCHEMES


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
    out = {}
    for r in runs:
        cfg = Config.from_dict(r["config"])
        cfg.model.fused_kernels = False
        try:
            valid = load_split(cfg.data.data_dir, "valid")
        except Exception:  # report without this table when the data moved
            return {}
        valid_set, src_tok, tgt_tok = valid.dataset, valid.src_tok, valid.tgt_tok
        n = r.get("valid_sentences", 300)
        vb = pair_batches(valid_set, cfg.data.max_tokens, n)
        model = build_model(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, seed=draw_init_seed(cfg.seed))
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
        md.append(
            f"### {title}: valid loss / BLEU after {first['steps']} steps, lr {first['lr']:g}, "
            f"warmup {first['warmup']}, T {first['T']}\n"
        )
        md.append("| scheme | " + " | ".join(f"{d}L-{d}L" for d in depths) + " |")
        md.append("|---|" + "---|" * len(depths))
        for s in schemes:
            cells = [
                _cell(next((r for r in depth if r["spec"]["scheme"] == s and r["spec"]["layers"] == d), None))
                for d in depths
            ]
            md.append(f"| {s} | " + " | ".join(cells) + " |")
        md.append("")
        deepest = depths[-1]
        md.append(
            f"Gradient norms of the first steps (Figure 3 style), {group} runs at {deepest}L-{deepest}L, and the "
            f"final training loss (mean of the last 10 steps):\n"
        )
        md.append("| scheme | steps | mean | std | max | max/median | mean abs dlog | final train loss |")
        md.append("|---|---|---|---|---|---|---|---|")
        for s in schemes:
            r = next((r for r in depth if r["spec"]["scheme"] == s and r["spec"]["layers"] == deepest), None)
            g = (r or {}).get("gnorm_stats", {})
            if g.get("n"):
                ftl = r.get("final_train_loss")
                md.append(
                    f"| {s} | {g['n']} | {g['mean']:.3g} | {g['std']:.3g} | {g['max']:.3g} | "
                    f"{g['max_over_median']:.2f} | {g['mean_abs_dlog']:.3f} | {'—' if ftl is None else f'{ftl:.3f}'} |"
                )
        md.append("")
        init = init_grad_norms([r for r in depth if r["spec"]["layers"] == deepest])
        if init:
            md.append(
                f"Per-layer gradient norms at initialisation (step 0, before any update) vs after training, "
                f"{deepest}L-{deepest}L, one valid batch; layer 1 is the bottom:\n"
            )
            md.append(
                f"| scheme | enc L1 init | enc L{deepest} init | dec L1 init | dec L{deepest} init | enc L1 trained "
                f"| enc L{deepest} trained "
                f"| dec L1 trained | dec L{deepest} trained |"
            )
            md.append("|---|---|---|---|---|---|---|---|---|")
            for s in schemes:
                r = next((r for r in depth if r["spec"]["scheme"] == s and r["spec"]["layers"] == deepest), None)
                if r is None or s not in init:
                    continue
                g0 = init[s]
                cells = [g0["encoder"][0], g0["encoder"][-1], g0["decoder"][0], g0["decoder"][-1]]
                a = r.get("analysis")
                cells += (
                    [
                        a["encoder"]["grad_norm"][0],
                        a["encoder"]["grad_norm"][-1],
                        a["decoder"]["grad_norm"][0],
                        a["decoder"]["grad_norm"][-1],
                    ]
                    if a
                    else [float("nan")] * 4
                )
                md.append(f"| {s} | " + " | ".join(f"{c:.2e}" for c in cells) + " |")
            md.append("")
        analysed = [r for r in depth if r.get("analysis") and r["spec"]["layers"] == deepest]
        if analysed:
            md.append(
                f"Representations after training (Figures 8-9 style), {group} runs at {deepest}L-{deepest}L, "
                f"means over layers:\n"
            )
            md.append("| scheme | enc mean cos | dec mean cos | enc FFN non-zero | dec FFN non-zero |")
            md.append("|---|---|---|---|---|")
            for s in schemes:
                r = next((r for r in analysed if r["spec"]["scheme"] == s), None)
                if r:
                    a = r["analysis"]
                    md.append(
                        f"| {s} | {np.mean(a['encoder']['cosine']):.4f} | {np.mean(a['decoder']['cosine']):.4f} | "
                        f"{np.mean(a['encoder']['ffn_nonzero']):.4f} | {np.mean(a['decoder']['ffn_nonzero']):.4f} |"
                    )
            md.append("")
    for group, key, label in (("lr", "lr", "learning rate"), ("warmup", "warmup", "warmup steps"), ("T", "T", "T")):
        rs = by_group.get(group, [])
        if not rs:
            continue
        vals = sorted({r["spec"][key] for r in rs})
        schemes = _order({r["spec"]["scheme"] for r in rs})
        sp = rs[0]["spec"]
        md.append(
            f"### Sensitivity to {label} ({sp['layers']}L-{sp['layers']}L, {sp['steps']} steps; valid loss / BLEU)\n"
        )
        md.append("| scheme | " + " | ".join(f"{key}={v:g}" for v in vals) + " |")
        md.append("|---|" + "---|" * len(vals))
        for s in schemes:
            cells = [
                _cell(next((r for r in rs if r["spec"]["scheme"] == s and r["spec"][key] == v), None)) for v in vals
            ]
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

    for group in ("depth", "stress"):
        depth = by_group.get(group, [])
        if not depth:
            continue
        deepest = max(r["spec"]["layers"] for r in depth)
        rs = sorted(
            (r for r in depth if r["spec"]["layers"] == deepest), key=lambda r: list(SCHEMES).index(r["spec"]["scheme"])
        )
        sp = rs[0]["spec"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for r in rs:
            g = [x if x is not None else float("nan") for x in r["gnorms"]]
            axes[0].plot(range(1, len(g) + 1), g, lw=1, label=r["spec"]["scheme"])
            losses = [x if x is not None else float("nan") for x in r["losses"]]
            axes[1].plot(range(1, len(losses) + 1), losses, lw=1, label=r["spec"]["scheme"])
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
            plot_analysis(
                analysed,
                os.path.join(img_dir, f"fig8_9_{group}_layers.png"),
                f"{deepest}L-{deepest}L after {sp['steps']} steps at lr {sp['lr']:g} (Figs. 8-9 style)",
            )
    panels = [
        (g, k, label)
        for g, k, label in (
            ("lr", "lr", "learning rate"),
            ("warmup", "warmup", "warmup steps"),
            ("T", "T", "BranchNorm T"),
        )
        if by_group.get(g)
    ]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
        for ax, (group, key, label) in zip(axes[0], panels):
            rs = by_group[group]
            for s in _order({r["spec"]["scheme"] for r in rs}):
                pts = sorted((r["spec"][key], r) for r in rs if r["spec"]["scheme"] == s)
                xs = [p[0] for p in pts]
                ys = [
                    p[1]["valid_loss"]
                    if p[1]["status"] == "ok" and p[1].get("valid_loss") is not None
                    else float("nan")
                    for p in pts
                ]
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
