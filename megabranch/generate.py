"""The `megabranch-generate` command: translate a split and score it with sacreBLEU (the decoding itself is
megabranch.decoding's)."""

from __future__ import annotations

import argparse
import os
import sys

from . import checkpoint
from .config import FINITE, ints
from .data import load_split
from .decoding import bleu, score_directions, translate
from .device import resolve_device
from .errors import UserError, cli_main
from .inference import add_device_arguments, prepare



def _report_directions(model, dataset, src_tok, tgt_tok, args, device="cpu") -> None:
    """megabranch-generate on a multilingual split: BLEU per direction and their average."""
    all_hyps, scores, sig = [], {}, ""
    for name, part, hyps, refs, score, sig in score_directions(model, dataset, tgt_tok, args.beam, args.lenpen,
                                                                args.max_sentences, args.limit, device,
                                                                args.max_tokens):
        scores[name] = score.score
        all_hyps += hyps
        print(f"{args.split} {name}: {len(hyps)} sentences, beam {args.beam}, lenpen {args.lenpen}")
        print(f"{name} BLEU = {score.score:.2f}  ({score})")
        if args.copy_baseline:
            srcs = [src_tok.decode(part.source_tokens(i)) for i in range(len(hyps))]
            print(f"{name} copy-the-source baseline BLEU = {bleu(srcs, refs)[0].score:.2f}")
    print(f"average BLEU over {len(scores)} directions = {sum(scores.values()) / len(scores):.2f}")
    print(f"signature: {sig}")
    if args.output:
        with open(args.output, "w") as fh:
            fh.writelines(h + "\n" for h in all_hyps)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="megabranch-generate", description="Translate a split and score it with sacreBLEU.")
    ap.add_argument("--checkpoint", required=True,
                    help="a save directory (its best checkpoint, else latest), a step_<N> directory of any parallel "
                         "layout, or a latest/best pointer file, e.g. runs/demo")
    ap.add_argument("--data-dir", help="binarized data directory (default: the one the model was trained on)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--lenpen", type=float, default=0.6)
    ap.add_argument("--max-sentences", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="decode only the first N sentences (of each direction)")
    ap.add_argument("--output", help="write hypotheses here, one per line (multilingual: every direction in turn)")
    ap.add_argument("--copy-baseline", action="store_true", help="also score the source copied as the hypothesis")
    add_device_arguments(ap)
    args = ap.parse_args(argv)
    check_arguments(args)
    device = resolve_device(args.device)

    loaded = checkpoint.load_model(args.checkpoint, prefer="best")  # shards of any layout, consolidated
    data_dir = args.data_dir or loaded.config.data.data_dir
    split = load_split(data_dir, args.split)
    dataset, src_tok, tgt_tok = split.dataset, split.src_tok, split.tgt_tok
    if loaded.vocab_sha256 and loaded.vocab_sha256 != meta_vocab_hash(split.meta):
        raise UserError(f"vocabulary of {data_dir} differs from the one {args.checkpoint} was trained with")
    model = prepare(loaded.model, device, args.precision)
    del loaded
    if getattr(dataset, "directions", None):
        _report_directions(model, dataset, src_tok, tgt_tok, args, device)
        return 0
    hyps = translate(model, dataset, tgt_tok, args.beam, args.lenpen, args.max_sentences, args.limit, device,
                     args.max_tokens)
    refs = [tgt_tok.decode(dataset.target_tokens(i)) for i in range(len(hyps))]
    score, sig = bleu(hyps, refs)
    if args.output:
        with open(args.output, "w") as fh:
            fh.writelines(h + "\n" for h in hyps)
    print(f"{args.split}: {len(hyps)} sentences, beam {args.beam}, lenpen {args.lenpen}, {device.type} {args.precision}")
    print(f"BLEU = {score.score:.2f}  ({score})")
    print(f"signature: {sig}")
    if args.copy_baseline:
        srcs = [src_tok.decode(dataset.source_tokens(i)) for i in range(len(hyps))]
        copy, _ = bleu(srcs, refs)
        print(f"copy-the-source baseline BLEU = {copy.score:.2f}")
    return 0


def check_arguments(args) -> None:
    """megabranch-generate's arguments and its output path, before anything is loaded or decoded."""
    for name, rule, note in (("beam", ints(1), ""),
                             ("lenpen", FINITE, ""),
                             ("max-sentences", ints(1), ""),
                             ("max-tokens", ints(0), " (0: batch by --max-sentences)"),
                             ("limit", ints(0), " (0: every sentence)")):
        rule.check_flag(f"--{name}", getattr(args, name.replace("-", "_")), note)
    if args.output:
        parent = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output):
            raise UserError(f"--output {args.output} is a directory; give a file name")
        if not os.path.isdir(parent):
            raise UserError(f"--output {args.output}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"--output {args.output}: directory {parent} is not writable")


def meta_vocab_hash(meta: dict) -> str:
    """One hash for the vocabulary (joint or per language) of a preprocessed directory."""
    hashes = meta.get("spm_sha256", {})
    return "+".join(hashes[k] for k in sorted(hashes)) if isinstance(hashes, dict) else str(hashes)


if __name__ == "__main__":
    sys.exit(main())
