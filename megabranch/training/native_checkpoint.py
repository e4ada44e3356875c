"""Step-directory checkpoints of the native engine (training/engine.py), for any layout (one process included).

`NativeCheckpoints` is an object the engine holds, built from exactly what a checkpoint records and restores:
the config, this rank's model chunks and optimizer, the precision (fp16 loss-scaler state), where the rank sits
in the grid, and the vocabulary the run trains on. The step and alpha are the engine's and are passed to each
save. The file format and its publication protocol are megabranch.checkpoint's.

With log.async_save (the default) a save copies this rank's state into host memory and publishes it in the
background (checkpoint.async_save); the run loop calls finish() (through the engine's finish_saves) at the end.

A save that fails (a full disk, a read-only or vanished filesystem: checkpoint.SaveFailed, the same on every rank)
does not end the run: every rank says so in one line, `latest` still names the previous checkpoint, training goes
on and the next save tries again. log.max_failed_saves failures in a row end the run (a UserError: exit code 2),
and so does a failure of the last save (finish()). A background save's failure is known when the next save (or
finish()) waits for it.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from .. import checkpoint
from ..checkpoint import space
from ..checkpoint.async_save import AsyncSaver, host_copy, snapshot
from ..config import Config
from ..errors import UserError
from ..model import canonical_parameters
from ..parallel.parallelize import natural_split_dims, split_info
from ..parallel.tensor_parallel import get_rng_tracker
from .precision import Precision

# model keys that may change across a resume: regularisation, kernel choice and compilation
_RESUMABLE_CHANGES = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "fused_kernels",
    "compile",
    "compile_backend",
    "compile_dynamic",
)


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


def _check_model_matches(cfg: Config, saved: dict, path: str) -> None:
    # a key the checkpoint's config lacks was added later: it was trained with that key's default
    ours, theirs = cfg.to_dict()["model"], {**Config().to_dict()["model"], **saved["model"]}
    for key in sorted(set(ours) | set(theirs)):
        if key in _RESUMABLE_CHANGES:
            continue
        if ours.get(key) != theirs.get(key):
            raise UserError(f"--resume: model.{key}={ours.get(key)!r} but {path} was trained with {theirs.get(key)!r}")


class NativeCheckpoints:
    """Saves and restores one rank's part of a step directory.

    position: where the rank sits ({tp, pp, dp, vpp, tp_rank, pp_rank, dp_rank, layout, zero}, as
    megabranch.checkpoint.load_for_rank reads it); vocab_sizes: (source, target); vocab_sha256: of the data the
    run trains on (None when unknown)."""

    def __init__(
        self,
        cfg: Config,
        model,
        optimizer,
        precision: Precision,
        position: dict,
        vocab_sizes: tuple[int, int],
        vocab_sha256: str | None,
        rank: int = 0,
    ):
        self.cfg, self.model, self.optimizer, self.precision = cfg, model, optimizer, precision
        self.position, self.vocab_sizes, self.vocab_sha256, self.rank = position, vocab_sizes, vocab_sha256, rank
        self._saver: AsyncSaver | None = None
        self._in_flight: tuple[str, int] | None = None  # (save_dir, step) of the background save being written
        self._failed = 0  # saves failed in a row
        self._failure: str | None = None  # why the most recent save failed; None once one is published
        self._published: int | None = None  # the step this run last published

    def named_params(self) -> dict:
        """This rank's parameters by single-process name (tensor-parallel slices)."""
        return canonical_parameters(self.model, self.cfg.model)

    # --- saving ----------------------------------------------------------------------------------------------
    def files(self, step: int, alpha: float, data_state: dict) -> dict:
        """This rank's files of a step directory: data-parallel rank 0 of a (tp, pp) position writes the shard
        (parameters, optimizer, step, alpha, its RNG / data position); the other replicas their RNG, data
        position and ZeRO-1 optimizer slice."""
        pos = self.position
        zero = checkpoint.is_zero(self.optimizer)
        mine = {"rng": rng_state(), "data": data_state, "zero": self.optimizer.state_dict() if zero else None}
        t, p, d = pos["tp_rank"], pos["pp_rank"], pos["dp_rank"]
        if d > 0:
            return {checkpoint.shard_name(t, p, d): {"rank": mine, "step": step}}
        params = self.named_params()
        dims = natural_split_dims(self.model)
        return {
            checkpoint.shard_name(t, p): {
                "model": {k: host_copy(v) for k, v in params.items()},
                "split": split_info(params),
                "lead": {k: dims.get(id(v), 0) for k, v in params.items()},  # stored leading: any tp slice contiguous
                "optimizer": checkpoint.optimizer_to_canonical(self.optimizer, list(params)),
                "scaler": self.precision.state_dict(),
                "step": step,
                "alpha": alpha,
                "rank": mine,
            }
        }

    def meta(self, step: int, alpha: float, valid_loss: float | None, best: float) -> dict:
        """meta.json of a step directory (megabranch.checkpoint adds the files, their sha256 and the versions).
        valid_loss: None for a save without validation (a run stopped early); a non-finite one is written as
        null."""
        cfg, pos = self.cfg, self.position
        return {
            "layout": {k: pos[k] for k in ("tp", "pp", "vpp", "dp", "layout", "zero")},
            "config": cfg.to_dict(),
            "vocab_sha256": self.vocab_sha256,
            "vocab_size": self.vocab_sizes[0],
            "tgt_vocab_size": self.vocab_sizes[1],
            "valid_loss": valid_loss if valid_loss is not None and math.isfinite(valid_loss) else None,
            "best_valid_loss": best if math.isfinite(best) else None,
            "alpha": {
                "value": alpha,
                "schedule": cfg.model.alpha_schedule,
                "warmup_steps": cfg.model.alpha_warmup_steps,
                "step": step,
            },
        }

    def save(
        self,
        save_dir: str,
        step: int,
        alpha: float,
        data_state: dict,
        valid_loss: float | None,
        best: float,
        is_best: bool,
    ) -> str:
        """Collective: publish step_<step>/ (megabranch.checkpoint.save_step); with log.async_save, snapshot this
        rank's state and publish it in the background."""
        files, meta = self.files(step, alpha, data_state), self.meta(step, alpha, valid_loss, best)
        lg = self.cfg.log
        if not lg.async_save:
            try:
                path = checkpoint.save_step(save_dir, step, files, meta, is_best, lg.keep_last)
            except checkpoint.SaveFailed as e:
                self._count(save_dir, step, e)
                return os.path.join(save_dir, f"step_{step}")
            self._count(save_dir, step, None)
            return path
        if self._saver is None:
            self._saver = AsyncSaver(self.cfg.parallel.timeout_s)
        self._wait()
        self._saver.save(save_dir, step, snapshot(files), meta, is_best, lg.keep_last)
        self._in_flight = (save_dir, step)
        return os.path.join(save_dir, f"step_{step}")

    def finish(self) -> None:
        """Collective at the end of a run: every background save published; a UserError when the last save
        failed (the run's end, or a stop, has no checkpoint of its own step)."""
        in_flight = self._in_flight
        self._wait(last=True)
        if self._failure is not None:
            failure, self._failure = self._failure, None  # said once, also when an error path calls finish() again
            save_dir = in_flight[0] if in_flight else self.cfg.log.save_dir
            raise UserError(
                f"the last checkpoint was not saved, {failure}; {self._kept(save_dir)}; {space.RESUME_ADVICE}"
            )

    def _wait(self, last: bool = False) -> None:
        """Collective: the background save in flight (if any) published, or its failure counted."""
        if self._in_flight is None:
            return
        (save_dir, step), self._in_flight = self._in_flight, None
        try:
            self._saver.wait()
        except checkpoint.SaveFailed as e:
            self._count(save_dir, step, e, last)
        else:
            self._count(save_dir, step, None)

    def _count(self, save_dir: str, step: int, error: checkpoint.SaveFailed | None, last: bool = False) -> None:
        """Keep count of the saves failed in a row: one line per failure on every rank, a UserError at
        log.max_failed_saves (every rank counts the same failures: a SaveFailed is raised on all of them)."""
        if error is None:
            self._failed, self._failure, self._published = 0, None, step
            return
        self._failed += 1
        self._failure = f"step_{step}: {error.reason}"
        limit = self.cfg.log.max_failed_saves
        if self._failed >= limit:  # (said here: finish() on the way out has nothing left to say)
            failure, self._failure = self._failure, None
            raise UserError(
                f"{self._failed} checkpoint saves in a row failed (log.max_failed_saves={limit}), the "
                f"last of {failure}; stopping; {self._kept(save_dir)}; {space.RESUME_ADVICE}"
            )
        if not last:  # (the last one is finish()'s error)
            who = f"rank {self.rank}: " if self.position["tp"] * self.position["pp"] * self.position["dp"] > 1 else ""
            print(
                f"warning: {who}checkpoint not saved, {self._failure}; {self._kept(save_dir)}; training goes on "
                f"and the next save tries again ({self._failed} of log.max_failed_saves={limit} failures in a "
                "row)",
                file=sys.stderr,
                flush=True,
            )

    def _kept(self, save_dir: str) -> str:
        """What `latest` names after a failed save (never read from the failing filesystem)."""
        if self._published is None:
            return f"{save_dir}/latest is as it was"
        return f"{save_dir}/latest still names step_{self._published}"

    # --- restoring -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def restore(self, state: dict) -> int:
        """Parameters, optimizer and loss-scaler state from megabranch.checkpoint.load_for_rank's result (already
        cut for this rank's layout) -> the step it was saved at."""
        checkpoint.restore(self.named_params(), self.optimizer, state)
        self.precision.load_state_dict(state.get("scaler"))
        return int(state["step"])

    def resume(self, where: str) -> tuple[int, dict]:
        """Collective: restore from a step directory, a save directory ("" / "last": log.save_dir's latest) or a
        pointer file, of any layout -> (its step, the loop state: data position, best validation loss)."""
        step_dir = checkpoint.resolve(self.cfg.log.save_dir if where in ("", "last") else where, "latest")
        meta = checkpoint.read_meta(step_dir)
        self._check_vocabulary(meta, step_dir)
        _check_model_matches(self.cfg, meta["config"], step_dir)
        state = checkpoint.load_for_rank(step_dir, meta, self.position, self.named_params())
        step = self.restore(state)
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        if self.rank == 0:
            if state["optimizer"] is None and state["zero"] is None:
                print(
                    f"{step_dir} holds no optimizer state (averaged, imported or converted without it): "
                    "Adam starts fresh",
                    file=sys.stderr,
                )
            if state["resharded"]:
                print(f"resumed from {step_dir} (layout {meta['layout']}), resharded for this layout", file=sys.stderr)
        return step, {"data": state["data"], "best_valid_loss": meta.get("best_valid_loss")}

    def _check_vocabulary(self, meta: dict, step_dir: str) -> None:
        data_dir, vocab_size = self.cfg.data.data_dir, self.vocab_sizes[0]
        if meta.get("vocab_sha256") is None:  # imported (torchscale, DeepSpeed): only the sizes are known
            if meta.get("vocab_size") != vocab_size:
                raise UserError(
                    f"--resume: {step_dir} has a vocabulary of {meta.get('vocab_size')} entries, "
                    f"{data_dir} one of {vocab_size}"
                )
        elif self.vocab_sha256 is not None and meta.get("vocab_sha256") != self.vocab_sha256:
            raise UserError(
                f"--resume: the vocabulary of {data_dir} differs from the one {step_dir} was "
                "trained with; use the data it was trained on"
            )
