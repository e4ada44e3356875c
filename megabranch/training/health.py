"""The training health monitor: per-layer gradient norms and update-to-weight ratios, and a warning when the
bottom of a stack stops learning.

Deep Post-LN-family models fail quietly: once the residual branches grow, every LayerNorm shrinks the gradient
that reaches the layers below it, and the lower encoder can stop learning (gradient 1e-8 at the bottom against
1e-3 at the top) while the loss still falls, carried by the decoder. The monitor makes that visible.

Groups: every encoder and decoder layer ("encoder.7"), the embeddings ("encoder.embed", "decoder.embed"; a table
shared by both stacks counts under the encoder's), and whatever else a stack holds outside its layers
("encoder.final_norm", "decoder.output"; anything else a stack holds outside its layers is "<stack>.other"). Per
group, every step:
  * the gradient norm, from the squared norms the gradient clipping already reduces (parallel/clip.py sums them
    per group before its one all-reduce over tp and pp): no extra pass, no extra collective;
  * at the steps the run loop logs, the update-to-weight ratio ||w_after - w_before|| / ||w_before||: the
    parameters are copied before that step's optimizer update (one extra copy of this rank's parameters, for
    that step only), and the two squared norms per group are summed over tp and pp in one small all-reduce.
Every rank ends up with the same numbers; rank 0 logs them (log.jsonl "health" records, TensorBoard).

The warning: when a stack's lowest layer gets more than WARN_RATIO less gradient than its top layer for
WARN_INTERVALS log intervals in a row, one line names the layers, the ratio and what to try. It is said once per
stack, and again only after the stack has recovered.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.clip import counted

STACKS = ("encoder", "decoder")
WARN_RATIO = 1e4  # top-layer / bottom-layer gradient norm above which the bottom counts as not learning
WARN_INTERVALS = 3  # ... for this many log intervals in a row


OUTSIDE_LAYERS = {"encoder": ("final_norm", "other"), "decoder": ("final_norm", "output", "other")}


def group_name(param_name: str) -> str:
    """The monitor's group of a single-process parameter name: encoder.layers.7.ffn.fc1.weight -> encoder.7,
    encoder.embed.table.weight -> encoder.embed, decoder.output.weight -> decoder.output."""
    stack, part, *rest = param_name.split(".") + [""]
    if part == "layers":
        return f"{stack}.{rest[0]}"
    return f"{stack}.{part if part == 'embed' or part in OUTSIDE_LAYERS[stack] else 'other'}"


def group_names(encoder_layers: int, decoder_layers: int) -> list[str]:
    """Every group of the model in depth order: the same list on every rank, from the config alone."""
    names = []
    for stack, n in zip(STACKS, (encoder_layers, decoder_layers)):
        names += [f"{stack}.embed"] + [f"{stack}.{i}" for i in range(n)]
        names += [f"{stack}.{part}" for part in OUTSIDE_LAYERS[stack]]
    return names


@dataclass
class StackWarning:
    """How long a stack's bottom has been starved of gradient, and whether that was said."""

    intervals: int = 0
    said: bool = False


