"""Incremental decoding and beam search against full recomputation and exhaustive search."""

import itertools

import pytest
import torch

from megabranch.config import RESIDUALS
from megabranch.decoding import beam_search, greedy_decode
from megabranch.model import build_model
from megabranch.residual import set_step
from tests.helpers.configs import tiny_model_cfg

pytestmark = pytest.mark.unit

BOS, EOS = 2, 3


def _model(residual="branchnorm", vocab=40, **kw):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(residual=residual, **kw), vocab)
    set_step(model, 3000)
    return model.eval()


@pytest.mark.parametrize(
    "residual,embeddings",
    [(r, {}) for r in RESIDUALS] + [("deepnorm", dict(positions="learned", position_offset=2, embed_scale=1.0))],
)  # torchscale's conventions
def test_incremental_decoding_equals_full_recomputation(residual, embeddings):
    model = _model(residual, decoder_layers=3, **embeddings)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 40, (2, 6), generator=g)
    src[0, 4:] = 0
    prev = torch.cat([torch.full((2, 1), BOS), torch.randint(4, 40, (2, 7), generator=g)], 1)
    with torch.no_grad():
        full = model(src, prev)
        memory, mask = model.encoder(src)
        cache = [{} for _ in model.decoder.layers]
        steps = [model.decoder(prev[:, t : t + 1], memory, mask, cache=cache, offset=t) for t in range(prev.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache[0]["self"]["k"].shape[2] == prev.shape[1]  # the prefix was cached, not recomputed


def test_cross_attention_of_a_sentence_held_once_for_its_beams_equals_it_repeated():
    """Incremental decoding with the encoder output once per sentence for a group of consecutive rows (its beams)
    gives each row what the output repeated for every row gives."""
    model = _model(decoder_layers=3)
    g = torch.Generator().manual_seed(4)
    src = torch.randint(4, 40, (3, 6), generator=g)
    src[1, 3:] = 0
    beams = 4
    prev = torch.cat([torch.full((3 * beams, 1), BOS), torch.randint(4, 40, (3 * beams, 5), generator=g)], 1)
    with torch.no_grad():
        memory, mask = model.encoder(src)
        wide = [memory.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)]
        once, repeated = [{} for _ in model.decoder.layers], [{} for _ in model.decoder.layers]
        for t in range(prev.shape[1]):
            a = model.decoder(prev[:, t : t + 1], memory, mask, cache=once, offset=t)
            b = model.decoder(prev[:, t : t + 1], *wide, cache=repeated, offset=t)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert once[0]["cross"]["k"].shape[0] == 3 and repeated[0]["cross"]["k"].shape[0] == 3 * beams


def _reference_beam_search(model, src, beam, lenpen, max_len):
    """fairseq's beam search written out plainly: one sentence at a time, the whole prefix recomputed by the
    model's training forward at every step (no cache, no batch), every continuation of every beam ranked."""
    out = []
    for i in range(src.shape[0]):
        beams, finished = [(0.0, [BOS])], []
        for step in range(max_len):
            prefixes = torch.tensor([tokens for _, tokens in beams])
            with torch.no_grad():
                lprobs = model(src[i : i + 1].expand(len(beams), -1), prefixes)[:, -1].float().log_softmax(-1)
            lprobs[:, 0] = lprobs[:, BOS] = -float("inf")
            if step == max_len - 1:
                lprobs[:, [t for t in range(lprobs.shape[1]) if t != EOS]] = -float("inf")
            cands = sorted(
                ((score + float(lprobs[j, t]), j, t) for j, (score, _) in enumerate(beams) for t in range(40)),
                reverse=True,
            )[: 2 * beam]
            kept = []
            for rank, (score, j, t) in enumerate(cands):
                if t == EOS:
                    if rank < beam and len(finished) < beam and score > -float("inf"):
                        finished.append((score / (step + 1) ** lenpen, beams[j][1][1:]))
                elif len(kept) < beam:
                    kept.append((score, beams[j][1] + [t]))
            if len(finished) >= beam:
                break
            beams = kept
        out.append(max(finished, key=lambda f: f[0])[1])
    return out


@pytest.mark.parametrize("beam", [2, 4])
def test_beam_search_equals_a_plain_search_that_recomputes_every_prefix(beam):
    """The batched search (the key/value caches reordered, the encoder's keys held once per sentence, sentences
    leaving the batch as they finish) finds what the plain search above finds, on sentences of several lengths."""
    model = _model(decoder_layers=3)
    with torch.no_grad():
        model.decoder.embed.table.weight[EOS] *= 2  # </s> likelier: sentences finish at different steps
    g = torch.Generator().manual_seed(5)
    src = torch.randint(4, 40, (6, 9), generator=g)
    for i, n in enumerate([9, 4, 7, 2, 9, 5]):
        src[i, n:] = 0
    found = beam_search(model, src, BOS, EOS, beam=beam, lenpen=0.6, max_len_a=0, max_len_b=10)
    assert found == _reference_beam_search(model, src, beam, 0.6, 10)
    assert len({len(h) for h in found}) > 1  # the sentences really ended at different steps


def test_beam_one_equals_greedy():
    model = _model()
    g = torch.Generator().manual_seed(2)
    src = torch.randint(4, 40, (5, 8), generator=g)
    src[2, 5:] = 0
    greedy = greedy_decode(model, src, BOS, EOS, max_len_a=0, max_len_b=12)
    beam1 = beam_search(model, src, BOS, EOS, beam=1, lenpen=0.6, max_len_a=0, max_len_b=12)
    assert beam1 == greedy
    assert any(len(h) > 0 for h in greedy)


def test_wide_beam_equals_exhaustive_search():
    """With a beam wider than the hypothesis space, beam search must return the best normalised score."""
    vocab, max_len, lenpen = 7, 3, 0.6
    model = _model(vocab=vocab)
    src = torch.tensor([[4, 5, 6, 3], [6, 6, 3, 0]])
    allowed = [t for t in range(vocab) if t not in (0, BOS, EOS)]
    found = beam_search(model, src, BOS, EOS, beam=30, lenpen=lenpen, max_len_a=0, max_len_b=max_len)
    for i in range(src.shape[0]):
        best, best_hyp = -float("inf"), None
        for n in range(max_len):
            for body in itertools.product(allowed, repeat=n):
                seq = torch.tensor([[BOS, *body, EOS]])
                with torch.no_grad():
                    lp = torch.log_softmax(model(src[i : i + 1], seq[:, :-1]).float(), -1)[0]
                score = sum(lp[t, seq[0, t + 1]].item() for t in range(n + 1)) / (n + 1) ** lenpen
                if score > best:
                    best, best_hyp = score, list(body)
        assert found[i] == best_hyp


def test_bf16_weights_decode_close_to_fp32_with_exact_coefficients():
    """inference.prepare: bf16 parameters, float32 residual coefficients equal to the fp32 model's, logits within
    bf16's error of fp32's (but not equal: the cast happened)."""
    from megabranch.inference import prepare
    from megabranch.residual import ResidualCoefficients

    fp32 = _model("deepnorm")
    bf16 = prepare(_model("deepnorm"), torch.device("cpu"), "bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    coeffs = [(m.shortcut_scale, m.branch_scale) for m in bf16.modules() if isinstance(m, ResidualCoefficients)]
    ref = [(m.shortcut_scale, m.branch_scale) for m in fp32.modules() if isinstance(m, ResidualCoefficients)]
    assert all(r.dtype == s.dtype == torch.float32 for r, s in coeffs)
    assert all(torch.equal(a, b) for pair, want in zip(coeffs, ref) for a, b in zip(pair, want))
    assert float(ref[0][0]) != 1.0  # DeepNorm's alpha: would be rounded by a bf16 cast
    src = torch.randint(4, 40, (3, 7), generator=torch.Generator().manual_seed(3))
    prev = torch.cat([torch.full((3, 1), BOS), src[:, :-1]], 1)
    with torch.no_grad():
        a, b = fp32(src, prev), bf16(src, prev).float()
    err = float((a - b).abs().max() / a.abs().max())
    assert 0 < err < 5e-2, err
    assert len(greedy_decode(bf16, src, BOS, EOS, max_len_a=0, max_len_b=5)) == 3


def test_sentence_batches_respect_the_token_budget():
    import numpy as np

    from megabranch.data import sentence_batches

    sizes = np.random.default_rng(0).integers(1, 12, 50)
    sizes[7] = 30  # longer than the budget: decoded alone
    batches = sentence_batches(sizes, 45, max_tokens=20, max_sentences=3)
    assert sorted(i for b in batches for i in b) == list(range(45))
    for b in batches:
        assert len(b) <= 3 and (len(b) * max(sizes[i] for i in b) <= 20 or len(b) == 1)
    flat = [sizes[i] for b in batches for i in b]
    assert flat == sorted(flat)
    assert [len(b) for b in sentence_batches(sizes, 10, 0, 4)] == [4, 4, 2]
