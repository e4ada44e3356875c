#!/usr/bin/env python3
"""Depth / residual-scheme / hyper-parameter sweep that checks the BranchNorm paper's claims at small scale.

    python tools/depth_sweep.py --data data-bin/kjv_web --out runs/depth_sweep --depths 6,18,36

Trains the same tiny config with post_ln, pre_ln, deepnorm and branchnorm (linear / exp / sigmoid alpha) at each
depth, then deepnorm vs branchnorm over learning rates, warmups and (BranchNorm) T at --sens-layers; records
divergence (NaN or loss blow-up), final valid loss and BLEU, early gradient-norm statistics and, for the depth
runs, per-layer cosine similarity / FFN sparsity / gradient norms. Each run's result is <out>/runs/<name>.json;
finished runs are skipped, so re-running the same command resumes. Writes <out>/report.md (Markdown tables in
the style of the paper's Tables 1-2) and PNGs (Figures 3, 6-7, 8-9 style). The logic lives in megabranch.sweep.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabranch.errors import cli_main  # noqa: E402
from megabranch.sweep import add_arguments, main_sweep  # noqa: E402


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
