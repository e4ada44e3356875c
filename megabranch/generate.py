"""The `megabranch-generate` command: translate a split and score it with sacreBLEU (the decoding itself is
megabranch.decoding's)."""

from __future__ import annotations

import argparse
import os
import sys

from . import checkpoint
from .config import FINITE, ints
from .data import load_split
from .decoding import REFERENCE_SOURCES, bleu, score_directions
from .device import resolve_device
from .errors import UserError, cli_main
from .inference import add_device_arguments, prepare


def _report_directions(model, dataset, src_tok, tgt_tok, args, device="cpu") -> None:
    """megabranch-generate on a multilingual split: BLEU per direction and their average."""
    all_hyps, scores, sig = [], {}, ""
    for d in _scored(model, dataset, tgt_tok, args, device):
        scores[d.name] = d.score.score
        all_hyps += d.hyps
        sig = d.signature
        print(f"{args.split} {d.name}: {len(d.hyps)} sentences, beam {args.beam}, lenpen {args.lenpen}")
        print(f"{d.name} BLEU = {d.score.score:.2f}  ({d.score})")
        print(f"{d.name} references: {_describe(d.reference_source, args.references)}")
        if args.copy_baseline:
            srcs = [src_tok.decode(d.part.source_tokens(i)) for i in range(len(d.hyps))]
            print(f"{d.name} copy-the-source baseline BLEU = {bleu(srcs, d.refs)[0].score:.2f}")
    print(f"average BLEU over {len(scores)} directions = {sum(scores.values()) / len(scores):.2f}")
    print(f"signature: {sig}")
    _write_hypotheses(args.output, all_hyps)


def _scored(model, dataset, tgt_tok, args, device):
    """Every direction of `dataset` decoded and scored with the command's settings, one at a time."""
    return score_directions(
        model,
        dataset,
        tgt_tok,
        args.beam,
        args.lenpen,
        args.max_sentences,
        args.limit,
        device,
        args.max_tokens,
        args.references,
    )


def _describe(used: str, wanted: str) -> str:
    """Which references a score was computed against, and why when not the ones asked for."""
    note = "" if used == wanted else " (this data directory keeps no raw references: preprocess it again to get them)"
    return REFERENCE_SOURCES[used] + note


def _write_hypotheses(path: str | None, hyps: list[str]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(h + "\n" for h in hyps)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="megabranch-generate", description="Translate a split and score it with sacreBLEU."
    )
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="a save directory (its best checkpoint, else latest), a step_<N> directory of any parallel "
        "layout, or a latest/best pointer file, e.g. runs/demo",
    )
    ap.add_argument("--data-dir", help="binarized data directory (default: the one the model was trained on)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--lenpen", type=float, default=0.6)
    ap.add_argument("--max-sentences", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="decode only the first N sentences (of each direction)")
    ap.add_argument("--output", help="write hypotheses here, one per line (multilingual: every direction in turn)")
    ap.add_argument("--copy-baseline", action="store_true", help="also score the source copied as the hypothesis")
    ap.add_argument(
        "--references",
        choices=tuple(REFERENCE_SOURCES),
        default="raw",
        help="score against the reference file as written (raw, the default: what makes sacreBLEU "
        "comparable across papers) or the target token ids decoded (ids: sentencepiece-normalised)",
    )
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
    d = next(_scored(model, dataset, tgt_tok, args, device))
    _write_hypotheses(args.output, d.hyps)
    print(
        f"{args.split}: {len(d.hyps)} sentences, beam {args.beam}, lenpen {args.lenpen}, {device.type} {args.precision}"
    )
    print(f"BLEU = {d.score.score:.2f}  ({d.score})")
    print(f"references: {_describe(d.reference_source, args.references)}")
    print(f"signature: {d.signature}")
    if args.copy_baseline:
        srcs = [src_tok.decode(dataset.source_tokens(i)) for i in range(len(d.hyps))]
        copy, _ = bleu(srcs, d.refs)
        print(f"copy-the-source baseline BLEU = {copy.score:.2f}")
    return 0


def check_arguments(args) -> None:
    """megabranch-generate's arguments and its output path, before anything is loaded or decoded."""
    for name, rule, note in (
        ("beam", ints(1), ""),
        ("lenpen", FINITE, ""),
        ("max-sentences", ints(1), ""),
        ("max-tokens", ints(0), " (0: batch by --max-sentences)"),
        ("limit", ints(0), " (0: every sentence)"),
    ):
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
