"""Per-layer analysis of trained megabranch models (the BranchNorm paper's Figures 8-9 and layer gradients).

    python -m tools.research.analyze runs/deepnorm/latest runs/branchnorm/latest \
        --data data-bin/kjv_web --out runs/analysis

A CHECKPOINT is whatever megabranch.checkpoint.load_model reads: a save directory (its latest step), a
step_<N>/ directory or a latest/best pointer. For each checkpoint, on the first --sentences sentences of
--split (in megabranch.data.pair_batches): the cosine similarity between adjacent layers' representations
(input vs output of every layer, encoder and decoder separately, averaged over non-pad tokens), the FFN
activation density (fraction of non-zero entries after the activation; sparsity = 1 - it) and the per-layer
gradient norms of the training loss on one batch. Writes <out>.csv (one row per checkpoint, stack and layer)
and <out>.png (one line per checkpoint). The measurements are megabranch.analysis functions.
"""

from __future__ import annotations

import argparse
import os
import sys
from statistics import fmean as mean

import torch

from megabranch import analysis, checkpoint
from megabranch.data import load_split, pair_batches
from megabranch.errors import UserError, cli_main


def _default_label(path: str) -> str:
    """runs/bn -> bn; runs/bn/step_300 -> bn/step_300; runs/bn/latest -> bn."""
    parts = os.path.abspath(path).rstrip("/").split(os.sep)
    if parts[-1] in ("latest", "best"):
        return parts[-2]
    if parts[-1].startswith("step_") and len(parts) > 1:
        return f"{parts[-2]}/{parts[-1]}"
    return parts[-1]


def run_analysis(models: dict, batches: list[dict], out: str) -> dict:
    """models: {label: (model, Config)} (loaded from checkpoints or built in-process) -> {label: stats};
    writes <out>.csv and <out>.png and prints one summary line per model."""
    results, rows = {}, []
    for label, (model, cfg) in models.items():
        stats = analysis.analyze_batches(model, batches, cfg.optim.label_smoothing)
        results[label] = stats
        rows += analysis.analysis_rows(stats, label)
        enc, dec = stats["encoder"], stats["decoder"]
        print(
            f"{label}: mean adjacent cosine enc {mean(enc['cosine']):.4f} dec {mean(dec['cosine']):.4f}; "
            f"FFN non-zero enc {mean(enc['ffn_nonzero']):.4f} dec {mean(dec['ffn_nonzero']):.4f}; "
            f"grad norm {stats['grad_total']:.4g}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    analysis.write_csv(rows, out + ".csv")
    analysis.plot_analysis(results, out + ".png")
    print(f"wrote {out}.csv and {out}.png")
    return results


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="analyze", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    ap.add_argument("--data", required=True, help="binarized data dir (megabranch-preprocess output)")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--sentences", type=int, default=200, help="first N sentences of the split")
    ap.add_argument("--max-tokens", type=int, default=1024, help="padded tokens per batch")
    ap.add_argument("--labels", help="comma list, one per checkpoint (default: the checkpoint path's last part)")
    ap.add_argument("--out", default="analysis", help="output prefix: writes <out>.csv and <out>.png")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = args.labels.split(",") if args.labels else [_default_label(p) for p in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        raise UserError(f"--labels has {len(labels)} names for {len(args.checkpoints)} checkpoints")
    if not os.path.isfile(os.path.join(args.data, "meta.json")):
        raise UserError(f"--data {args.data}: no meta.json there; run megabranch-preprocess first")
    dataset = load_split(args.data, args.split).dataset
    batches = pair_batches(dataset, args.max_tokens, args.sentences)
    models = {}
    for path, label in zip(args.checkpoints, labels):
        # eager kernels: the analysis hooks read plain tensors; the fused kernel does not change the values
        loaded = checkpoint.load_model(path, fused_kernels=False)
        models[label] = (loaded.model, loaded.config)
    run_analysis(models, batches, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
