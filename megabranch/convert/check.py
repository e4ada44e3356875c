"""The conversions' self-check: the single-process model built from two sets of weights, run on one fixed
batch; the largest relative difference of the logits (fp32) must be under TOLERANCE. Against another package's
model (check_against_source): its own forward on the same batch, in its token ids, under SOURCE_TOLERANCE."""

from __future__ import annotations

import torch

from ..checkpoint import model_from_weights
from ..config import ModelConfig
from ..errors import UserError
from ..vocab import PAD

TOLERANCE = 1e-6
SOURCE_TOLERANCE = 1e-5  # another implementation: other summation orders, fp32 sinusoids


def build_single(mc: ModelConfig, vocab: int, tgt_vocab: int | None, params: dict, step: int = 0):
    """The single-process model (eager kernels, eval mode) holding `params`; a mismatch is a UserError."""
    return model_from_weights(mc, vocab, tgt_vocab, params, step, "the weights", fused_kernels=False)


def fixed_batch(vocab: int, tgt_vocab: int | None, max_positions: int):
    """Three source / previous-output sentences with some padding, the same on every call."""
    g = torch.Generator().manual_seed(1234)
    s, t = min(9, max_positions), min(7, max_positions)
    src = torch.randint(4, vocab, (3, s), generator=g)
    prev = torch.randint(4, tgt_vocab or vocab, (3, t), generator=g)
    src[1, -2:] = 0  # some padding
    prev[2, -3:] = 0
    return src, prev


@torch.no_grad()
def logits_of(mc: ModelConfig, vocab: int, tgt_vocab: int | None, params: dict, step: int) -> torch.Tensor:
    model = build_single(mc, vocab, tgt_vocab, {k: v.float() for k, v in params.items()}, step)
    src, prev = fixed_batch(vocab, tgt_vocab, mc.max_positions)
    return model(src, prev).float()


def check(
    what: str, mc: ModelConfig, vocab: int, tgt_vocab: int | None, source: dict, converted: dict, step: int
) -> float:
    """Logits of the source and the converted weights on a fixed batch; prints and enforces the tolerance."""
    a = logits_of(mc, vocab, tgt_vocab, source, step)
    b = logits_of(mc, vocab, tgt_vocab, converted, step)
    rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
    ok = rel < TOLERANCE
    print(
        f"check ({what}): logits on a fixed batch of {a.shape[0]} sentences, fp32: max relative difference "
        f"{rel:.3g} {'<' if ok else '>='} {TOLERANCE:g}: {'OK' if ok else 'FAILED'}"
    )
    if not ok:
        raise UserError(f"conversion check failed for {what}: outputs differ by {rel:.3g} (relative)")
    return rel


def check_against_source(
    what: str,
    mc: ModelConfig,
    vocab: int,
    tgt_vocab: int | None,
    params: dict,
    step: int,
    source_logits,
    to_source: list[int] | None = None,
) -> float:
    """The converted weights' logits on the fixed batch (some rows padded) against the real source model's:
    source_logits(src, prev) runs it on the batch in its own token ids (`to_source`: megabranch id -> source id,
    also used to put its logit columns in megabranch's order). Compared at every position that is not padding
    (a padded position's output is not used by either model); prints and enforces SOURCE_TOLERANCE."""
    ours = logits_of(mc, vocab, tgt_vocab, params, step)
    src, prev = fixed_batch(vocab, tgt_vocab, mc.max_positions)
    if to_source is None:
        theirs = source_logits(src, prev)
    else:
        m = torch.tensor(to_source)
        theirs = source_logits(m[src], m[prev]).index_select(-1, m)
    keep = prev.ne(PAD)
    a, b = theirs[keep], ours[keep]
    rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
    ok = rel < SOURCE_TOLERANCE
    print(
        f"check ({what}): logits against the source model's own forward on a fixed batch of {src.shape[0]} "
        f"sentences ({int(src.eq(PAD).sum() + prev.eq(PAD).sum())} padded positions), fp32: max relative "
        f"difference {rel:.3g} {'<' if ok else '>='} {SOURCE_TOLERANCE:g}: {'OK' if ok else 'FAILED'}"
    )
    if not ok:
        raise UserError(
            f"conversion check failed for {what}: the converted model's logits differ from the source "
            f"model's by {rel:.3g} (relative)"
        )
    return rel
