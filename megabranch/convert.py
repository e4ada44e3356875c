"""`megabranch-convert`: move checkpoints between parallel layouts and formats, and average them.

    megabranch-convert SRC OUT --tp T --pp P [--vpp V] [--layout STR]     reshard (optimizer state too)
    megabranch-convert SRC model.safetensors                              consolidate for inference (+ model.json)
    megabranch-convert model.safetensors OUT --tp T --pp P                split back into a step directory
    megabranch-convert SRC OUT --to deepspeed                             DeepSpeed pipeline layer files
    megabranch-convert DS_DIR OUT --from deepspeed --config CFG           and back
    megabranch-convert ts.pt OUT --from torchscale --config CFG           a torchscale encoder-decoder state dict
    megabranch-convert average SAVE_DIR --last K --out OUT                fairseq-style checkpoint averaging

SRC for megabranch checkpoints: a save directory (its latest), a step_<N> directory or a latest/best pointer.
Every conversion checks itself: the written result is read back from disk, built into the single-process model
and run on a fixed batch next to the source; the largest relative difference of the logits (fp32) must be under
1e-6, and the tool prints it. (For a torchscale import, whose source model is not runnable here, the check is that
the mapping read back reproduces every source tensor exactly.)

safetensors: written and read here (8-byte little-endian header length, a JSON header with dtype / shape /
data_offsets per tensor, then the raw little-endian bytes) rather than through the `safetensors` package: the
format is that small, and one more pinned dependency for ~40 lines is not worth it. Files interoperate with the
package (same header fields, the header padded with spaces to 8 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import checkpoint
from .config import Config, ModelConfig
from .errors import UserError, cli_main

TOLERANCE = 1e-6

# --- safetensors ------------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
_ST_BACK = {v: k for k, v in _ST_DTYPES.items()}


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}} if metadata else {}
    blobs, off = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise UserError(f"safetensors: {name} has dtype {t.dtype}, which this writer does not handle")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = len(text).to_bytes(8, "little") + text + b"".join(blobs)
    checkpoint.atomic_write_bytes(data, path)


def load_safetensors(path: str) -> tuple[dict, dict]:
    """-> (tensors, metadata); any malformation is a one-line UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"safetensors file not found: {path}")
    with open(path, "rb") as fh:
        blob = fh.read()
    try:
        n = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 or n > len(blob) - 8:
            raise ValueError("header length past the end of the file")
        header = json.loads(blob[8 : 8 + n])
        meta = header.pop("__metadata__", {}) or {}
        body = memoryview(blob)[8 + n :]
        out = {}
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            dtype = _ST_BACK[info["dtype"]]
            if not 0 <= lo <= hi <= len(body):
                raise ValueError(f"{name}: data offsets {lo}..{hi} outside the {len(body)}-byte body")
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
            item = torch.empty((), dtype=dtype).element_size()
            if hi - lo != numel * item:
                raise ValueError(f"{name}: {hi - lo} bytes for shape {info['shape']} {info['dtype']}")
            t = torch.frombuffer(bytearray(body[lo:hi]), dtype=torch.uint8) if hi > lo else torch.empty(0, dtype=torch.uint8)
            out[name] = t.view(dtype).reshape(info["shape"]).clone()
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid safetensors file: {str(e).splitlines()[0][:200]}") from None
    return out, meta


# --- the single-process model and the check ----------------------------------------------------------------


def build_single(mc: ModelConfig, vocab: int, tgt_vocab: int | None, params: dict, step: int = 0):
    from .model import build_model_from

    mc = ModelConfig(**{**vars(mc), "fused_kernels": False})
    return build_model_from(mc, vocab, tgt_vocab, params, step, "the weights").eval()


def fixed_batch(vocab: int, tgt_vocab: int | None, max_positions: int):
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


def check(what: str, mc: ModelConfig, vocab: int, tgt_vocab: int | None, source: dict, converted: dict,
          step: int) -> float:
    """Logits of the source and the converted weights on a fixed batch; prints and enforces the tolerance."""
    a = logits_of(mc, vocab, tgt_vocab, source, step)
    b = logits_of(mc, vocab, tgt_vocab, converted, step)
    rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
    ok = rel < TOLERANCE
    print(f"check ({what}): logits on a fixed batch of {a.shape[0]} sentences, fp32: max relative difference "
          f"{rel:.3g} {'<' if ok else '>='} {TOLERANCE:g}: {'OK' if ok else 'FAILED'}")
    if not ok:
        raise UserError(f"conversion check failed for {what}: outputs differ by {rel:.3g} (relative)")
    return rel


