"""The training protocol: what the run loop (training.loop.train) needs of an engine.

Two engines implement it: `training.engine.Trainer` (tensor x pipeline x data parallelism; one process is its
1 x 1 x 1 grid) and `backends.deepspeed.DeepSpeedTrainer` (a DeepSpeed PipelineModule).
The loop owns everything around the steps: data order, logging, validation, BLEU, when to save and when to stop;
an engine owns the model, the optimizer, the global step and how its checkpoints are written and read.
Every method marked collective is called by every rank of the job in the same order.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn


class Engine(Protocol):
    step: int  # global optimizer steps taken; the alpha and learning rate of the next step come from it
    rank: int  # this process's global rank: rank 0 logs
    data_shards: int  # the data is split into this many shards (data-parallel replicas) ...
    data_shard: int  # ... and this rank reads this one
    health: object | None  # the training health monitor (training/health.py), None where the engine has none

    def describe(self) -> str:
        """One line for the start of a run: the model and how it is laid out."""

    def train_step(self, batches: list[dict]) -> dict:
        """Collective. One optimizer step over this rank's micro-batches -> identical stats on every rank: loss,
        nll_loss (per target token of the whole step), lr, alpha, gnorm, ntokens, skipped."""

    def valid_loss(self, batches: list[dict]) -> dict:
        """Collective. {loss, nll_loss} per target token over every rank's batches, at the alpha of the next step."""

    def alpha(self) -> float:
        """The BranchNorm alpha the model holds now (1.0 for the other schemes), for logs and checkpoints."""

    def max_over_ranks(self, value: int) -> int:
        """Collective. The largest value any rank of the job passed (the loop's decision to stop early)."""

    def whole_model(self) -> nn.Module | None:
        """Collective. The whole single-process model, to decode the validation BLEU with, on global rank 0 (the
        native engine gathers it there when the layout splits it), or None where there is none."""

    @staticmethod
    def has_checkpoints(save_dir: str) -> bool:
        """Whether save_dir already holds this engine's checkpoints (a fresh run refuses to write there)."""

    def save(self, save_dir: str, loop_state: dict, valid_loss: float, best: float, is_best: bool) -> None:
        """Collective. Write a checkpoint of step `self.step`; loop_state is this rank's data position."""

    def finish_saves(self) -> None:
        """Collective, at the end of a run: wait until every checkpoint this engine started is published."""

    def resume(self, where: str) -> dict:
        """Collective. Restore from a checkpoint (`where`: a path or "last") -> {"data": this rank's data position
        or None, "best_valid_loss": float or None}."""


def step_stats(
    loss_sum: float, nll_sum: float, ntokens: int, lr: float, alpha: float, gnorm: float, skipped: bool
) -> dict:
    """What Engine.train_step returns, from the step's sums over every micro-batch and replica."""
    return {
        "loss": loss_sum / ntokens,
        "nll_loss": nll_sum / ntokens,
        "lr": lr,
        "alpha": alpha,
        "gnorm": gnorm,
        "ntokens": ntokens,
        "skipped": int(skipped),
    }