class HealthMonitor:
    """Per-group gradient norms (every step) and update ratios (at the steps asked for) of one rank's
    parameters, reduced to the whole model's on every rank.

    names: this rank's parameters' single-process names, in the order of the engine's parameter list; grid:
    the engine's (its tp and pp groups). Collective over tp and pp once, to learn which groups exist anywhere."""

    def __init__(
        self,
        names: list[str],
        encoder_layers: int,
        decoder_layers: int,
        grid=None,
        device: torch.device | str = "cpu",
        warn: Callable[[str], None] | None = None,
    ):
        self.grid = grid
        self.warn = warn or _to_stderr  # where a warning goes (rank 0's stderr; the engine silences the others)
        self.groups = group_names(encoder_layers, decoder_layers)
        index = {g: i for i, g in enumerate(self.groups)}
        self.group_of = [index[group_name(n)] for n in names]  # parameter i -> its group
        held = torch.zeros(len(self.groups), dtype=torch.float64, device=device)  # on the device: NCCL
        held[sorted(set(self.group_of))] = 1.0
        self._reduce(held)
        self.held = (held > 0).cpu()  # groups some rank holds (the others are left out of the records)
        self.measure_next = False  # set by the run loop: measure the update of the next step (a logged one)
        self.layers = {
            stack: [index[f"{stack}.{i}"] for i in range(n)]
            for stack, n in zip(STACKS, (encoder_layers, decoder_layers))
            if n > 0
        }
        self._grad_sum: torch.Tensor | None = None  # the interval's sum of per-group gradient norms
        self._steps = 0
        self._snapshot: list[torch.Tensor] | None = None
        self._update: torch.Tensor | None = None  # (2, groups): squared update and weight norms, last asked step
        self.warnings = {stack: StackWarning() for stack in self.layers}

    # --- every step -------------------------------------------------------------------------------------------
    def observe_gradients(self, sums_of_squares: torch.Tensor) -> None:
        """The step's per-group squared gradient norms (parallel/clip.py's global_sums_of_squares). Stays on the
        device: nothing is synchronised until the interval is read."""
        norms = sums_of_squares.detach().double().sqrt()
        self._grad_sum = norms if self._grad_sum is None else self._grad_sum + norms
        self._steps += 1

    # --- the steps the loop logs ------------------------------------------------------------------------------
    @torch.no_grad()
    def before_update(self, params: list[torch.Tensor]) -> None:
        """Copy the parameters before this step's update (called only on the steps that measure it)."""
        self._snapshot = [p.detach().clone() for p in params]

    @torch.no_grad()
    def after_update(self, params: list[torch.Tensor], tp_rank: int = 0) -> None:
        """Squared update and weight norms per group, summed over tp and pp (collective over both)."""
        if self._snapshot is None:
            return
        before, self._snapshot = self._snapshot, None
        device = before[0].device if before else torch.device("cpu")
        sums = torch.zeros(2, len(self.groups), dtype=torch.float64, device=device)
        idx = counted(params, tp_rank)
        if idx:
            delta = torch._foreach_sub([params[i].detach() for i in idx], [before[i] for i in idx])
            which = torch.tensor([self.group_of[i] for i in idx], device=device)
            sums[0].index_add_(0, which, torch.stack(torch._foreach_norm(delta)).double().square())
            sums[1].index_add_(0, which, torch.stack(torch._foreach_norm([before[i] for i in idx])).double().square())
        self._reduce(sums)
        self._update = sums

    def _reduce(self, t: torch.Tensor) -> None:
        """Sum over the tensor- and pipeline-parallel groups (every group's norms live on one stage)."""
        if self.grid is not None:
            for group in (self.grid.tp_group, self.grid.pp_group):
                if group is not None:
                    dist.all_reduce(t, group=group)

    def take_interval(self, step: int) -> dict | None:
        """The record of the interval that ends at `step` (and the warning check), then start a new interval.
        None when no step was observed. Every rank computes the same record."""
        if self._grad_sum is None:
            return None
        grad = (self._grad_sum / self._steps).cpu()
        self._grad_sum, self._steps = None, 0
        record = {"step": step, "grad_norm": self._by_group(grad)}
        if self._update is not None:
            upd, weight = self._update.cpu().sqrt()
            ratio = torch.where(weight > 0, upd / weight.clamp_min(1e-30), torch.zeros_like(upd))
            record["update_ratio"] = self._by_group(ratio)
            self._update = None
        self._check(grad, step)
        return record

    def _by_group(self, values: torch.Tensor) -> dict:
        """{"encoder": [per layer, bottom first], "decoder": [...], "encoder.embed": x, ...} rounded to 4 digits
        (groups the model does not hold are left out)."""
        out: dict = {stack: [_round(float(values[i])) for i in idx] for stack, idx in self.layers.items()}
        in_layers = {i for idx in self.layers.values() for i in idx}
        for i, g in enumerate(self.groups):
            if i not in in_layers and self.held[i]:
                out[g] = _round(float(values[i]))
        return out

    # --- the warning ------------------------------------------------------------------------------------------
    def _check(self, grad: torch.Tensor, step: int) -> None:
        for stack, idx in self.layers.items():
            if len(idx) < 2:
                continue
            bottom, top = float(grad[idx[0]]), float(grad[idx[-1]])
            w = self.warnings[stack]
            starved = top > 0 and math.isfinite(top) and bottom * WARN_RATIO < top
            w.intervals = w.intervals + 1 if starved else 0
            if not starved:
                w.said = False
            elif w.intervals >= WARN_INTERVALS and not w.said:
                w.said = True
                self.warn(stack_warning(stack, len(idx), bottom, top, w.intervals, step))


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def stack_warning(stack: str, layers: int, bottom: float, top: float, intervals: int, step: int) -> str:
    ratio = top / bottom if bottom > 0 else math.inf
    return (
        f"warning: step {step}: {stack} layer 0 gets {ratio:.3g}x less gradient than {stack} layer {layers - 1} "
        f"(norms {bottom:.3g} vs {top:.3g}) for {intervals} log intervals in a row: the lower {stack} has "
        "stopped learning; try a longer warmup (optim.warmup_updates), a lower learning rate (optim.lr) or "
        "gradient clipping (optim.clip_norm)"
    )


def _round(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x