# --- layouts ------------------------------------------------------------------------------------------------


def rank_params(cfg: Config, vocab: int, tgt_vocab: int | None, tp: int, pp: int, vpp: int, layout: str = ""):
    """-> (Layout, {(tp_rank, pp_rank): {canonical name: meta parameter}}) for a (tp, pp, vpp) grid, built on
    the meta device with no processes (what every rank of such a run would hold)."""
    from .model import canonical_parameters
    from .parallel.grid import Grid
    from .parallel.partition import plan_layout
    from .parallel.stage import build_stage

    if vpp > 1 and pp == 1:
        raise UserError(f"--vpp {vpp} needs --pp > 1")
    p = cfg.parallel
    lay = plan_layout(cfg.model, pp, vpp, vocab, tgt_vocab or vocab, tp, layout=layout, by=p.balance, recompute=p.recompute)
    out = {}
    for pr in range(pp):
        for tr in range(tp):
            grid = Grid(tp=tp, pp=pp, vpp=vpp, tp_rank=tr, pp_rank=pr)
            chunks = build_stage(cfg.model, lay, grid, vocab, tgt_vocab, seed=None, device="meta")
            out[(tr, pr)] = canonical_parameters(chunks, cfg.model)
    return lay, out


def write_layout(out: str, cfg: Config, meta: dict, model: dict, opt: dict | None, tp: int, pp: int, vpp: int,
                 layout: str = "", data: dict | None = None) -> str:
    """Write full single-process tensors (and a canonical optimizer state) as a step directory for a grid."""
    vocab, tgt_vocab = meta["vocab_size"], meta.get("tgt_vocab_size")
    lay, ranks = rank_params(cfg, vocab, tgt_vocab, tp, pp, vpp, layout)
    files = {}
    for (t, p), params in ranks.items():
        files[checkpoint.shard_name(t, p)] = {
            "model": checkpoint.cut(model, params), "split": checkpoint.split_info(params),
            "optimizer": checkpoint.cut_optimizer(opt, params),
            "scaler": {}, "step": int(meta["step"]), "rank": {"data": data, "rng": None, "zero": None},
        }
    c = cfg.to_dict()
    c["parallel"].update(tp=tp, pp=pp, vpp=vpp, layout=str(lay) if pp > 1 else "")
    new_meta = {k: v for k, v in meta.items() if k not in ("files", "format", "versions", "layout", "config")}
    new_meta.update(config=c, layout={"tp": tp, "pp": pp, "vpp": vpp, "dp": 1, "layout": str(lay), "zero": False})
    if tp == pp == 1:  # the single-process trainer's own layout: it resumes without resharding
        new_meta["layout"]["layout"] = "single"
        files[checkpoint.shard_name(0, 0)]["split"] = {n: [-1, *map(int, t.shape)] for n, t in model.items()
                                                       if n in files[checkpoint.shard_name(0, 0)]["model"]}
    return checkpoint.write_step_dir(out, files, new_meta)


# --- torchscale ---------------------------------------------------------------------------------------------

_TS_SUBLAYERS = {"self_attn.": "self_attn.block.", "self_attn_layer_norm.": "self_attn.norm.",
                 "encoder_attn.": "cross_attn.block.", "encoder_attn_layer_norm.": "cross_attn.norm.",
                 "ffn.": "ffn.block.", "final_layer_norm.": "ffn.norm."}
_TS_TOP = {"encoder.embed_tokens.weight": "encoder.embed.table.weight",
           "decoder.embed_tokens.weight": "decoder.embed.table.weight",
           "decoder.output_projection.weight": "decoder.output.weight",
           "encoder.layer_norm.weight": "encoder.final_norm.weight", "encoder.layer_norm.bias": "encoder.final_norm.bias",
           "decoder.layer_norm.weight": "decoder.final_norm.weight", "decoder.layer_norm.bias": "decoder.final_norm.bias"}
