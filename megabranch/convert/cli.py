"""`megabranch-convert`: move checkpoints between parallel layouts and formats, and average them.

    megabranch-convert SRC OUT --tp T --pp P [--vpp V] [--layout STR]     reshard (optimizer state too)
    megabranch-convert SRC model.safetensors                              consolidate for inference (+ model.json)
    megabranch-convert model.safetensors OUT --tp T --pp P                split back into a step directory
    megabranch-convert SRC OUT --to deepspeed [--tp T]                    DeepSpeed pipeline layer files (per tp rank)
    megabranch-convert DS_DIR OUT --from deepspeed --config CFG           and back (any tp)
    megabranch-convert ts.pt OUT --from torchscale --config CFG           a torchscale encoder-decoder state dict
    megabranch-convert ckpt.pt OUT --from fairseq --fairseq-dict dict.txt --spm spm.model     fairseq transformer
    megabranch-convert SRC ts.pt --to torchscale                          torchscale EncoderDecoder names
    megabranch-convert SRC OUT --to ctranslate2 [--quantization int8]     serve it: CTranslate2, Hugging Face
    megabranch-convert SRC OUT --to hf                                    MarianMT, or fairseq; every scheme is
    megabranch-convert SRC OUT --to fairseq                               folded into a plain Transformer
    megabranch-convert average SAVE_DIR --last K --out OUT                fairseq-style checkpoint averaging

SRC for megabranch checkpoints: a save directory (its latest), a step_<N> directory or a latest/best pointer.
Every conversion checks itself: the written result is read back from disk, built into the single-process model
and run on a fixed batch next to the source; the largest relative difference of the logits (fp32) must be under
1e-6, and the tool prints it. Imports from (and the export to) torchscale and fairseq also run that package's own
model on the same batch, some rows padded, and compare the logits at every position that is not padding (under
1e-5); what megabranch cannot represent is refused in one line naming the field. The serving exports
(ctranslate2, hf, fairseq) run the target package on the written files next to megabranch: logits within 1e-4
relative, greedy and beam-4 hypotheses identical; OUT appears only when the check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .. import checkpoint
from ..backends import deepspeed as ds
from ..config import Config, load_config
from ..errors import UserError, cli_main
from .check import check
from .interop import export_torchscale_file, load_fairseq, load_torchscale
from .layouts import write_layout
from .safetensors_io import load_safetensors, save_safetensors
from .serving import prepare
from .targets import TARGETS, check_quantization, export


def _detect(path: str) -> str:
    if path.endswith(".safetensors"):
        return "safetensors"
    if os.path.isdir(path):
        if (
            os.path.isfile(os.path.join(path, checkpoint.META))
            or os.path.isfile(os.path.join(path, "best"))
            or checkpoint.step_dirs(path)
        ):
            return "megabranch"
        if any(f.startswith("layer_") for f in os.listdir(path)) or os.path.isfile(os.path.join(path, "latest")):
            return "deepspeed"
    if os.path.isfile(path) and os.path.basename(path) in ("latest", "best"):
        return "megabranch"
    if path.endswith((".pt", ".pth")):
        return "torchscale"
    return "megabranch"


def _load_source(args) -> tuple[Config, dict, dict, dict | None]:
    """-> (config, meta-like dict, full parameters, full canonical optimizer state or None)."""
    kind = args.source_format or _detect(args.src)
    if kind == "megabranch":
        step_dir = checkpoint.resolve(args.src, "latest")
        meta = checkpoint.read_meta(step_dir)
        model, opt = checkpoint.consolidate(step_dir, meta, optimizer=not args.no_optimizer)
        cfg = Config.from_dict(meta["config"], where=step_dir)
        data = checkpoint.StepReader(step_dir, meta).shard(0, 0).get("rank", "data")
        meta = dict(meta, _data=data)
        print(
            f"read {step_dir}: step {meta['step']}, layout tp {meta['layout']['tp']} pp {meta['layout']['pp']} "
            f"vpp {meta['layout']['vpp']}, {len(model)} tensors{', optimizer state' if opt else ''}"
        )
        return cfg, meta, model, opt
    if kind == "safetensors":
        tensors, st_meta = load_safetensors(args.src)
        info_path = _sidecar(args.src)
        if not os.path.isfile(info_path):
            raise UserError(f"{info_path} not found: the config JSON written next to {args.src}")
        with open(info_path) as fh:
            info = json.load(fh)
        cfg = Config.from_dict(info["config"], where=info_path)
        print(f"read {args.src}: {len(tensors)} tensors")
        return cfg, dict(info, _data=None), tensors, None
    cfg = _user_config(args)
    if kind == "deepspeed":
        state = ds.import_deepspeed(args.src, cfg)
        if cfg.model.share_all_embeddings:
            state.pop("decoder.embed.table.weight", None)
        vocab = state["encoder.embed.table.weight"].shape[0]
        tgt = state["decoder.embed.table.weight"].shape[0] if "decoder.embed.table.weight" in state else vocab
        print(f"read DeepSpeed pipeline checkpoint {args.src}: {len(state)} tensors")
        return cfg, _meta_for(cfg, vocab, tgt), state, None
    if kind == "torchscale":
        cfg, params, against = load_torchscale(args.src, cfg, _source_args(args.source_args))
    elif kind == "fairseq":
        if not args.fairseq_dict or not args.spm:
            raise UserError(
                "--from fairseq needs --fairseq-dict (its dict.txt) and --spm (the sentencepiece model to map it onto)"
            )
        cfg, params, against = load_fairseq(args.src, cfg, args.fairseq_dict, args.spm, args.fairseq_tgt_dict)
    else:
        raise UserError(f"--from {kind}: unknown source format")
    vocab = params["encoder.embed.table.weight"].shape[0]
    tgt = params.get("decoder.embed.table.weight", params["encoder.embed.table.weight"]).shape[0]
    return cfg, dict(_meta_for(cfg, vocab, tgt), _against=against), params, None


def _source_args(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(open(text).read() if os.path.isfile(text) else text)
    except (OSError, ValueError) as e:
        raise UserError(
            f"--source-args {text[:80]}: not JSON (or a JSON file): {str(e).splitlines()[0][:120]}"
        ) from None
    if not isinstance(value, dict):
        raise UserError("--source-args: must be a JSON object of the source's EncoderDecoderConfig arguments")
    return value


def _meta_for(cfg: Config, vocab: int, tgt: int) -> dict:
    return {
        "config": cfg.to_dict(),
        "vocab_size": vocab,
        "tgt_vocab_size": tgt,
        "step": 0,
        "vocab_sha256": None,
        "_data": None,
    }


def _user_config(args) -> Config:
    if args.source_format == "fairseq" and not args.config and not args.set:
        return Config()  # its own arguments say what the model is
    if not args.config and not args.set:
        raise UserError(
            f"--from {args.source_format or _detect(args.src)} needs --config CFG (the model's "
            "megabranch config) or --set model.key=value overrides"
        )
    return load_config(args.config, args.set)


def convert(args) -> None:
    cfg, meta, model, opt = _load_source(args)
    mc = cfg.model
    vocab, tgt = meta["vocab_size"], meta.get("tgt_vocab_size")
    step = int(meta.get("step", 0))
    to = _destination_format(args)
    clean = {k: v for k, v in meta.items() if not k.startswith("_")}
    against = meta.get("_against")
    if to == "safetensors":
        save_safetensors(model, args.out, {"format": "megabranch", "step": step})
        info = {k: clean.get(k) for k in ("config", "vocab_size", "tgt_vocab_size", "vocab_sha256", "step")}
        info_path = _sidecar(args.out)
        checkpoint.atomic_write_bytes((json.dumps(info, indent=1) + "\n").encode(), info_path)
        back, _ = load_safetensors(args.out)
        check("consolidate -> safetensors", mc, vocab, tgt, model, back, step)
        if against is not None:
            against("import -> safetensors, read back", back)
        print(f"wrote {args.out} and {info_path}")
    elif to == "megabranch":
        out = write_layout(args.out, cfg, clean, model, opt, args.tp, args.pp, args.vpp, args.layout, meta.get("_data"))
        back, back_opt = checkpoint.consolidate(out)
        check(f"reshard -> tp {args.tp} pp {args.pp} vpp {args.vpp}", mc, vocab, tgt, model, back, step)
        if against is not None:
            against(f"import -> tp {args.tp} pp {args.pp}, read back", back)
        if opt is not None:
            same = all(torch.equal(back_opt[k][n], opt[k][n]) for k in ("exp_avg", "exp_avg_sq") for n in opt[k])
            print(f"check (optimizer state): {'identical after resharding: OK' if same else 'DIFFERS: FAILED'}")
            if not same:
                raise UserError("conversion check failed: optimizer state changed")
        print(
            f"wrote {out} (resume with --set parallel.tp={args.tp} --set parallel.pp={args.pp} "
            f"--set parallel.vpp={args.vpp} --resume {out})"
        )
    elif to == "deepspeed":
        ds.export_deepspeed(model, cfg, args.out, vocab=vocab, tgt_vocab=tgt, tp=args.tp)
        back = ds.import_deepspeed(args.out, cfg, vocab=vocab, tgt_vocab=tgt)
        check(f"export -> DeepSpeed pipeline layer files, tp {args.tp}", mc, vocab, tgt, model, back, step)
        print(f"wrote {args.out} (for --backend deepspeed with parallel.tp={args.tp}, any parallel.pp)")
    elif to == "torchscale":
        export_torchscale_file(model, cfg, args.out, step)
        print(f"wrote {args.out}")
    elif to in TARGETS:
        export(to, prepare(cfg, clean, model, args.data_dir), args.out, args.quantization)
    else:
        raise UserError(f"--to {to}: must be {', '.join(DESTINATIONS)}")


def average_command(args) -> None:
    if args.last < 1:
        raise UserError(f"--last {args.last}: must be >= 1")
    steps = checkpoint.step_dirs(args.save_dir)
    if not steps:
        raise UserError(f"no step_<N> checkpoints in {args.save_dir}")
    if len(steps) < args.last:
        raise UserError(
            f"--last {args.last}: {args.save_dir} holds only {len(steps)} checkpoints "
            f"({', '.join(os.path.basename(p) for _, p in steps)}); raise log.keep_last when training"
        )
    chosen = [p for _, p in steps[-args.last :]]
    avg, meta = checkpoint.average(chosen)
    cfg = Config.from_dict(meta["config"], where=chosen[-1])
    clean = {k: v for k, v in meta.items() if k not in ("files", "format", "versions")}
    clean["averaged"] = [os.path.basename(p) for p in chosen]
    out = write_layout(args.out, cfg, clean, avg, None, 1, 1, 1)
    # the check: the written file against an independent mean of the sources' logits-producing weights
    back, _ = checkpoint.consolidate(out, optimizer=False)
    check(
        f"average of {len(chosen)}",
        cfg.model,
        meta["vocab_size"],
        meta.get("tgt_vocab_size"),
        avg,
        back,
        int(meta["step"]),
    )
    print(f"averaged {', '.join(clean['averaged'])} -> {out}")


DESTINATIONS = ("megabranch", "safetensors", "deepspeed", "torchscale", *TARGETS)


def _destination_format(args) -> str:
    return args.to or ("safetensors" if args.out.endswith(".safetensors") else "megabranch")


def _sidecar(safetensors_path: str) -> str:
    """The config JSON that goes with a .safetensors file: model.safetensors -> model.json."""
    base = safetensors_path[: -len(".safetensors")] if safetensors_path.endswith(".safetensors") else safetensors_path
    return base + ".json"


def _refuse_existing(out: str) -> None:
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise UserError(f"{out} already exists; choose a new destination (nothing is overwritten)")


@cli_main(prog="megabranch-convert")
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["average"]:
        ap = argparse.ArgumentParser(
            prog="megabranch-convert average",
            description="Average the parameters of the last K checkpoints (fairseq style).",
        )
        ap.add_argument("save_dir")
        ap.add_argument("--last", type=int, required=True, help="how many of the newest step_<N> directories")
        ap.add_argument("--out", required=True, help="the step directory to write (a (1, 1) layout, no optimizer)")
        args = ap.parse_args(argv[1:])
        _refuse_existing(args.out)
        average_command(args)
        return 0
    ap = argparse.ArgumentParser(
        prog="megabranch-convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    ap.add_argument("src", help="source checkpoint (save dir, step dir, pointer, .safetensors, DeepSpeed dir, .pt)")
    ap.add_argument("out", help="destination (a step directory, a .safetensors file, or a DeepSpeed folder)")
    ap.add_argument(
        "--from",
        dest="source_format",
        choices=("megabranch", "safetensors", "deepspeed", "torchscale", "fairseq"),
        help="source format (default: guessed from SRC)",
    )
    ap.add_argument(
        "--to",
        help=f"destination format: {', '.join(DESTINATIONS)} (default: safetensors for *.safetensors, else megabranch)",
    )
    ap.add_argument(
        "--quantization",
        help="--to ctranslate2: ctranslate2's weight type (int8, int8_float32, "
        "float16, bfloat16, ...; default: float32)",
    )
    ap.add_argument(
        "--data-dir",
        help="--to ctranslate2/hf/fairseq: the preprocessed directory whose sentencepiece "
        "model(s) go with the export (default: the one the model was trained on)",
    )
    ap.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel size of the step directory, or with --to deepspeed of the DeepSpeed layer files",
    )
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=1)
    ap.add_argument("--layout", default="", help="explicit stage layout (parallel.layout syntax)")
    ap.add_argument("--config", help="--from deepspeed/torchscale: the model's megabranch config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--no-optimizer", action="store_true", help="drop the optimizer state (smaller, not resumable)")
    ap.add_argument(
        "--source-args",
        help="--from torchscale: the EncoderDecoderConfig arguments the source was "
        "built with (JSON or a JSON file), e.g. '{\"no_scale_embedding\": false}'",
    )
    ap.add_argument("--fairseq-dict", help="--from fairseq: the (joint or source) dict.txt it was trained with")
    ap.add_argument("--fairseq-tgt-dict", help="--from fairseq: the target dict.txt, if not joint")
    ap.add_argument("--spm", help="--from fairseq: the sentencepiece model whose ids megabranch will use")
    args = ap.parse_args(argv)
    for k in ("tp", "pp", "vpp"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k} {getattr(args, k)}: must be >= 1")
    to = _destination_format(args)
    if to not in DESTINATIONS:
        raise UserError(f"--to {to}: unknown destination; valid: {', '.join(DESTINATIONS)}")
    check_quantization(to, args.quantization)
    if to in TARGETS:
        args.no_optimizer = True  # a served model has no use for it
    _refuse_existing(args.out)
    if to == "safetensors":
        _refuse_existing(_sidecar(args.out))  # the config JSON written next to it
    convert(args)
    return 0
