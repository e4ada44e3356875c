"""Plot training curves from one or more megabranch log.jsonl files side by side.

    python -m tools.research.plot_logs runs/post_ln/log.jsonl runs/branchnorm/log.jsonl --out curves.png

    python -m tools.research.plot_logs runs/deep/log.jsonl --health --out health.png

Each metric (default: loss and gnorm) gets a panel; each file is a line labelled by its run directory name
(or --labels). --health draws the training health monitor's records instead: per run, log10 of every layer's
gradient norm and update-to-weight ratio over time (rows: the layers, encoder bottom first; a line between the
encoder and the decoder), so a stack whose lower layers stop learning shows as a dark band at the foot. A run that
produced NaN/inf (null in log.jsonl) shows where it diverged with an x marker. A run
resumed from a checkpoint logs a "start" record at the step it resumed from; the steps after it that the
interrupted run had already logged are dropped, so a resumed run is one curve (megabranch.metrics.read_log).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from megabranch.errors import UserError, cli_main
from megabranch.metrics import heatmap, read_log


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot(paths, labels, metrics, out, tag="train", logy=("gnorm",)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for path, label in zip(paths, labels):
        rows = read_log(path, tag)
        for ax, metric in zip(axes[0], metrics):
            pts = [(r["step"], r[metric]) for r in rows if metric in r]  # null: a non-finite value
            good = [(s, v) for s, v in pts if _finite(v)]
            line = ax.plot([s for s, _ in good], [v for _, v in good], label=label)[0]
            bad = [s for s, v in pts if not _finite(v)]
            if bad:
                top = max((v for _, v in good), default=1.0)
                ax.plot(bad[:1], [top], "x", color=line.get_color(), markersize=10)
    for ax, metric in zip(axes[0], metrics):
        ax.set_xlabel("step")
        ax.set_title(metric)
        if metric in logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_health(paths, labels, out, keys=("grad_norm", "update_ratio")):
    """Per run (a row of panels) and key (a column): the depth x time heatmap of log10 values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(paths), len(keys), figsize=(6 * len(keys), 3.6 * len(paths)), squeeze=False)
    for row, (path, label) in zip(axes, zip(paths, labels)):
        records = read_log(path, "health")
        if not records:
            raise UserError(f"{path} holds no health records (log.health was off, or no interval was logged)")
        for ax, key in zip(row, keys):
            names, steps, values = heatmap(records, key)
            if not steps:
                ax.set_axis_off()
                continue
            image = ax.imshow(
                values,
                origin="lower",
                aspect="auto",
                cmap="viridis",
                interpolation="nearest",
                extent=(steps[0], steps[-1], -0.5, len(names) - 0.5),
            )
            encoder = sum(1 for n in names if n.startswith("encoder."))
            if 0 < encoder < len(names):
                ax.axhline(encoder - 0.5, color="white", linewidth=1)
            ax.set_xlabel("step")
            ax.set_ylabel(f"layer (encoder 0-{encoder - 1}, then decoder)")
            ax.set_title(f"{label}: log10 {key.replace('_', ' ')}")
            fig.colorbar(image, ax=ax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


@cli_main(prog="plot_logs")
def main(argv=None):
    ap = argparse.ArgumentParser(prog="plot_logs", description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", help="log.jsonl files")
    ap.add_argument("--labels", nargs="*", help="one label per file (default: the run directory name)")
    ap.add_argument("--metrics", nargs="+", default=["loss", "gnorm"])
    ap.add_argument("--tag", default="train", help="train or valid records")
    ap.add_argument(
        "--health",
        action="store_true",
        help="draw the per-layer gradient norms and update ratios (the health records) as heatmaps",
    )
    ap.add_argument("--out", default="curves.png")
    args = ap.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.logs]
    if len(labels) != len(args.logs):
        raise UserError(f"{len(labels)} labels for {len(args.logs)} log files")
    if args.health:
        print(plot_health(args.logs, labels, args.out))
    else:
        print(plot(args.logs, labels, args.metrics, args.out, args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