_TS_PARAMS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
              "out_proj.weight", "out_proj.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "weight", "bias")


def torchscale_name(name: str) -> str | None:
    """A torchscale EncoderDecoder parameter name -> megabranch's, or None where nothing maps (learned
    positions, layernorm_embedding, Magneto's sub-LN, MoE, relative position biases)."""
    if name in _TS_TOP:
        return _TS_TOP[name]
    parts = name.split(".")
    if len(parts) < 5 or parts[0] not in ("encoder", "decoder") or parts[1] != "layers" or not parts[2].isdigit():
        return None
    rest = ".".join(parts[3:])
    for ts, ours in _TS_SUBLAYERS.items():
        if rest.startswith(ts) and rest[len(ts):] in _TS_PARAMS:
            if ts == "encoder_attn." and parts[0] == "encoder":
                return None
            tail = rest[len(ts):]
            if ts.endswith("layer_norm.") and tail not in ("weight", "bias"):
                return None
            if not ts.endswith("layer_norm.") and tail in ("weight", "bias"):
                return None
            return f"{parts[0]}.layers.{parts[2]}.{ours}{tail}"
    return None


def import_torchscale(state: dict, mc: ModelConfig) -> dict:
    """torchscale state dict -> megabranch single-process parameters; refuses what does not map."""
    state = state.get("model", state) if isinstance(state.get("model", None), dict) else state
    out, unmapped = {}, []
    for name, t in state.items():
        if not torch.is_tensor(t):
            continue
        ours = torchscale_name(name)
        if ours is None:
            unmapped.append(name)
        else:
            out[ours] = t.float()
    if unmapped:
        raise UserError(f"{len(unmapped)} torchscale tensors have no megabranch counterpart (first: {unmapped[0]}); "
                        "megabranch maps Post-LN / DeepNorm encoder-decoders with sinusoidal positions, no "
                        "layernorm_embedding, sub-LN, MoE or relative positions")
    if mc.share_all_embeddings:
        dec = out.pop("decoder.embed.table.weight", None)
        if dec is not None and not torch.equal(dec, out["encoder.embed.table.weight"]):
            raise UserError("model.share_all_embeddings=true but the torchscale encoder and decoder tables differ; "
                            "pass --set model.share_all_embeddings=false")
    if mc.share_decoder_input_output_embed:
        outp = out.pop("decoder.output.weight", None)
        table = out.get("decoder.embed.table.weight", out.get("encoder.embed.table.weight"))
        if outp is not None and not torch.equal(outp, table):
            raise UserError("model.share_decoder_input_output_embed=true but torchscale's output projection differs "
                            "from its decoder table; pass --set model.share_decoder_input_output_embed=false")
    return out


def export_torchscale(params: dict, mc: ModelConfig) -> dict:
    """The inverse naming (for the import's self-check and for users going the other way)."""
    back = {}
    inv_top = {v: k for k, v in _TS_TOP.items()}
    inv_sub = {v: k for k, v in _TS_SUBLAYERS.items()}
    for name, t in params.items():
        if name in inv_top:
            back[inv_top[name]] = t
            continue
        parts = name.split(".")
        rest = ".".join(parts[3:])
        for ours, ts in inv_sub.items():
            if rest.startswith(ours):
                back[f"{parts[0]}.layers.{parts[2]}.{ts}{rest[len(ours):]}"] = t
                break
    if mc.share_all_embeddings:
        back["decoder.embed_tokens.weight"] = back["encoder.embed_tokens.weight"]
    if mc.share_decoder_input_output_embed:
        back["decoder.output_projection.weight"] = back["decoder.embed_tokens.weight"]
    return back


# --- the command --------------------------------------------------------------------------------------------


