"""megabranch weights -> a Hugging Face transformers MarianMT directory (config.json, generation_config.json,
model.safetensors, the Marian tokenizer's files), loaded by `MarianMTModel.from_pretrained` and
`MarianTokenizer.from_pretrained`.

MarianMT is a post-norm Transformer with one eps (nn.LayerNorm's default, 1e-5, not configurable): post_ln and
the folded schemes export, pre_ln is refused. Its embedding scale is sqrt(d_model) or 1 (`scale_embedding`).
Marian's own sinusoids differ from megabranch's (fairseq's frequencies, 10000^(-k/(d/2-1)), against Marian's
10000^(-k/(d/2))), so model.safetensors carries megabranch's position table (rows from model.position_offset on,
sinusoidal or learned) as `embed_positions.weight`, which from_pretrained loads in place of its own; transformers'
save_pretrained leaves that table out of what it writes, so a model re-saved by transformers decodes with
Marian's sinusoids: export again from the megabranch checkpoint instead (docs/checkpoints.md).

Vocabulary: a joint sentencepiece model is both source.spm and target.spm, vocab.json maps its pieces to their
ids (pad 0, unk 1, <s> 2, </s> 3); separate models give target_vocab.json too (`separate_vocabs`). The tokenizer
appends </s> to the source as megabranch's data does; decoding starts from <s> (decoder_start_token_id) and
generation_config.json forbids <pad> and <s> and forces </s> at the length limit, as megabranch's beam search.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..errors import UserError
from ..vocab import BOS, EOS, PAD, UNK
from .safetensors_io import save_safetensors
from .serving import Export, fairseq_layers

HF_EPS = 1e-5  # MarianMT's nn.LayerNorm(d_model)


def transformers():
    try:
        import transformers as tf
        from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer
    except ImportError:
        raise UserError(
            "--to hf needs transformers: pip install --no-deps transformers==5.23.0 tokenizers "
            "huggingface-hub (see requirements-peers.txt)"
        ) from None
    return tf, MarianConfig, MarianMTModel, MarianTokenizer, GenerationConfig


def refuse(ex: Export) -> None:
    """What MarianMT cannot hold, in one line naming the field."""
    mc = ex.mc
    if mc.residual == "pre_ln":
        raise UserError(
            "model.residual=pre_ln: MarianMT has the post-norm form only (export pre_ln to ctranslate2 or fairseq)"
        )
    if ex.scale not in (1.0, mc.d_model**0.5):
        raise UserError(f"model.embed_scale={mc.embed_scale:g}: MarianMT scales embeddings by sqrt(d_model) or 1 only")
    if mc.activation not in ("relu", "gelu"):
        raise UserError(f"model.activation={mc.activation}: MarianMT has relu and gelu")


def _state(ex: Export) -> dict:
    """megabranch's folded weights under MarianMTModel's names."""
    p, mc = ex.folded.params, ex.mc
    out = {}
    src_table = p["encoder.embed.table.weight"]
    tgt_table = p.get("decoder.embed.table.weight", src_table)
    if mc.share_all_embeddings:
        out["model.shared.weight"] = src_table
    out["model.encoder.embed_tokens.weight"] = src_table
    out["model.decoder.embed_tokens.weight"] = tgt_table
    out["lm_head.weight"] = tgt_table if mc.share_decoder_input_output_embed else p["decoder.output.weight"]
    out["final_logits_bias"] = torch.zeros(1, ex.tgt_vocab)
    for stack in ("encoder", "decoder"):
        out[f"model.{stack}.embed_positions.weight"] = ex.positions(stack)
    out.update(fairseq_layers(p, "model."))
    return {k: v.float().contiguous() for k, v in out.items()}


def _vocab_json(pieces: list[str]) -> dict:
    return {piece: i for i, piece in enumerate(pieces)}


def write(ex: Export, out: str) -> None:
    """The MarianMT directory `out` (new) of the export."""
    _, MarianConfig, _, MarianTokenizer, GenerationConfig = transformers()
    refuse(ex)
    mc = ex.mc
    os.makedirs(out)
    config = MarianConfig(
        vocab_size=ex.vocab,
        decoder_vocab_size=ex.tgt_vocab,
        max_position_embeddings=mc.max_positions,
        encoder_layers=mc.encoder_layers,
        decoder_layers=mc.decoder_layers,
        encoder_ffn_dim=mc.ffn_dim,
        decoder_ffn_dim=mc.ffn_dim,
        encoder_attention_heads=mc.n_heads,
        decoder_attention_heads=mc.n_heads,
        d_model=mc.d_model,
        activation_function=mc.activation,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=ex.scale != 1.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=EOS,
        share_encoder_decoder_embeddings=mc.share_all_embeddings,
        tie_word_embeddings=mc.share_decoder_input_output_embed,
    )
    config.save_pretrained(out)
    GenerationConfig(
        decoder_start_token_id=BOS,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        forced_eos_token_id=EOS,
        bad_words_ids=[[PAD], [BOS]],
        num_beams=4,
        length_penalty=0.6,
        early_stopping=True,
    ).save_pretrained(out)
    save_safetensors(_state(ex), os.path.join(out, "model.safetensors"), {"format": "pt"})
    spm = ex.spm_files()
    joint = spm["source"] == spm["target"]
    shutil.copyfile(spm["source"], os.path.join(out, "source.spm"))
    shutil.copyfile(spm["target"], os.path.join(out, "target.spm"))
    with open(os.path.join(out, "vocab.json"), "w") as fh:
        json.dump(_vocab_json(ex.pieces("source")), fh, ensure_ascii=False)
    kw = {}
    if not joint:
        with open(os.path.join(out, "target_vocab.json"), "w") as fh:
            json.dump(_vocab_json(ex.pieces("target")), fh, ensure_ascii=False)
        kw = dict(target_vocab_file=os.path.join(out, "target_vocab.json"), separate_vocabs=True)
    tok = MarianTokenizer(
        os.path.join(out, "source.spm"),
        os.path.join(out, "target.spm"),
        os.path.join(out, "vocab.json"),
        unk_token=ex.pieces("source")[UNK],
        eos_token=ex.pieces("source")[EOS],
        pad_token="<pad>",
        model_max_length=mc.max_positions,
        **kw,
    )
    tok.save_pretrained(out)


def load(path: str):
    """-> (MarianMTModel in eval mode, its tokenizer), as a user loads them; weights that did not load are a
    UserError (from_pretrained itself only warns)."""
    tf, _, MarianMTModel, MarianTokenizer, _ = transformers()
    tf.utils.logging.disable_progress_bar()  # stderr stays the one line of an error
    tf.utils.logging.set_verbosity_error()
    model, info = MarianMTModel.from_pretrained(path, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise UserError(f"{path}: MarianMTModel.from_pretrained did not load every weight: {bad}")
    return model.float().eval(), MarianTokenizer.from_pretrained(path)


@torch.no_grad()
def logits(model, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The real forward on megabranch's token ids (padded with PAD: the attention masks say so)."""
    out = model(
        input_ids=src,
        attention_mask=src.ne(PAD).long(),
        decoder_input_ids=prev,
        decoder_attention_mask=prev.ne(PAD).long(),
    )
    return out.logits.float()


@torch.no_grad()
def decode(model, src: torch.Tensor, beam: int, lenpen: float, max_len: int) -> list[list[int]]:
    """transformers' generate (greedy or beam) on a padded batch -> token lists without <s> / </s> / padding.
    max_len counts </s>, as megabranch's decoding.max_length does."""
    search = dict(num_beams=beam, length_penalty=lenpen, early_stopping=True) if beam > 1 else dict(num_beams=1)
    out = model.generate(
        input_ids=src, attention_mask=src.ne(PAD).long(), max_new_tokens=max_len, do_sample=False, **search
    )
    hyps = []
    for row in out.tolist():
        toks = row[1:]
        hyps.append(toks[: toks.index(EOS)] if EOS in toks else [t for t in toks if t != PAD])
    return hyps
