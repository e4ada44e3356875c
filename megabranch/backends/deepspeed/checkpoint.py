"""Checkpoints in DeepSpeed's pipeline layout: `layer_XX-model_states.pt` per layer index (layers.layer_plan), keys
as that unit's state_dict, which are single-process parameter names. A megabranch checkpoint exported here loads
with engine.load_checkpoint(dir, load_module_only=True), and a DeepSpeed one imports back."""

from __future__ import annotations

import os

import torch

from ...checkpoint import contained, safe_load
from ...config import Config, ModelConfig
from ...errors import UserError
from ...model import meta_model
from ...model.transformer import DECODER_TABLE, SHARED_TABLE
from .layers import check_scheme, layer_plan, unit_state_keys

EXPORT_TAG = "megabranch"


def _layer_file(directory: str, idx: int) -> str:
    return os.path.join(directory, f"layer_{idx:02d}-model_states.pt")


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


def export_deepspeed(model_state: dict, cfg, out_dir: str, vocab: int | None = None,
                     tgt_vocab: int | None = None, tag: str = EXPORT_TAG) -> list[str]:
    """Write the single-process state dict (canonical names) as a DeepSpeed pipeline checkpoint:
    out_dir/<tag>/layer_XX-model_states.pt, one per layer index (what PipelineModule.save_state_dict writes with
    pipeline x data parallelism; a tied table is written by every index that uses it), an
    mp_rank_00_model_states.pt with no optimizer state, and out_dir/latest. The layer files do not depend on the
    pipeline size, so any pp loads them. cfg: a Config or ModelConfig. Returns the files."""
    mc = cfg.model if isinstance(cfg, Config) else cfg
    check_scheme(mc)  # a scheme the DeepSpeed backend cannot run is not written for it
    vocab, tgt_vocab = _vocabs(model_state, vocab, tgt_vocab)
    aliases = _aliases(mc)
    used, files = set(), []
    tag_dir = os.path.join(out_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    for idx, entry in enumerate(layer_plan(mc)):
        layer = {}
        for key in unit_state_keys(mc, entry, vocab, tgt_vocab):
            name = aliases.get(key, key)
            if name not in model_state:
                raise UserError(f"export_deepspeed: the state dict has no {name} (needed by DeepSpeed layer {idx}); "
                                f"is it a build_model state dict for this model config?")
            layer[key] = model_state[name].detach().clone().contiguous()
            used.add(name)
        files.append(_layer_file(tag_dir, idx))
        torch.save(layer, files[-1])
    for alias, name in aliases.items():  # the whole model's state dict lists a shared table under both names
        if alias in model_state and not torch.equal(model_state[alias], model_state[name]):
            raise UserError(f"export_deepspeed: {alias} differs from {name}, but model.share_all_embeddings ties them")
    extra = sorted(set(model_state) - used - set(aliases))
    if extra:
        raise UserError(f"export_deepspeed: {len(extra)} tensors of the state dict have no DeepSpeed layer "
                        f"(first: {extra[0]}); the model config does not match the state dict")
    # what engine.load_checkpoint reads before the layer files: module None (-> the layer files), no optimizer
    files.append(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    torch.save({"module": None, "optimizer": None, "lr_scheduler": None, "global_steps": 0, "global_samples": 0,
                "skipped_steps": 0, "dp_world_size": 1, "mp_world_size": 1,
                "megabranch": {"model": dict(vars(mc)), "exported_by": "megabranch.backends.deepspeed"}}, files[-1])
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
    first = _layer_file(in_dir, 0)
    if not os.path.isfile(first):
        raise UserError(f"import_deepspeed: {first} not found; pass a DeepSpeed pipeline checkpoint folder (holding "
                        f"`latest`, or layer_XX-model_states.pt; tensor-parallel layer files are not supported)")
    plan = layer_plan(mc)
    vocab = vocab or _layer(first, SHARED_TABLE).shape[0]
    if tgt_vocab is None:
        tgt_vocab = vocab if mc.share_all_embeddings else \
            _layer(_layer_file(in_dir, mc.encoder_layers + 1), DECODER_TABLE).shape[0]
    aliases = _aliases(mc)
    state: dict = {}
    for idx, entry in enumerate(plan):
        path = _layer_file(in_dir, idx)
        if not os.path.isfile(path):
            raise UserError(f"import_deepspeed: {path} not found; the checkpoint does not hold a "
                            f"{mc.encoder_layers}L-{mc.decoder_layers}L model ({len(plan)} layer files expected)")
        layer = _layer(path)
        want = set(unit_state_keys(mc, entry, vocab, tgt_vocab))
        if set(layer) != want:
            missing, unexpected = sorted(want - set(layer)), sorted(set(layer) - want)
            raise UserError(f"import_deepspeed: {path} does not match the model config (missing {missing[:2]}, "
                            f"unexpected {unexpected[:2]})")
        for key, t in layer.items():
            name = aliases.get(key, key)
            if name in state and not torch.equal(state[name], t):
                raise UserError(f"import_deepspeed: the tied {name} differs between layer files (at {path})")
            state[name] = t
    for alias, name in aliases.items():
        state[alias] = state[name]
    order = list(meta_model(mc, vocab, tgt_vocab).state_dict().keys())
    return {k: state[k] for k in order}
