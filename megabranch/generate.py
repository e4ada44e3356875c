"""Batched beam search with incremental decoding, and the `megabranch-generate` command (sacreBLEU).

The decoder runs one new token per step against a per-layer key/value cache, so a 500-layer decoder never
recomputes the prefix. Hypotheses are scored fairseq-style: sum of log-probs / length ** lenpen.
"""

from __future__ import annotations

import argparse
import os
import sys

import sacrebleu
import torch

from . import checkpoint
from .config import FINITE, Config, ints
from .data import load_split
from .errors import UserError, cli_main
from .inference import add_device_arguments, prepare, resolve_device, sentence_batches
from .model import PAD, build_model_from


def _max_len(model, src_tokens, max_len_a: float, max_len_b: int) -> int:
    src_len = int(src_tokens.ne(PAD).sum(1).max())
    limit = model.decoder.embed.max_positions
    return max(1, min(int(max_len_a * src_len + max_len_b), limit))


@torch.no_grad()
def greedy_decode(model, src_tokens, bos: int, eos: int, max_len_a: float = 1.2, max_len_b: int = 10):
    """Argmax decoding -> list of token lists (without bos/eos). The reference for beam=1."""
    model.eval()
    memory, mask = model.encoder(src_tokens)
    bsz = src_tokens.shape[0]
    max_len = _max_len(model, src_tokens, max_len_a, max_len_b)
    cache = [{} for _ in model.decoder.layers]
    tokens = torch.full((bsz, 1), bos, dtype=torch.long, device=src_tokens.device)
    out: list[list[int] | None] = [None] * bsz
    for step in range(max_len):
        logits = model.decoder(tokens[:, -1:], memory, mask, cache=cache, offset=step)[:, -1].float()
        logits[:, PAD] = logits[:, bos] = -float("inf")
        nxt = logits.argmax(-1) if step < max_len - 1 else torch.full_like(tokens[:, 0], eos)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        for i in range(bsz):
            if out[i] is None and int(nxt[i]) == eos:
                out[i] = tokens[i, 1:-1].tolist()
        if all(o is not None for o in out):
            break
    return out


@torch.no_grad()
def beam_search(
    model, src_tokens, bos: int, eos: int, beam: int = 4, lenpen: float = 0.6, max_len_a: float = 1.2, max_len_b: int = 10
):
    """-> list (per sentence) of the best hypothesis' tokens (without bos/eos)."""
    model.eval()
    device = src_tokens.device
    bsz = src_tokens.shape[0]
    memory, mask = model.encoder(src_tokens)
    memory, mask = memory.repeat_interleave(beam, 0), mask.repeat_interleave(beam, 0)
    max_len = _max_len(model, src_tokens, max_len_a, max_len_b)
    cache = [{} for _ in model.decoder.layers]

    tokens = torch.full((bsz * beam, 1), bos, dtype=torch.long, device=device)
    scores = torch.full((bsz, beam), -float("inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step yields distinct candidates
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(bsz)]
    done = [False] * bsz
    base = (torch.arange(bsz, device=device) * beam)[:, None]

    for step in range(max_len):
        logits = model.decoder(tokens[:, -1:], memory, mask, cache=cache, offset=step)[:, -1].float()
        lprobs = torch.log_softmax(logits, -1)
        lprobs[:, PAD] = lprobs[:, bos] = -float("inf")
        if step == max_len - 1:  # out of room: only eos may follow
            eos_col = lprobs[:, eos].clone()
            lprobs.fill_(-float("inf"))
            lprobs[:, eos] = eos_col
        vocab = lprobs.shape[-1]
        cand = (scores.view(-1, 1) + lprobs).view(bsz, beam * vocab)
        top_scores, top_idx = cand.topk(min(2 * beam, cand.shape[1]), dim=1)
        top_beam, top_tok = top_idx // vocab, top_idx % vocab

        # eos among the first `beam` candidates finishes a hypothesis (fairseq's rule; makes beam=1 greedy)
        is_eos = top_tok.eq(eos)
        for i in range(bsz):
            if done[i]:
                continue
            for j in range(beam):
                if is_eos[i, j] and top_scores[i, j] > -float("inf"):
                    hyp = tokens[base[i, 0] + top_beam[i, j], 1:].tolist()
                    finished[i].append((float(top_scores[i, j]) / (step + 1) ** lenpen, hyp))
            if len(finished[i]) >= beam:
                done[i] = True
        if all(done):
            break

        # keep the best `beam` candidates that do not end in eos
        masked = top_scores.masked_fill(is_eos, -float("inf"))
        keep_scores, keep_pos = masked.topk(beam, dim=1)
        keep_beam = top_beam.gather(1, keep_pos)
        keep_tok = top_tok.gather(1, keep_pos)
        order = (base + keep_beam).view(-1)
        tokens = torch.cat([tokens.index_select(0, order), keep_tok.view(-1, 1)], 1)
        scores = keep_scores
        for layer_cache in cache:  # cross-attention keys are identical across a sentence's beams: no reorder
            sc = layer_cache["self"]
            sc["k"], sc["v"] = sc["k"].index_select(0, order), sc["v"].index_select(0, order)

    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]


