"""Checkpoints in DeepSpeed's pipeline layout: `layer_XX-model_states.pt` per layer index (layers.layer_plan), keys
as that unit's state_dict, which are single-process parameter names; with tensor parallelism (parallel.tp > 1)
`layer_XX-model_RR-model_states.pt` per layer index and tensor-parallel rank RR, each holding that rank's shards
(what PipelineModule.save_state_dict writes over a PipeModelDataParallelTopology). A megabranch checkpoint exported
here loads with engine.load_checkpoint(dir, load_module_only=True), and a DeepSpeed one imports back (its tensor-
parallel shards joined along the dimensions parallelize splits)."""

from __future__ import annotations

import os

import torch

from ...checkpoint import contained, safe_load
from ...config import Config, ModelConfig
from ...errors import UserError
from ...model import meta_model
from ...model.transformer import DECODER_TABLE, SHARED_TABLE
from ...parallel.parallelize import shard_of
from .layers import check_scheme, layer_plan, unit_shards

EXPORT_TAG = "megabranch"


def _layer_file(directory: str, idx: int, tp_rank: int | None = None) -> str:
    """A layer index's file; tp_rank: that tensor-parallel rank's (DeepSpeed's rank repr "model_RR")."""
    rank = "" if tp_rank is None else f"model_{tp_rank:02d}-"
    return os.path.join(directory, f"layer_{idx:02d}-{rank}model_states.pt")


def _tensor_parallel_size(directory: str) -> int:
    """How many tensor-parallel files the first layer index has (1: the pipeline x data layout's one file)."""
    if os.path.isfile(_layer_file(directory, 0)):
        return 1
    tp = 0
    while os.path.isfile(_layer_file(directory, 0, tp)):
        tp += 1
    return tp


def _tag_dir(path: str) -> str:
    """A DeepSpeed checkpoint root (with `latest`) -> its latest tag folder (which must lie inside it); a tag
    folder -> itself."""
    latest = os.path.join(path, "latest")
    if not os.path.isfile(_layer_file(path, 0)) and os.path.isfile(latest):
        with open(latest) as fh:
            return contained(path, fh.read().strip(), latest)
    return path


def _layer(path: str, key: str | None = None):
    """One layer file (checkpoint.safe_load: tensors and plain data only); with `key`, that tensor of it."""
    layer = safe_load(path)
    if key is None:
        return layer
    if key not in layer:
        raise UserError(f"import_deepspeed: {path} has no {key}; is it a megabranch model's DeepSpeed checkpoint?")
    return layer[key]


def _aliases(mc: ModelConfig) -> dict:
    """State-dict names that are another name's tensor in the whole model (a table shared by both stacks)."""
    return {DECODER_TABLE: SHARED_TABLE} if mc.share_all_embeddings else {}


def _vocabs(model_state: dict, vocab, tgt_vocab):
    vocab = vocab or model_state[SHARED_TABLE].shape[0]
    if tgt_vocab is None:
        for k in (DECODER_TABLE, "decoder.output.weight"):
            if k in model_state:
                tgt_vocab = model_state[k].shape[0]
                break
    return vocab, tgt_vocab or vocab


