"""Plot training curves from one or more megabranch log.jsonl files side by side.

    python -m tools.research.plot_logs runs/post_ln/log.jsonl runs/branchnorm/log.jsonl --out curves.png

Each metric (default: loss and gnorm) gets a panel; each file is a line labelled by its run directory name
(or --labels). A run that produced NaN/inf (null in log.jsonl) shows where it diverged with an x marker. A run
resumed from a checkpoint logs a "start" record at the step it resumed from; the steps after it that the
interrupted run had already logged are dropped, so a resumed run is one curve (megabranch.metrics.read_log).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from megabranch.errors import UserError, cli_main
from megabranch.metrics import read_log


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


@cli_main(prog="plot_logs")
def main(argv=None):
    ap = argparse.ArgumentParser(prog="plot_logs", description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", help="log.jsonl files")
    ap.add_argument("--labels", nargs="*", help="one label per file (default: the run directory name)")
    ap.add_argument("--metrics", nargs="+", default=["loss", "gnorm"])
    ap.add_argument("--tag", default="train", help="train or valid records")
    ap.add_argument("--out", default="curves.png")
    args = ap.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.logs]
    if len(labels) != len(args.logs):
        raise UserError(f"{len(labels)} labels for {len(args.logs)} log files")
    print(plot(args.logs, labels, args.metrics, args.out, args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
