"""The self-check of every serving export: the target package loads the written files and runs next to
megabranch's own model (built from the unfolded source weights, so the folding is what is checked) on a fixed
batch with padded rows. fp32 logits at every position that is not padding must agree within EXPORT_TOLERANCE
(relative to the largest logit), and greedy and beam-4 hypotheses must equal megabranch's decoding.

    logits_fn(src, prev) -> (B, T, V) logits in megabranch's ids and column order
    decode_fn(src, beam, lenpen, max_len) -> token lists (no <s> / </s>), max_len counting </s>

At the length limit megabranch (like fairseq) ends every live hypothesis with </s> and ranks them with its
log-probability; CTranslate2 ends them without it and ranks them as they are, and transformers' beam search
(with its forced </s>) keeps other candidates there (measured: a hypothesis megabranch scores lower). A beam-4
search that reaches the limit may therefore pick another hypothesis: for those targets (`limit_differs`) a
difference is allowed only in a sentence where megabranch's or the package's hypothesis reached the limit, and
is counted and printed; fairseq's search is megabranch's, to the limit included.
"""

from __future__ import annotations

import torch

from ..decoding import beam_search, greedy_decode, max_length
from ..errors import UserError
from ..vocab import BOS, EOS, PAD
from .check import build_single, fixed_batch
from .folding import relative_difference
from .serving import Export

EXPORT_TOLERANCE = 1e-4  # another implementation, and the folded eps a target may round to one value (folding.py)
BEAM, LENPEN = 4, 0.6


def sample(ex: Export) -> tuple[torch.Tensor, torch.Tensor]:
    """check.fixed_batch as sentences: each source ends in </s>, each decoder input starts with <s> (some rows
    padded)."""
    src, prev = fixed_batch(ex.vocab, ex.tgt_vocab, ex.mc.max_positions)
    for row in src:
        row[int(row.ne(PAD).sum()) - 1] = EOS
    prev[:, 0] = BOS
    return src, prev


def source_model(ex: Export):
    return build_single(ex.mc, ex.vocab, ex.tgt_vocab, ex.params, ex.step)


@torch.no_grad()
def check_export(
    what: str, package: str, ex: Export, logits_fn, decode_fn, enforce: bool = True, limit_differs: bool = False
) -> dict:
    """Runs the comparisons, prints what was compared, raises UserError on a difference when `enforce`
    (a quantized export prints its differences only); -> the numbers, for megabranch.json."""
    model = source_model(ex)
    src, prev = sample(ex)
    keep = prev.ne(PAD)
    ours = model(src, prev).float()
    rel = relative_difference(ours[keep], logits_fn(src, prev)[keep])
    ok = rel < EXPORT_TOLERANCE
    padded = int(src.eq(PAD).sum() + prev.eq(PAD).sum())
    print(
        f"check ({what}): logits against {package} own forward on a fixed batch of {src.shape[0]} "
        f"sentences ({padded} padded positions), fp32: max relative difference {rel:.3g} "
        f"{'<' if ok else '>='} {EXPORT_TOLERANCE:g}: {'OK' if ok else 'FAILED' if enforce else 'not enforced'}"
    )
    if enforce and not ok:
        raise UserError(f"export check failed for {what}: logits differ by {rel:.3g} (relative); nothing written")
    length = max_length(model, src, 1.2, 10)
    same, at_limit = {}, 0
    n = src.shape[0]
    for name, beam in (("greedy", 1), (f"beam-{BEAM}", BEAM)):
        theirs = decode_fn(src, beam, LENPEN if beam > 1 else 1.0, length)
        mine = greedy_decode(model, src, BOS, EOS) if beam == 1 else beam_search(model, src, BOS, EOS, BEAM, LENPEN)
        same[name] = sum(a == b for a, b in zip(theirs, mine))
        at_limit += sum(a != b and length - 1 in (len(a), len(b)) for a, b in zip(theirs, mine)) if limit_differs else 0
    agree = sum(same.values()) + at_limit == 2 * n
    limit = f" ({at_limit} differing where the search reached the length limit)" if at_limit else ""
    print(
        f"check ({what}): greedy and beam-{BEAM} (lenpen {LENPEN}) hypotheses of the {n} sentences against "
        f"megabranch's: "
        + ", ".join(f"{k} {v}/{n} identical" for k, v in same.items())
        + f"{limit}: {'OK' if agree else 'FAILED' if enforce else 'not enforced'}"
    )
    if enforce and not agree:
        raise UserError(f"export check failed for {what}: hypotheses differ from megabranch's; nothing written")
    return {
        "logits_max_relative_difference": rel,
        "tolerance": EXPORT_TOLERANCE,
        "sentences": n,
        **{f"{k}_identical": v for k, v in same.items()},
        "differing_at_the_length_limit": at_limit,
    }