def export_deepspeed(
    model_state: dict,
    cfg,
    out_dir: str,
    vocab: int | None = None,
    tgt_vocab: int | None = None,
    tag: str = EXPORT_TAG,
    tp: int = 1,
) -> list[str]:
    """Write the single-process state dict (canonical names) as a DeepSpeed pipeline checkpoint:
    out_dir/<tag>/layer_XX-model_states.pt, one per layer index (what PipelineModule.save_state_dict writes with
    pipeline x data parallelism; a tied table is written by every index that uses it), or with tp > 1
    layer_XX-model_RR-model_states.pt per layer index and tensor-parallel rank (a run with parallel.tp = tp loads
    them), an mp_rank_00_model_states.pt with no optimizer state, and out_dir/latest. The layer files do not
    depend on the pipeline size, so any pp loads them. cfg: a Config or ModelConfig. Returns the files."""
    mc = cfg.model if isinstance(cfg, Config) else cfg
    check_scheme(mc)  # a scheme the DeepSpeed backend cannot run is not written for it
    vocab, tgt_vocab = _vocabs(model_state, vocab, tgt_vocab)
    aliases = _aliases(mc)
    used, files = set(), []
    tag_dir = os.path.join(out_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    for idx, entry in enumerate(layer_plan(mc)):
        for rank, shapes in enumerate(unit_shards(mc, entry, vocab, tgt_vocab, tp)):
            layer = {}
            for key, meta in shapes.items():
                name = aliases.get(key, key)
                if name not in model_state:
                    raise UserError(
                        f"export_deepspeed: the state dict has no {name} (needed by DeepSpeed layer "
                        f"{idx}); is it a build_model state dict for this model config?"
                    )
                layer[key] = shard_of(model_state[name].detach(), meta).clone().contiguous()
                used.add(name)
            files.append(_layer_file(tag_dir, idx, rank if tp > 1 else None))
            torch.save(layer, files[-1])
    for alias, name in aliases.items():  # the whole model's state dict lists a shared table under both names
        if alias in model_state and not torch.equal(model_state[alias], model_state[name]):
            raise UserError(f"export_deepspeed: {alias} differs from {name}, but model.share_all_embeddings ties them")
    extra = sorted(set(model_state) - used - set(aliases))
    if extra:
        raise UserError(
            f"export_deepspeed: {len(extra)} tensors of the state dict have no DeepSpeed layer "
            f"(first: {extra[0]}); the model config does not match the state dict"
        )
    # what engine.load_checkpoint reads before the layer files: module None (-> the layer files), no optimizer
    files.append(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    torch.save(
        {
            "module": None,
            "optimizer": None,
            "lr_scheduler": None,
            "global_steps": 0,
            "global_samples": 0,
            "skipped_steps": 0,
            "dp_world_size": 1,
            "mp_world_size": 1,
            "megabranch": {"model": dict(vars(mc)), "exported_by": "megabranch.backends.deepspeed"},
        },
        files[-1],
    )
    files.append(os.path.join(out_dir, "latest"))
    with open(files[-1], "w") as fh:
        fh.write(tag)
    return files


def import_deepspeed(in_dir: str, cfg, vocab: int | None = None, tgt_vocab: int | None = None) -> dict:
    """Read a DeepSpeed pipeline checkpoint's layer files (written by export_deepspeed or engine.save_checkpoint;
    in_dir: the checkpoint root, whose `latest` names the tag, or the tag folder) back into a single-process state
    dict (canonical names, the whole model's key order). A tied table saved by several layer indices must be
    identical in all of them."""
    mc = cfg.model if isinstance(cfg, Config) else cfg
    if not os.path.isdir(in_dir):
        raise UserError(f"import_deepspeed: {in_dir} is not a directory")
    in_dir = _tag_dir(in_dir)
    tp = _tensor_parallel_size(in_dir)
    if tp == 0:
        raise UserError(
            f"import_deepspeed: {_layer_file(in_dir, 0)} not found; pass a DeepSpeed pipeline checkpoint "
            f"folder (holding `latest`, or layer_XX-model_states.pt / layer_XX-model_RR-model_states.pt)"
        )
    plan = layer_plan(mc)

    def size(idx: int, key: str) -> int:  # the full vocabulary of a table: its rows over the tp files
        return sum(_layer(_layer_file(in_dir, idx, r if tp > 1 else None), key).shape[0] for r in range(tp))

    vocab = vocab or size(0, SHARED_TABLE)
    if tgt_vocab is None:
        tgt_vocab = vocab if mc.share_all_embeddings else size(mc.encoder_layers + 1, DECODER_TABLE)
    aliases = _aliases(mc)
    state: dict = {}
    for idx, entry in enumerate(plan):
        layer = _read_layer(in_dir, idx, mc, entry, vocab, tgt_vocab, tp, len(plan))
        for key, t in layer.items():
            name = aliases.get(key, key)
            if name in state and not torch.equal(state[name], t):
                raise UserError(f"import_deepspeed: the tied {name} differs between layer files (at layer {idx})")
            state[name] = t
    for alias, name in aliases.items():
        state[alias] = state[name]
    order = list(meta_model(mc, vocab, tgt_vocab).state_dict().keys())
    return {k: state[k] for k in order}


def _read_layer(
    in_dir: str, idx: int, mc: ModelConfig, entry, vocab: int, tgt_vocab: int, tp: int, n_layers: int
) -> dict:
    """Layer index `idx`'s state (full tensors by unit key): its one file, or its tp files' shards joined along
    the dimension each is split on (a replicated tensor must be the same in every file)."""
    shards = unit_shards(mc, entry, vocab, tgt_vocab, tp)
    parts = []
    for rank in range(tp):
        path = _layer_file(in_dir, idx, rank if tp > 1 else None)
        if not os.path.isfile(path):
            raise UserError(
                f"import_deepspeed: {path} not found; the checkpoint does not hold a "
                f"{mc.encoder_layers}L-{mc.decoder_layers}L model over tp {tp} ({n_layers} layer "
                f"indices expected)"
            )
        layer = _layer(path)
        if set(layer) != set(shards[rank]):
            missing, unexpected = sorted(set(shards[rank]) - set(layer)), sorted(set(layer) - set(shards[rank]))
            raise UserError(
                f"import_deepspeed: {path} does not match the model config (missing {missing[:2]}, "
                f"unexpected {unexpected[:2]})"
            )
        parts.append(layer)
    out = {}
    for key in parts[0]:
        dim = getattr(shards[0][key], "tp_split_dim", None)
        if dim is not None:
            out[key] = torch.cat([p[key] for p in parts], dim=dim)
            continue
        if any(not torch.equal(p[key], parts[0][key]) for p in parts[1:]):
            raise UserError(
                f"import_deepspeed: {key} differs between the tensor-parallel files of layer {idx}, "
                f"though tensor parallelism replicates it"
            )
        out[key] = parts[0][key]
    return out