def _detect(path: str) -> str:
    if path.endswith(".safetensors"):
        return "safetensors"
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, checkpoint.META)) or os.path.isfile(os.path.join(path, "best")) or \
                checkpoint.step_dirs(path):
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
        data = checkpoint.load_file(step_dir, checkpoint.shard_name(0, 0), meta)["rank"].get("data")
        meta = dict(meta, _data=data)
        print(f"read {step_dir}: step {meta['step']}, layout tp {meta['layout']['tp']} pp {meta['layout']['pp']} "
              f"vpp {meta['layout']['vpp']}, {len(model)} tensors{', optimizer state' if opt else ''}")
        return cfg, meta, model, opt
    if kind == "safetensors":
        tensors, st_meta = load_safetensors(args.src)
        info_path = args.src[: -len(".safetensors")] + ".json"
        if not os.path.isfile(info_path):
            raise UserError(f"{info_path} not found: the config JSON written next to {args.src}")
        with open(info_path) as fh:
            info = json.load(fh)
        cfg = Config.from_dict(info["config"], where=info_path)
        print(f"read {args.src}: {len(tensors)} tensors")
        return cfg, dict(info, _data=None), tensors, None
    cfg = _user_config(args)
    if kind == "deepspeed":
        from .backends import deepspeed as ds

        state = ds.import_deepspeed(args.src, cfg)
        if cfg.model.share_all_embeddings:
            state.pop("decoder.embed.table.weight", None)
        vocab = state["encoder.embed.table.weight"].shape[0]
        tgt = state["decoder.embed.table.weight"].shape[0] if "decoder.embed.table.weight" in state else vocab
        print(f"read DeepSpeed pipeline checkpoint {args.src}: {len(state)} tensors")
        return cfg, _meta_for(cfg, vocab, tgt), state, None
    if kind == "torchscale":
        raw = checkpoint.safe_load(args.src)
        params = import_torchscale(raw, cfg.model)
        back = export_torchscale(params, cfg.model)
        src_state = raw.get("model", raw) if isinstance(raw.get("model", None), dict) else raw
        src_tensors = {k: v for k, v in src_state.items() if torch.is_tensor(v)}
        bad = [k for k in src_tensors if k not in back or not torch.equal(back[k], src_tensors[k].float())]
        print(f"check (torchscale import): {len(src_tensors)} source tensors mapped and read back "
              f"{'exactly: OK' if not bad else f'with {len(bad)} mismatches: FAILED'}")
        if bad:
            raise UserError(f"torchscale import check failed at {bad[0]}")
        vocab = params["encoder.embed.table.weight"].shape[0]
        tgt = params.get("decoder.embed.table.weight", params["encoder.embed.table.weight"]).shape[0]
        _ = build_single(cfg.model, vocab, tgt, params)  # the config fits the weights
        return cfg, _meta_for(cfg, vocab, tgt), params, None
    raise UserError(f"--from {kind}: unknown source format")


def _meta_for(cfg: Config, vocab: int, tgt: int) -> dict:
    return {"config": cfg.to_dict(), "vocab_size": vocab, "tgt_vocab_size": tgt, "step": 0, "vocab_sha256": None,
            "_data": None}


def _user_config(args) -> Config:
    from .config import load_config

    if not args.config and not args.set:
        raise UserError(f"--from {args.source_format or _detect(args.src)} needs --config CFG (the model's "
                        "megabranch config) or --set model.key=value overrides")
    return load_config(args.config, args.set)


def convert(args) -> None:
    cfg, meta, model, opt = _load_source(args)
    mc = cfg.model
    vocab, tgt = meta["vocab_size"], meta.get("tgt_vocab_size")
    step = int(meta.get("step", 0))
    to = args.to or ("safetensors" if args.out.endswith(".safetensors") else "megabranch")
    clean = {k: v for k, v in meta.items() if not k.startswith("_")}
    if to == "safetensors":
        save_safetensors(model, args.out, {"format": "megabranch", "step": step})
        info = {k: clean.get(k) for k in ("config", "vocab_size", "tgt_vocab_size", "vocab_sha256", "step")}
        info_path = args.out[: -len(".safetensors")] + ".json"
        checkpoint.atomic_write_bytes((json.dumps(info, indent=1) + "\n").encode(), info_path)
        back, _ = load_safetensors(args.out)
        check("consolidate -> safetensors", mc, vocab, tgt, model, back, step)
        print(f"wrote {args.out} and {info_path}")
    elif to == "megabranch":
        out = write_layout(args.out, cfg, clean, model, opt, args.tp, args.pp, args.vpp, args.layout, meta.get("_data"))
        back, back_opt = checkpoint.consolidate(out)
        check(f"reshard -> tp {args.tp} pp {args.pp} vpp {args.vpp}", mc, vocab, tgt, model, back, step)
        if opt is not None:
            same = all(torch.equal(back_opt[k][n], opt[k][n]) for k in ("exp_avg", "exp_avg_sq") for n in opt[k])
            print(f"check (optimizer state): {'identical after resharding: OK' if same else 'DIFFERS: FAILED'}")
            if not same:
                raise UserError("conversion check failed: optimizer state changed")
        print(f"wrote {out} (resume with --set parallel.tp={args.tp} --set parallel.pp={args.pp} "
              f"--set parallel.vpp={args.vpp} --resume {out})")
    elif to == "deepspeed":
        from .backends import deepspeed as ds

        ds.export_deepspeed(model, cfg, args.out, vocab=vocab, tgt_vocab=tgt)
        back = ds.import_deepspeed(args.out, cfg, vocab=vocab, tgt_vocab=tgt)
        check("export -> DeepSpeed pipeline layer files", mc, vocab, tgt, model, back, step)
        print(f"wrote {args.out}")
    else:
        raise UserError(f"--to {to}: must be megabranch, safetensors or deepspeed")


