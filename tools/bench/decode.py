"""Decoding speed side by side: megabranch-generate's beam search against the serving packages it exports to,
on one trained model, the same sentences, batches and length limits, in one run (ratios are what to read on a
shared machine).

    python -m tools.bench.decode --checkpoint runs/demo6 --split test --threads 1 2
    python -m tools.bench.decode --checkpoint runs/deep18 --engines megabranch ctranslate2 --limit 200

For each engine and thread count: the split decoded at beam 4 (lenpen 0.6), target tokens per second (the
hypotheses' sentencepiece pieces plus </s>) by the wall clock and by this process's CPU time (which other jobs on
the machine disturb far less), sacreBLEU, and the share of sentences whose hypothesis equals
megabranch's. Engines: megabranch (megabranch.decoding.translate, what megabranch-generate runs), ctranslate2
(fp32 and int8, `megabranch-convert --to ctranslate2`), hf (MarianMTModel.generate, `--to hf`), fairseq (its
SequenceGenerator through the hub interface, `--to fairseq`). The exports are written into a temporary
directory by megabranch-convert's own code (each checks itself first). Prints a Markdown table with the
machine, the load average before and after, torch's and the packages' versions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import tempfile
import time

import torch

from megabranch import checkpoint
from megabranch.config import Config
from megabranch.convert import export_ctranslate2 as ct2
from megabranch.convert import export_fairseq, export_hf
from megabranch.convert.check import build_single
from megabranch.convert.serving import prepare
from megabranch.convert.targets import export
from megabranch.data import load_split, sentence_batches
from megabranch.decoding import beam_search, bleu, max_length, references
from megabranch.vocab import BOS, EOS

from .machine import cpu_name, load_average

ENGINES = ("megabranch", "ctranslate2", "ctranslate2-int8", "hf", "fairseq")
BEAM, LENPEN = 4, 0.6


def _decoders(names, ex, tmp: str, threads: int) -> dict:
    """engine name -> decode(src batch, max_len) -> token lists, each built once (exports written into tmp; their
    checks print on stderr, the table alone goes to stdout)."""
    with contextlib.redirect_stdout(sys.stderr):
        return _build(names, ex, tmp, threads)


def _build(names, ex, tmp: str, threads: int) -> dict:
    out = {}
    os.makedirs(tmp, exist_ok=True)
    for name in names:
        if name == "megabranch":
            model = build_single(ex.mc, ex.vocab, ex.tgt_vocab, ex.params, ex.step)
            out[name] = lambda src, n, m=model: beam_search(m, src, BOS, EOS, BEAM, LENPEN)
        elif name.startswith("ctranslate2"):
            quant = "int8" if name.endswith("int8") else None
            path = os.path.join(tmp, name)
            export("ctranslate2", ex, path, quant)
            tr = ct2.translator(path, threads=threads, compute_type="int8" if quant else "float32")
            pieces = (ex.pieces("source", ct2.PAD_PIECE), ex.pieces("target", ct2.PAD_PIECE))
            out[name] = lambda src, n, t=tr, p=pieces: ct2.decode(t, p, src, BEAM, LENPEN, n)
        elif name == "hf":
            path = os.path.join(tmp, name)
            export("hf", ex, path)
            model, _ = export_hf.load(path)
            out[name] = lambda src, n, m=model: export_hf.decode(m, src, BEAM, LENPEN, n)
        elif name == "fairseq":
            path = os.path.join(tmp, name)
            export("fairseq", ex, path)
            hub = export_fairseq.load(path)
            hub.cfg.dataset.batch_size = 10**6  # one call per batch of ours: the same batches for every engine
            out[name] = lambda src, n, h=hub: export_fairseq.decode(h, src, BEAM, LENPEN, n)
    return out


def run_engine(decode, batches, length_model) -> tuple[dict, float, float]:
    """-> (hypotheses by sentence, wall-clock seconds, this process's CPU seconds: what the decoding computed, also
    while other jobs hold the cores, where the wall clock counts the waits too)"""
    hyps, start, cpu = {}, time.perf_counter(), time.process_time()
    for idx, src in batches:
        for i, h in zip(idx, decode(src, max_length(length_model, src, 1.2, 10))):
            hyps[i] = h
    return hyps, time.perf_counter() - start, time.process_time() - cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a save directory (its best, else latest) or step directory")
    ap.add_argument("--data-dir", help="default: the one the model was trained on")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0, help="the first N sentences only (0: all)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--max-tokens", type=int, default=4096, help="megabranch-generate's batching, for every engine")
    ap.add_argument("--max-sentences", type=int, default=64)
    args = ap.parse_args(argv)

    step_dir = checkpoint.resolve(args.checkpoint, "best")
    ck = checkpoint.load_checkpoint(step_dir)
    cfg = Config.from_dict(ck["config"], where=step_dir)
    ex = prepare(cfg, ck, ck["model"], args.data_dir)
    split = load_split(args.data_dir or cfg.data.data_dir, args.split)
    dataset, tok = split.dataset, split.tgt_tok
    n = min(args.limit or len(dataset), len(dataset))
    batches = [
        (idx, dataset.collater([dataset[i] for i in idx])["src_tokens"])
        for idx in sentence_batches(dataset.src_sizes, n, args.max_tokens, args.max_sentences)
    ]
    refs, _ = references(dataset, tok, n)
    length_model = build_single(ex.mc, ex.vocab, ex.tgt_vocab, ex.params, ex.step)
    mc = ex.mc
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            torch.set_num_threads(threads)
            decoders = _decoders(args.engines, ex, os.path.join(tmp, f"t{threads}"), threads)
            ref_hyps = None
            for name in args.engines:
                hyps, secs, cpu = run_engine(decoders[name], batches, length_model)
                tokens = sum(len(h) + 1 for h in hyps.values())
                if name == "megabranch":
                    ref_hyps = hyps
                same = "" if ref_hyps is None else f"{100 * sum(hyps[i] == ref_hyps[i] for i in hyps) / n:.1f}%"
                score = bleu([tok.decode(hyps[i]) for i in range(n)], refs)[0].score
                rows.append((name, threads, secs, tokens / secs, cpu, tokens / cpu, score, same))
                print(
                    f"{name} threads {threads}: {secs:.1f} s ({cpu:.1f} s CPU), {tokens / secs:.0f} target tokens/s, "
                    f"BLEU {score:.2f}",
                    file=sys.stderr,
                )
    speed = {(r[0], r[1]): (r[3], r[5]) for r in rows}
    print(
        f"{mc.residual} {mc.encoder_layers}L-{mc.decoder_layers}L d={mc.d_model} (step {ex.step}), {args.split} "
        f"split, {n} sentences, beam {BEAM}, lenpen {LENPEN}, batches of <= {args.max_sentences} sentences / "
        f"{args.max_tokens} source tokens"
    )
    print(
        f"{cpu_name()}, torch {torch.__version__}, {datetime.date.today()}, load average {load_before} before, "
        f"{load_average()} after\n"
    )
    print(
        "| engine | threads | seconds | target tokens/s | vs ctranslate2 fp32 | CPU seconds | vs ctranslate2 fp32 by "
        "CPU time | BLEU | same hypothesis as megabranch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, threads, secs, tps, cpu, tpc, score, same in rows:
        base = speed.get(("ctranslate2", threads))
        ratio, cpu_ratio = (f"{tps / base[0]:.2f}x", f"{tpc / base[1]:.2f}x") if base else ("", "")
        cells = (name, threads, f"{secs:.1f}", f"{tps:.0f}", ratio, f"{cpu:.1f}", cpu_ratio, f"{score:.2f}", same)
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