def translate(model, dataset, tokenizer, beam: int, lenpen: float, max_sentences: int = 64, limit: int = 0, device="cpu",
              max_tokens: int = 0):
    """Decode `dataset` (in batches of similar source length, inference.sentence_batches: at most max_tokens
    padded source tokens (0: no budget) and max_sentences sentences) -> detokenized strings in dataset order."""
    n = len(dataset) if not limit else min(limit, len(dataset))
    hyps: list[str | None] = [None] * n
    for idx in sentence_batches(dataset.src_sizes, n, max_tokens, max_sentences):
        batch = dataset.collater([dataset[i] for i in idx])
        src = batch["src_tokens"].to(device)
        if beam == 1:
            out = greedy_decode(model, src, tokenizer.bos, tokenizer.eos)
        else:
            out = beam_search(model, src, tokenizer.bos, tokenizer.eos, beam=beam, lenpen=lenpen)
        for i, toks in zip(idx, out):
            hyps[i] = tokenizer.decode(toks)
    return hyps


def bleu(hyps: list[str], refs: list[str]):
    """-> (sacreBLEU score object, signature string) with sacreBLEU's defaults (13a tokenization)."""
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hyps, [refs])
    return score, str(metric.get_signature())


def quick_bleu(model, dataset, tokenizer, beam: int, limit: int, device="cpu") -> float:
    """sacreBLEU (2 decimals) of decoding the first `limit` sentences of `dataset`: training's validation BLEU."""
    hyps = translate(model, dataset, tokenizer, beam, 0.6, limit=limit, device=device)
    refs = [tokenizer.decode(dataset.target_tokens(i)) for i in range(len(hyps))]
    return round(bleu(hyps, refs)[0].score, 2)


def directions_of(dataset) -> list[tuple[str, object]]:
    """[(direction name, its dataset)] of a multilingual dataset; [("all", dataset)] for a single pair."""
    names = getattr(dataset, "directions", None)
    return [(n, dataset.direction(n)) for n in names] if names else [("all", dataset)]


def _score_directions(model, dataset, tokenizer, beam, lenpen, max_sentences=64, limit=0, device="cpu",
                      max_tokens: int = 0):
    """Yield (name, its dataset, hypotheses, references, sacreBLEU score, signature) for every direction."""
    for name, part in directions_of(dataset):
        hyps = translate(model, part, tokenizer, beam, lenpen, max_sentences, limit, device, max_tokens)
        refs = [tokenizer.decode(part.target_tokens(i)) for i in range(len(hyps))]
        score, sig = bleu(hyps, refs)
        yield name, part, hyps, refs, score, sig


def per_direction_bleu(model, dataset, tokenizer, beam: int = 1, limit: int = 0, device="cpu",
                       lenpen: float = 0.6) -> tuple[dict, float]:
    """({direction: sacreBLEU}, their unweighted average): the first `limit` sentences (0: all) of every
    direction decoded and scored on its own, e.g. a multilingual validation set during training."""
    scores = {name: score.score for name, _, _, _, score, _ in
              _score_directions(model, dataset, tokenizer, beam, lenpen, limit=limit, device=device)}
    return scores, sum(scores.values()) / len(scores)


def validation_bleu(model, dataset, tokenizer, beam: int, limit: int, device="cpu") -> dict:
    """Training's validation BLEU: {"bleu": ...} for one pair; for a multilingual set also "bleu_<direction>" for
    each direction, "bleu" being their average (the first `limit` sentences of every direction)."""
    if not getattr(dataset, "directions", None):
        return {"bleu": quick_bleu(model, dataset, tokenizer, beam, limit, device)}
    scores, average = per_direction_bleu(model, dataset, tokenizer, beam, limit, device)
    return {"bleu": round(average, 2), **{f"bleu_{name}": round(v, 2) for name, v in scores.items()}}


def _report_directions(model, dataset, src_tok, tgt_tok, args, device="cpu") -> None:
    """megabranch-generate on a multilingual split: BLEU per direction and their average."""
    all_hyps, scores, sig = [], {}, ""
    for name, part, hyps, refs, score, sig in _score_directions(model, dataset, tgt_tok, args.beam, args.lenpen,
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

    state = checkpoint.load_checkpoint(args.checkpoint, prefer="best")  # shards of any layout, consolidated
    cfg = Config.from_dict(state["config"], where=args.checkpoint)
    data_dir = args.data_dir or cfg.data.data_dir
    split = load_split(data_dir, args.split)
    dataset, src_tok, tgt_tok = split.dataset, split.src_tok, split.tgt_tok
    if state.get("vocab_sha256") and state["vocab_sha256"] != meta_vocab_hash(split.meta):
        raise UserError(f"vocabulary of {data_dir} differs from the one {args.checkpoint} was trained with")
    model = build_model_from(cfg.model, state["vocab_size"], state.get("tgt_vocab_size"), state["model"],
                             state["step"], state["step_dir"])
    del state
    model = prepare(model, device, args.precision)
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
