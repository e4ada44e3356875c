"""Decoding and scoring: batched beam search with incremental decoding, greedy decoding, whole-split translation
and sacreBLEU, used by `megabranch-generate` and by training's validation BLEU.

The decoder runs one new token per step against a per-layer key/value cache, so a 500-layer decoder never
recomputes the prefix. Hypotheses are scored fairseq-style: sum of log-probs / length ** lenpen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from .data import sentence_batches
from .model import PAD


def max_length(model, src_tokens, max_len_a: float, max_len_b: int) -> int:
    """The most tokens (</s> included) a hypothesis of this batch may have: a * longest source + b, within the
    decoder's positions."""
    src_len = int(src_tokens.ne(PAD).sum(1).max())
    limit = model.decoder.embed.max_positions
    return max(1, min(int(max_len_a * src_len + max_len_b), limit))


def _top_k(x: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=1) (values, column indices) of a wide (rows, V) matrix, found through the maxima of
    blocks of `block` columns: the k largest entries of a row lie in the k blocks with the largest maxima, so
    only those are searched (one vectorized pass over the row instead of topk's selection over all of it)."""
    rows, width = x.shape
    n = width // block
    if n <= k:
        return x.topk(k, dim=1)
    maxima = x[:, : n * block].view(rows, n, block).amax(-1)
    if n * block < width:  # the short last block
        maxima = torch.cat([maxima, x[:, n * block :].amax(-1, keepdim=True)], 1)
    _, blocks = maxima.topk(k, dim=1)
    cols = (blocks[:, :, None] * block + torch.arange(block, device=x.device)).view(rows, -1).clamp_max(width - 1)
    values, pos = x.gather(1, cols).topk(k, dim=1)
    return values, cols.gather(1, pos)


def _keep_rows(cache: list, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> None:
    """The decoder's per-layer key/value caches restricted to (and reordered as) `rows`; the cross-attention
    keys, held once per sentence, restricted to `sentences` when some leave the batch (None: none does)."""
    for layer_cache in cache:
        for kind, keep in (("self", rows), ("cross", sentences)):
            c = layer_cache.get(kind)
            if keep is not None and c and "k" in c:  # a layer that keeps no cache of this kind has nothing to do
                c["k"], c["v"] = c["k"].index_select(0, keep), c["v"].index_select(0, keep)


@torch.inference_mode()  # about 10% faster than no_grad at beam 4 (no version counters)
def greedy_decode(model, src_tokens, bos: int, eos: int, max_len_a: float = 1.2, max_len_b: int = 10):
    """Argmax decoding -> list of token lists (without bos/eos). The reference for beam=1. A sentence leaves the
    batch when it ends."""
    model.eval()
    memory, mask = model.encoder(src_tokens)
    bsz = src_tokens.shape[0]
    max_len = max_length(model, src_tokens, max_len_a, max_len_b)
    cache = [{} for _ in model.decoder.layers]
    tokens = torch.full((bsz, 1), bos, dtype=torch.long, device=src_tokens.device)
    active = torch.arange(bsz, device=src_tokens.device)  # which sentence each row is
    out: list[list[int] | None] = [None] * bsz
    for step in range(max_len):
        logits = model.decoder(tokens[:, -1:], memory, mask, cache=cache, offset=step)[:, -1].float()
        logits[:, PAD] = logits[:, bos] = -float("inf")
        nxt = logits.argmax(-1) if step < max_len - 1 else torch.full_like(tokens[:, 0], eos)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        ended = nxt.eq(eos)
        if not bool(ended.any()):
            continue
        for row in ended.nonzero()[:, 0].tolist():
            out[int(active[row])] = tokens[row, 1:-1].tolist()
        if bool(ended.all()):
            break
        rows = (~ended).nonzero()[:, 0]
        tokens, memory, mask, active = tokens[rows], memory[rows], mask[rows], active[rows]
        _keep_rows(cache, rows, rows)
    return out


@torch.inference_mode()
def beam_search(
    model,
    src_tokens,
    bos: int,
    eos: int,
    beam: int = 4,
    lenpen: float = 0.6,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
):
    """-> list (per sentence) of the best hypothesis' tokens (without bos/eos).

    fairseq's search: at each step the 2 * beam best continuations of a sentence's beams; an </s> among the first
    `beam` of them finishes a hypothesis, scored sum of log-probs / length ** lenpen; a sentence is done when it
    has `beam` finished ones, and leaves the batch then. Each row's log-probabilities are the log_softmax of its
    logits (<pad> and <s> included, then never chosen); only each row's 2 * beam best are ever searched."""
    model.eval()
    device = src_tokens.device
    bsz = src_tokens.shape[0]
    memory, mask = model.encoder(src_tokens)  # once per sentence: the cross-attention groups a sentence's beams
    max_len = max_length(model, src_tokens, max_len_a, max_len_b)
    cache = [{} for _ in model.decoder.layers]

    tokens = torch.full((bsz * beam, 1), bos, dtype=torch.long, device=device)
    scores = torch.full((bsz, beam), -float("inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step yields distinct candidates
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(bsz)]
    active = list(range(bsz))  # the sentence of each group of `beam` rows

    for step in range(max_len):
        n = len(active)
        logits = model.decoder(tokens[:, -1:], memory, mask, cache=cache, offset=step)[:, -1]
        lprobs = logits.float().log_softmax(-1)  # one pass over the vocabulary (logsumexp takes four)
        lprobs[:, PAD] = lprobs[:, bos] = -float("inf")
        if step == max_len - 1:  # out of room: only eos may follow
            eos_col = lprobs[:, eos].clone()
            lprobs.fill_(-float("inf"))
            lprobs[:, eos] = eos_col
        k = min(2 * beam, lprobs.shape[-1])
        row_best, row_tok = _top_k(lprobs, k)
        cand = (scores.view(-1, 1) + row_best).view(n, beam * k)
        top_scores, top_pos = cand.topk(min(2 * beam, beam * k), dim=1)
        top_beam, top_tok = top_pos // k, row_tok.view(n, beam * k).gather(1, top_pos)

        # eos among the first `beam` candidates finishes a hypothesis (fairseq's rule; makes beam=1 greedy)
        is_eos = top_tok.eq(eos)
        ends = is_eos[:, :beam] & top_scores[:, :beam].gt(-float("inf"))
        done = torch.zeros(n, dtype=torch.bool)
        if bool(ends.any()):
            for i, j in ends.nonzero().tolist():
                sent = finished[active[i]]
                if len(sent) < beam:
                    hyp = tokens[i * beam + int(top_beam[i, j]), 1:].tolist()
                    sent.append((float(top_scores[i, j]) / (step + 1) ** lenpen, hyp))
            done = torch.tensor([len(finished[s]) >= beam for s in active])
            if bool(done.all()):
                break

        # keep the best `beam` candidates that do not end in eos, of the sentences not done
        masked = top_scores.masked_fill(is_eos, -float("inf"))
        live = (~done).nonzero()[:, 0]
        shrink = len(live) < n
        if shrink:
            masked, top_beam, top_tok = masked[live], top_beam[live], top_tok[live]
            active = [active[i] for i in live.tolist()]
        keep_scores, keep_pos = masked.topk(beam, dim=1)
        order = ((live * beam)[:, None] + top_beam.gather(1, keep_pos)).view(-1)
        tokens = torch.cat([tokens.index_select(0, order), top_tok.gather(1, keep_pos).view(-1, 1)], 1)
        scores = keep_scores
        _keep_rows(cache, order, live if shrink else None)
        if shrink:
            memory, mask = memory.index_select(0, live), mask.index_select(0, live)

    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]


def translate(
    model,
    dataset,
    tokenizer,
    beam: int,
    lenpen: float,
    max_sentences: int = 64,
    limit: int = 0,
    device="cpu",
    max_tokens: int = 0,
):
    """Decode `dataset` (in batches of similar source length, data.sentence_batches: at most max_tokens
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
    import sacrebleu  # here: 0.15 s of every training process's start-up otherwise (tests/helpers/import_rules.py)

    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hyps, [refs])
    return score, str(metric.get_signature())


REFERENCE_SOURCES = {
    "raw": "the reference file as written (kept by megabranch-preprocess)",
    "ids": "the target token ids decoded (sentencepiece-normalised text)",
}


def references(dataset, tokenizer, n: int, source: str = "raw") -> tuple[list[str], str]:
    """The first n references of `dataset` and which they are (a key of REFERENCE_SOURCES). "raw", the text as the
    reference file has it, is what makes sacreBLEU comparable across papers; a directory preprocessed before the
    raw text was kept beside the binarized files has only "ids", which is also what source="ids" asks for."""
    raw = getattr(dataset, "references", None)
    if source == "raw" and raw is not None:
        return raw[:n], "raw"
    return [tokenizer.decode(dataset.target_tokens(i)) for i in range(n)], "ids"


def quick_bleu(model, dataset, tokenizer, beam: int, limit: int, device="cpu") -> float:
    """sacreBLEU (2 decimals) of decoding the first `limit` sentences of `dataset` against its raw references
    (where kept): training's validation BLEU."""
    hyps = translate(model, dataset, tokenizer, beam, 0.6, limit=limit, device=device)
    refs, _ = references(dataset, tokenizer, len(hyps))
    return round(bleu(hyps, refs)[0].score, 2)


def directions_of(dataset) -> list[tuple[str, object]]:
    """[(direction name, its dataset)] of a multilingual dataset; [("all", dataset)] for a single pair."""
    names = getattr(dataset, "directions", None)
    return [(n, dataset.direction(n)) for n in names] if names else [("all", dataset)]


class Scored(NamedTuple):
    """One direction decoded and scored: its name and dataset, hypotheses, references (and which: a key of
    REFERENCE_SOURCES), the sacreBLEU score and signature."""

    name: str
    part: object
    hyps: list
    refs: list
    reference_source: str
    score: object
    signature: str


def score_directions(
    model,
    dataset,
    tokenizer,
    beam,
    lenpen,
    max_sentences=64,
    limit=0,
    device="cpu",
    max_tokens: int = 0,
    reference_source: str = "raw",
) -> Iterator[Scored]:
    """Decode and score every direction of `dataset` (one for a single pair) in turn."""
    for name, part in directions_of(dataset):
        hyps = translate(model, part, tokenizer, beam, lenpen, max_sentences, limit, device, max_tokens)
        refs, used = references(part, tokenizer, len(hyps), reference_source)
        score, sig = bleu(hyps, refs)
        yield Scored(name, part, hyps, refs, used, score, sig)


def per_direction_bleu(
    model, dataset, tokenizer, beam: int = 1, limit: int = 0, device="cpu", lenpen: float = 0.6
) -> tuple[dict, float]:
    """({direction: sacreBLEU}, their unweighted average): the first `limit` sentences (0: all) of every
    direction decoded and scored on its own, e.g. a multilingual validation set during training."""
    scores = {
        d.name: d.score.score
        for d in score_directions(model, dataset, tokenizer, beam, lenpen, limit=limit, device=device)
    }
    return scores, sum(scores.values()) / len(scores)


def validation_bleu(model, dataset, tokenizer, beam: int, limit: int, device="cpu") -> dict:
    """Training's validation BLEU: {"bleu": ...} for one pair; for a multilingual set also "bleu_<direction>" for
    each direction, "bleu" being their average (the first `limit` sentences of every direction)."""
    if not getattr(dataset, "directions", None):
        return {"bleu": quick_bleu(model, dataset, tokenizer, beam, limit, device)}
    scores, average = per_direction_bleu(model, dataset, tokenizer, beam, limit, device)
    return {"bleu": round(average, 2), **{f"bleu_{name}": round(v, 2) for name, v in scores.items()}}
