"""megabranch weights -> a fairseq 0.12 `transformer` checkpoint directory (checkpoint.pt, dict.<lang>.txt, the
sentencepiece model), loaded by `TransformerModel.from_pretrained` and `fairseq-generate --bpe sentencepiece`.

fairseq's dictionary numbers <s> 0, <pad> 1, </s> 2, <unk> 3, then dict.txt's symbols: dict.txt lists the
sentencepiece pieces from id 4 on, so a piece keeps its id and only the four specials move. megabranch's decoding
never emits <pad> or <s>; fairseq's masks only its <pad> column, so megabranch's <s> goes there and megabranch's
<pad> to fairseq's <s> (a column fairseq never feeds and a trained model never predicts). fairseq starts
decoding from </s> where megabranch starts from <s>: the decoder's input table is its own (row </s> holds
megabranch's <s> row), apart from the source table and the output projection, which keep megabranch's rows (a
tied table is written three times). Positions are a learned table (`--encoder-learned-pos`, fairseq's rows from
pad + 1 = 2 on) holding megabranch's rows from model.position_offset on, sinusoidal or learned, so any offset
carries over. pre_ln is fairseq's `--encoder-normalize-before` form; fairseq's layer norms have eps 1e-5.
The checkpoint's `cfg` is fairseq's own (its argument parser, converted by fairseq to its config), stored as plain
containers, so torch.load(weights_only=True) reads it.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import types

import torch

from ..errors import UserError
from ..vocab import BOS, EOS, PAD, UNK
from .serving import Export, fairseq_layers

FAIRSEQ_EPS = 1e-5
# megabranch's special ids -> fairseq's (fairseq's <pad> column is the one its search masks: megabranch's <s>)
SPECIALS = {PAD: 0, BOS: 1, EOS: 2, UNK: 3}
FAIRSEQ_PAD = 1
CHECKPOINT = "checkpoint.pt"
SPM = "sentencepiece.bpe.model"


def fairseq():
    try:
        import fairseq as fs
        from fairseq import options
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
        from fairseq.models.transformer import TransformerModel
        from omegaconf import OmegaConf
    except ImportError:
        raise UserError(
            "--to fairseq needs fairseq 0.12: pip install --no-deps fairseq-fixed==0.12.3.1 (see "
            "requirements-peers.txt)"
        ) from None
    return types.SimpleNamespace(
        fairseq=fs,
        options=options,
        to_cfg=convert_namespace_to_omegaconf,
        TransformerModel=TransformerModel,
        OmegaConf=OmegaConf,
    )


def to_fairseq(vocab: int) -> torch.Tensor:
    """megabranch id -> fairseq index, for every id."""
    return torch.tensor([SPECIALS.get(i, i) for i in range(vocab)])


def _rows(table: torch.Tensor) -> torch.Tensor:
    """A table (vocab, d) in fairseq's row order."""
    out = torch.empty_like(table)
    out[to_fairseq(table.shape[0])] = table
    return out


def languages(ex: Export) -> tuple[str, str]:
    names = list(ex.directions)
    return tuple(names[0].split("-", 1)) if len(names) == 1 else ("src", "tgt")


def refuse(ex: Export) -> None:
    mc = ex.mc
    if ex.scale not in (1.0, mc.d_model**0.5):
        raise UserError(f"model.embed_scale={mc.embed_scale:g}: fairseq scales embeddings by sqrt(d_model) or 1 only")
    if mc.activation not in ("relu", "gelu"):
        raise UserError(f"model.activation={mc.activation}: fairseq's transformer has relu and gelu here")


def _arguments(ex: Export, src: str, tgt: str) -> list[str]:
    mc = ex.mc
    args = [
        "--task",
        "translation",
        "--arch",
        "transformer",
        "--source-lang",
        src,
        "--target-lang",
        tgt,
        "--encoder-embed-dim",
        mc.d_model,
        "--decoder-embed-dim",
        mc.d_model,
        "--encoder-ffn-embed-dim",
        mc.ffn_dim,
        "--decoder-ffn-embed-dim",
        mc.ffn_dim,
        "--encoder-layers",
        mc.encoder_layers,
        "--decoder-layers",
        mc.decoder_layers,
        "--encoder-attention-heads",
        mc.n_heads,
        "--decoder-attention-heads",
        mc.n_heads,
        "--activation-fn",
        mc.activation,
        "--dropout",
        0.0,
        "--attention-dropout",
        0.0,
        "--activation-dropout",
        0.0,
        "--encoder-learned-pos",
        "--decoder-learned-pos",
        "--max-source-positions",
        mc.max_positions,
        "--max-target-positions",
        mc.max_positions,
        "--bpe",
        "sentencepiece",
        "--sentencepiece-model",
        SPM,
    ]
    if mc.residual == "pre_ln":
        args += ["--encoder-normalize-before", "--decoder-normalize-before"]
    if ex.scale == 1.0:
        args += ["--no-scale-embedding"]
    return [str(a) for a in args]