def average_command(args) -> None:
    if args.last < 1:
        raise UserError(f"--last {args.last}: must be >= 1")
    steps = checkpoint.step_dirs(args.save_dir)
    if not steps:
        raise UserError(f"no step_<N> checkpoints in {args.save_dir}")
    if len(steps) < args.last:
        raise UserError(f"--last {args.last}: {args.save_dir} holds only {len(steps)} checkpoints "
                        f"({', '.join(os.path.basename(p) for _, p in steps)}); raise log.keep_last when training")
    chosen = [p for _, p in steps[-args.last:]]
    avg, meta = checkpoint.average(chosen)
    cfg = Config.from_dict(meta["config"], where=chosen[-1])
    clean = {k: v for k, v in meta.items() if k not in ("files", "format", "versions")}
    clean["averaged"] = [os.path.basename(p) for p in chosen]
    out = write_layout(args.out, cfg, clean, avg, None, 1, 1, 1)
    # the check: the written file against an independent mean of the sources' logits-producing weights
    back, _ = checkpoint.consolidate(out, optimizer=False)
    check(f"average of {len(chosen)}", cfg.model, meta["vocab_size"], meta.get("tgt_vocab_size"), avg, back,
          int(meta["step"]))
    print(f"averaged {', '.join(clean['averaged'])} -> {out}")


def _refuse_existing(out: str) -> None:
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise UserError(f"{out} already exists; choose a new destination (nothing is overwritten)")


@cli_main
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["average"]:
        ap = argparse.ArgumentParser(prog="megabranch-convert average",
                                     description="Average the parameters of the last K checkpoints (fairseq style).")
        ap.add_argument("save_dir")
        ap.add_argument("--last", type=int, required=True, help="how many of the newest step_<N> directories")
        ap.add_argument("--out", required=True, help="the step directory to write (a (1, 1) layout, no optimizer)")
        args = ap.parse_args(argv[1:])
        _refuse_existing(args.out)
        average_command(args)
        return 0
    ap = argparse.ArgumentParser(prog="megabranch-convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    ap.add_argument("src", help="source checkpoint (save dir, step dir, pointer, .safetensors, DeepSpeed dir, .pt)")
    ap.add_argument("out", help="destination (a step directory, a .safetensors file, or a DeepSpeed folder)")
    ap.add_argument("--from", dest="source_format", choices=("megabranch", "safetensors", "deepspeed", "torchscale"),
                    help="source format (default: guessed from SRC)")
    ap.add_argument("--to", choices=("megabranch", "safetensors", "deepspeed"),
                    help="destination format (default: safetensors for *.safetensors, else megabranch)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=1)
    ap.add_argument("--layout", default="", help="explicit stage layout (parallel.layout syntax)")
    ap.add_argument("--config", help="--from deepspeed/torchscale: the model's megabranch config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--no-optimizer", action="store_true", help="drop the optimizer state (smaller, not resumable)")
    args = ap.parse_args(argv)
    for k in ("tp", "pp", "vpp"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k} {getattr(args, k)}: must be >= 1")
    _refuse_existing(args.out)
    convert(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
