"""megabranch weights -> a CTranslate2 model directory, through ctranslate2's own model specs and converter.

The folded plain Transformer (folding.py) fills a `TransformerSpec`: post_ln and the folded schemes as its
post-norm form, pre_ln as its pre-norm form (with the final norms); the fused q/k/v (self-attention) and k/v
(cross-attention) projections as ctranslate2's own converters build them (`utils.fuse_linear`); the position
table is written into the spec (megabranch's rows from model.position_offset on, sinusoidal or learned), so
any offset carries over; the embedding scale is the spec's `scale_embeddings`; a tied table is aliased by
ctranslate2's writer. Sources get </s> appended (`add_source_eos`) and decoding starts from <s>, as megabranch's
data does. CTranslate2 holds one layer-norm eps for the whole model (config.json `layer_norm_epsilon`): a
folded DeepNorm model has two, and the decoder's is written (folding.Folded.one_eps). `--quantization` is
ctranslate2's own.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..vocab import PAD
from .folding import Folded

PAD_PIECE = "<blank>"  # what ctranslate2's own converters name the padding token
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


def ctranslate2():
    try:
        import ctranslate2 as ct2
        from ctranslate2.converters import utils
        from ctranslate2.converters.converter import Converter
        from ctranslate2.specs import common_spec, transformer_spec
    except ImportError:
        raise UserError(
            "--to ctranslate2 needs ctranslate2: pip install --no-deps ctranslate2==4.8.5 (see requirements-peers.txt)"
        ) from None
    return ct2, utils, Converter, common_spec, transformer_spec


def _np(t) -> np.ndarray:
    """A copy: ctranslate2's int8 quantization scales the spec's arrays in place."""
    return t.detach().float().numpy().copy()


def build_spec(folded: Folded, mc, positions: dict, scale: float, source_vocab: list[str], target_vocab: list[str]):
    """The TransformerSpec of the folded weights (`positions`: stack -> its (max_positions, d) table)."""
    _, utils, _, common_spec, transformer_spec = ctranslate2()
    p = folded.params
    pre = mc.residual == "pre_ln"
    act = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU}[mc.activation]
    spec = transformer_spec.TransformerSpec.from_config(
        (mc.encoder_layers, mc.decoder_layers), mc.n_heads, pre_norm=pre, activation=act
    )

    def linear(ls, name):
        ls.weight = _np(p[name + ".weight"])
        ls.bias = _np(p[name + ".bias"])

    def fused(ls, names):
        parts = []
        for n in names:
            part = common_spec.LinearSpec()
            linear(part, n)
            parts.append(part)
        utils.fuse_linear(ls, parts)

    def norm(ns, name):
        ns.gamma, ns.beta = _np(p[name + ".weight"]), _np(p[name + ".bias"])

    def attention(aspec, prefix, cross):
        proj = [f"{prefix}.block.{x}_proj" for x in "qkv"]
        if cross:
            linear(aspec.linear[0], proj[0])
            fused(aspec.linear[1], proj[1:])
        else:
            fused(aspec.linear[0], proj)
        linear(aspec.linear[-1], f"{prefix}.block.out_proj")
        norm(aspec.layer_norm, f"{prefix}.norm")

    def ffn(fspec, prefix):
        linear(fspec.linear_0, f"{prefix}.block.fc1")
        linear(fspec.linear_1, f"{prefix}.block.fc2")
        norm(fspec.layer_norm, f"{prefix}.norm")

    src_table = p["encoder.embed.table.weight"]
    tgt_table = p.get("decoder.embed.table.weight", src_table)
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = _np(src_table)
    dec.embeddings.weight = _np(tgt_table)
    for stack in (enc, dec):
        stack.scale_embeddings = float(scale)
    enc.position_encodings.encodings = _np(positions["encoder"])
    dec.position_encodings.encodings = _np(positions["decoder"])
    for i, layer in enumerate(enc.layer):
        attention(layer.self_attention, f"encoder.layers.{i}.self_attn", cross=False)
        ffn(layer.ffn, f"encoder.layers.{i}.ffn")
    for i, layer in enumerate(dec.layer):
        attention(layer.self_attention, f"decoder.layers.{i}.self_attn", cross=False)
        attention(layer.attention, f"decoder.layers.{i}.cross_attn", cross=True)
        ffn(layer.ffn, f"decoder.layers.{i}.ffn")
    dec.projection.weight = _np(tgt_table if mc.share_decoder_input_output_embed else p["decoder.output.weight"])
    if pre:
        norm(enc.layer_norm, "encoder.final_norm")
        norm(dec.layer_norm, "decoder.final_norm")
    spec.register_source_vocabulary(source_vocab)
    spec.register_target_vocabulary(target_vocab)
    cfg = spec.config
    cfg.unk_token, cfg.bos_token, cfg.eos_token = "<unk>", "<s>", "</s>"
    cfg.decoder_start_token = "<s>"
    cfg.add_source_eos = True
    cfg.layer_norm_epsilon = folded.one_eps()
    return spec


def write(spec, out: str, quantization: str | None, files: dict[str, str]) -> None:
    """ctranslate2's converter writes `spec` (quantized as asked) into the new directory `out`, with `files`
    (name in the directory -> path) beside it."""
    _, _, Converter, _, _ = ctranslate2()

    class _Spec(Converter):
        def _load(self):
            return spec

    for name, path in files.items():
        spec.register_file(path, name)
    _Spec().convert(out, quantization=quantization)


def translator(path: str, threads: int = 1, compute_type: str = "default"):
    ct2, *_ = ctranslate2()
    return ct2.Translator(path, device="cpu", inter_threads=1, intra_threads=threads, compute_type=compute_type)


def _pieces(ids, pieces: list[str]) -> list[str]:
    return [pieces[int(i)] for i in ids]


def logits(tr, pieces: tuple[list[str], list[str]], src, prev):
    """ctranslate2's own decoder forced along `prev` (after its <s>): the logits of every step, (B, T, V) in
    megabranch's ids (padding rows left zero)."""
    src_p, tgt_p = pieces
    sources = [_pieces(row[row.ne(PAD)][:-1], src_p) for row in src]  # ctranslate2 appends </s> itself
    prefixes = [_pieces(row[row.ne(PAD)][1:], tgt_p) for row in prev]
    res = tr.translate_batch(
        sources,
        target_prefix=prefixes,
        beam_size=1,
        min_decoding_length=0,
        max_decoding_length=prev.shape[1],
        return_logits_vocab=True,
    )
    out = torch.zeros(prev.shape[0], prev.shape[1], len(tgt_p))
    for i, r in enumerate(res):
        steps = torch.tensor(np.asarray([np.asarray(s) for s in r.logits[0]]))
        n = int(prev[i].ne(PAD).sum())
        out[i, :n] = steps[:n]
    return out


def decode_pieces(tr, sources: list[list[str]], beam: int, lenpen: float, max_len: int, **kw) -> list[list[str]]:
    """ctranslate2's search as megabranch-generate's: max_len counts the </s> that ends a hypothesis (which
    ctranslate2's max_decoding_length does not). Nothing is suppressed: ctranslate2 masks a suppressed token
    before its softmax, megabranch after its log-softmax (<s> and <pad>), so suppressing would shift every score
    by log(1 - p(<s>) - p(<pad>)); a trained model never ranks those two near the top, and unsuppressed the
    scores are megabranch's."""
    res = tr.translate_batch(
        sources, beam_size=beam, length_penalty=lenpen, max_decoding_length=max_len - 1, min_decoding_length=0, **kw
    )
    return [r.hypotheses[0] for r in res]


def decode(tr, pieces: tuple[list[str], list[str]], src, beam: int, lenpen: float, max_len: int):
    src_p, tgt_p = pieces
    ids = {p: i for i, p in enumerate(tgt_p)}
    sources = [_pieces(row[row.ne(PAD)][:-1], src_p) for row in src]
    return [[ids[p] for p in h] for h in decode_pieces(tr, sources, beam, lenpen, max_len)]