def _state(ex: Export) -> dict:
    """The folded weights under fairseq's transformer names, tables in fairseq's row order."""
    p, mc = ex.folded.params, ex.mc
    src_table = p["encoder.embed.table.weight"]
    tgt_table = p.get("decoder.embed.table.weight", src_table)
    output = tgt_table if mc.share_decoder_input_output_embed else p["decoder.output.weight"]
    dec_in = _rows(tgt_table)
    dec_in[SPECIALS[EOS]] = tgt_table[BOS]  # fairseq feeds </s> where megabranch feeds <s>
    out = {
        "encoder.embed_tokens.weight": _rows(src_table),
        "decoder.embed_tokens.weight": dec_in,
        "decoder.output_projection.weight": _rows(output),
    }
    for stack in ("encoder", "decoder"):
        table = torch.zeros(mc.max_positions + FAIRSEQ_PAD + 1, mc.d_model)
        table[FAIRSEQ_PAD + 1 :] = ex.positions(stack)
        out[f"{stack}.embed_positions.weight"] = table
        out[f"{stack}.version"] = torch.tensor([3.0])
    out.update(fairseq_layers(p))
    for stack in ("encoder", "decoder"):
        for k in ("weight", "bias"):
            if f"{stack}.final_norm.{k}" in p:
                out[f"{stack}.layer_norm.{k}"] = p[f"{stack}.final_norm.{k}"]
    return {k: v.float().contiguous() for k, v in out.items()}


def write(ex: Export, out: str) -> None:
    """The fairseq directory `out` (new) of the export."""
    fs = fairseq()
    refuse(ex)
    src, tgt = languages(ex)
    os.makedirs(out)
    for lang, side in ((src, "source"), (tgt, "target")):
        pieces = ex.pieces(side)[len(SPECIALS) :]
        with open(os.path.join(out, f"dict.{lang}.txt"), "w", encoding="utf-8") as fh:
            fh.writelines(f"{piece} 1\n" for piece in pieces)
    spm = ex.spm_files()
    if spm["source"] != spm["target"]:
        raise UserError(
            "the model has separate source and target sentencepiece models: fairseq's --bpe "
            "sentencepiece takes one; export a joint-vocabulary model"
        )
    shutil.copyfile(spm["source"], os.path.join(out, SPM))
    parser = fs.options.get_training_parser()
    # the data directory is the checkpoint's own ("."): from_pretrained and fairseq-generate are given it
    args = fs.options.parse_args_and_arch(parser, ["."] + _arguments(ex, src, tgt))
    cfg = _plain(fs.OmegaConf.to_container(fs.to_cfg(args), resolve=True))
    state = {
        "cfg": cfg,
        "model": _state(ex),
        "args": None,
        "extra_state": {"train_iterator": {"epoch": 1}},
        "optimizer_history": [
            {
                "criterion_name": "CrossEntropyCriterion",
                "optimizer_name": "megabranch",
                "lr_scheduler_state": {},
                "num_updates": ex.step,
            }
        ],
        "last_optimizer_state": None,
    }
    torch.save(state, os.path.join(out, CHECKPOINT))


def _plain(value):
    """fairseq's config with its argparse.Namespace parts (a legacy architecture's `model`) as dicts."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load(path: str):
    """fairseq's hub interface over the directory, as a user loads it (its model in eval mode on the CPU)."""
    fs = fairseq()
    logging.getLogger("fairseq").setLevel(logging.WARNING)  # it logs its whole config at INFO
    return fs.TransformerModel.from_pretrained(
        path,
        checkpoint_file=CHECKPOINT,
        data_name_or_path=path,
        bpe="sentencepiece",
        sentencepiece_model=os.path.join(path, SPM),
    ).eval()


@torch.no_grad()
def logits(hub, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The real forward on megabranch ids (mapped to fairseq's, decoder input <s> -> </s>), logit columns back in
    megabranch's order."""
    m = to_fairseq(max(int(src.max()), int(prev.max()), len(SPECIALS)) + 1)
    fsrc, fprev = m[src], m[prev]
    fsrc[src.eq(PAD)] = fprev[prev.eq(PAD)] = FAIRSEQ_PAD
    fprev[prev.eq(BOS)] = SPECIALS[EOS]
    model = hub.models[0]
    out, _ = model(fsrc, fsrc.ne(FAIRSEQ_PAD).sum(1), fprev)
    return out.float().index_select(-1, to_fairseq(out.shape[-1]))


@torch.no_grad()
def decode(hub, src: torch.Tensor, beam: int, lenpen: float, max_len: int) -> list[list[int]]:
    """fairseq's SequenceGenerator on a padded batch of megabranch ids -> megabranch token lists without </s>.
    max_len counts </s>, as megabranch's decoding.max_length does (fairseq's max_len_b does not)."""
    vocab = hub.models[0].decoder.output_projection.weight.shape[0]
    m = to_fairseq(vocab)
    back = torch.empty_like(m)
    back[m] = torch.arange(vocab)
    rows = [m[r[r.ne(PAD)]] for r in src]
    # what hub.generate does, as one batch: the generation config with these settings, fairseq's own dataset
    # collater (left-padded sources, sorted by length) and its SequenceGenerator. Not hub.generate itself: its
    # batching (data_utils.batch_by_size) needs fairseq's compiled Cython helpers, which the install skips
    # (requirements-peers.txt); the search is the same.
    from omegaconf import open_dict

    args = copy.deepcopy(hub.cfg.generation)
    with open_dict(args):
        args.beam, args.lenpen, args.max_len_a, args.max_len_b, args.min_len = beam, lenpen, 0, max_len - 1, 0
    generator = hub.task.build_generator(hub.models, args)
    data = hub.task.build_dataset_for_inference(rows, torch.tensor([len(r) for r in rows]))
    batch = data.collater([data[i] for i in range(len(rows))])
    hyps = hub.task.inference_step(generator, hub.models, batch)
    out: list[list[int]] = [[] for _ in rows]
    for i, h in zip(batch["id"].tolist(), hyps):
        toks = back[h[0]["tokens"]].tolist()
        out[i] = toks[:-1] if toks and toks[-1] == EOS else toks
    return out
