"""Step-directory checkpoints for the native engines (one process and tensor x pipeline x data parallel).

An engine that uses this exposes `position()` (where it sits in the grid), `named_params()` (its parameters by
single-process name), `model` (its modules), `optimizer`, optionally `scaler`, `step`, `rank`, `cfg`, `alpha()`,
`vocab_sha256` (of the data it trains on, None when unknown), `vocab_sizes` (source, target) and
`load_checkpoint_state(state)`; the file format and its publication protocol are megabranch.checkpoint's.

With log.async_save (the default) a save copies this rank's state into host memory and publishes it in the
background (checkpoint.async_save); the run loop calls finish_saves() at the end.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from .. import checkpoint
from ..config import Config
from ..checkpoint.async_save import AsyncSaver, host_copy, snapshot
from ..errors import UserError
from ..parallel.parallelize import natural_split_dims, split_info
from ..parallel.tensor_parallel import get_rng_tracker

# model keys that may change across a resume: regularisation, kernel choice and compilation
_RESUMABLE_CHANGES = ("dropout", "attention_dropout", "activation_dropout", "fused_kernels", "compile",
                      "compile_backend")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("tracker"):
        get_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_files(engine, data_state: dict) -> dict:
    """This rank's files of a step directory: data-parallel rank 0 of a (tp, pp) position writes the shard
    (parameters, optimizer, step, alpha, its RNG / data position); the other replicas their RNG, data position
    and ZeRO-1 optimizer slice."""
    pos = engine.position()
    zero = checkpoint.is_zero(engine.optimizer)
    mine = {"rng": rng_state(), "data": data_state, "zero": engine.optimizer.state_dict() if zero else None}
    t, p, d = pos["tp_rank"], pos["pp_rank"], pos["dp_rank"]
    if d > 0:
        return {checkpoint.shard_name(t, p, d): {"rank": mine, "step": engine.step}}
    params = engine.named_params()
    scaler = getattr(engine, "scaler", None)
    dims = natural_split_dims(engine.model)
    return {checkpoint.shard_name(t, p): {
        "model": {k: host_copy(v) for k, v in params.items()},
        "split": split_info(params),
        "lead": {k: dims.get(id(v), 0) for k, v in params.items()},  # stored leading: any tp slice contiguous
        "optimizer": checkpoint.optimizer_to_canonical(engine.optimizer, list(params)),
        "scaler": scaler.state_dict() if scaler else {},
        "step": engine.step,
        "alpha": engine.alpha(),
        "rank": mine,
    }}


def step_meta(engine, valid_loss: float | None, best: float) -> dict:
    """meta.json of a step directory (megabranch.checkpoint adds the files, their sha256 and the versions).
    valid_loss: None for a save without validation (a run stopped early); a non-finite one is written as null."""
    cfg, pos = engine.cfg, engine.position()
    return {
        "layout": {k: pos[k] for k in ("tp", "pp", "vpp", "dp", "layout", "zero")},
        "config": cfg.to_dict(), "vocab_sha256": engine.vocab_sha256, "vocab_size": engine.vocab_sizes[0],
        "tgt_vocab_size": engine.vocab_sizes[1],
        "valid_loss": valid_loss if valid_loss is not None and math.isfinite(valid_loss) else None,
        "best_valid_loss": best if math.isfinite(best) else None,
        "alpha": {"value": engine.alpha(), "schedule": cfg.model.alpha_schedule,
                  "warmup_steps": cfg.model.alpha_warmup_steps, "step": engine.step},
    }


def save(engine, save_dir: str, data_state: dict, valid_loss: float, best: float, is_best: bool,
         saver: AsyncSaver | None = None) -> str:
    """Collective: publish step_<engine.step>/ (megabranch.checkpoint.save_step); with `saver`, snapshot this
    rank's state and publish it in the background."""
    files, meta = checkpoint_files(engine, data_state), step_meta(engine, valid_loss, best)
    if saver is None:
        return checkpoint.save_step(save_dir, engine.step, files, meta, is_best, engine.cfg.log.keep_last)
    saver.save(save_dir, engine.step, snapshot(files), meta, is_best, engine.cfg.log.keep_last)
    return os.path.join(save_dir, f"step_{engine.step}")


def _check_model_matches(cfg: Config, saved: dict, path: str) -> None:
    # a key the checkpoint's config lacks was added later: it was trained with that key's default
    ours, theirs = cfg.to_dict()["model"], {**Config().to_dict()["model"], **saved["model"]}
    for key in sorted(set(ours) | set(theirs)):
        if key in _RESUMABLE_CHANGES:
            continue
        if ours.get(key) != theirs.get(key):
            raise UserError(f"--resume: model.{key}={ours.get(key)!r} but {path} was trained with {theirs.get(key)!r}")


def _check_vocabulary(engine, meta: dict, step_dir: str) -> None:
    data_dir, vocab_size = engine.cfg.data.data_dir, engine.vocab_sizes[0]
    if meta.get("vocab_sha256") is None:  # imported (torchscale, DeepSpeed): only the sizes are known
        if meta.get("vocab_size") != vocab_size:
            raise UserError(f"--resume: {step_dir} has a vocabulary of {meta.get('vocab_size')} entries, "
                            f"{data_dir} one of {vocab_size}")
    elif engine.vocab_sha256 is not None and meta.get("vocab_sha256") != engine.vocab_sha256:
        raise UserError(f"--resume: the vocabulary of {data_dir} differs from the one {step_dir} was "
                        "trained with; use the data it was trained on")


def resume(engine, where: str) -> dict:
    """Collective: restore `engine` from a step directory, a save directory ("" / "last": log.save_dir's
    latest) or a pointer file, of any layout -> the loop state (data position, best validation loss)."""
    save_dir = engine.cfg.log.save_dir
    step_dir = checkpoint.resolve(save_dir if where in ("", "last") else where, "latest")
    meta = checkpoint.read_meta(step_dir)
    _check_vocabulary(engine, meta, step_dir)
    _check_model_matches(engine.cfg, meta["config"], step_dir)
    state = checkpoint.load_for_rank(step_dir, meta, engine.position(), engine.named_params())
    engine.load_checkpoint_state(state)
    if state["rng"] is not None:
        set_rng_state(state["rng"])
    if engine.rank == 0:
        if state["optimizer"] is None and state["zero"] is None:
            print(f"{step_dir} holds no optimizer state (averaged, imported or converted without it): "
                  "Adam starts fresh", file=sys.stderr)
        if state["resharded"]:
            print(f"resumed from {step_dir} (layout {meta['layout']}), resharded for this layout", file=sys.stderr)
    return {"data": state["data"], "best_valid_loss": meta.get("best_valid_loss")}


class NativeCheckpointing:
    """The checkpoint part of training.protocol.Engine for an engine with the attributes listed above."""

    @staticmethod
    def has_checkpoints(save_dir: str) -> bool:
        return checkpoint.has_checkpoints(save_dir)

    _saver: AsyncSaver | None = None

    def save(self, save_dir: str, loop_state: dict, valid_loss: float, best: float, is_best: bool) -> None:
        if self.cfg.log.async_save and self._saver is None:
            self._saver = AsyncSaver(self.cfg.parallel.timeout_s)
        save(self, save_dir, loop_state, valid_loss, best, is_best, self._saver if self.cfg.log.async_save else None)

    def finish_saves(self) -> None:
        """Collective at the end of a run: every background save published (its failure raised here)."""
        if self._saver is not None:
            self._saver.wait()

    def resume(self, where: str) -> dict:
        return resume(self, where)
