"""The single-process reference and comparisons against it: step-seeded synthetic batches, the one-process
Trainer's losses and weights on them, a parallel trainer's losses on its share, the tolerances that say "the same
training", and an audit of the alpha every chunk uses."""

from __future__ import annotations

import dataclasses
import math

import torch

from megabranch.config import Config, ParallelConfig
from megabranch.model import canonical_parameters, draw_init_seed
from megabranch.parallel.grid import Grid
from megabranch.parallel.parallelize import shard_of
from megabranch.residual import alpha_at
from megabranch.training.engine import Trainer
from megabranch.training.lr_schedule import inverse_sqrt_lr

from .configs import VOCAB
from .env import one_thread


def synthetic_batches(step: int, n: int, vocab: int = VOCAB) -> list[dict]:
    """n micro-batches whose batch size, source and target lengths and padding all vary (step-seeded)."""
    g = torch.Generator().manual_seed(7919 * step + 13)
    out = []
    for _ in range(n):
        b, s, t = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((2, 5), (3, 10), (3, 10)))
        src = torch.randint(4, vocab, (b, s), generator=g)
        tgt = torch.randint(4, vocab, (b, t), generator=g)
        for row in range(b):
            src[row, int(torch.randint(1, s + 1, (1,), generator=g)) :] = 0
            tgt[row, int(torch.randint(1, t + 1, (1,), generator=g)) :] = 0
        prev = torch.cat([torch.full((b, 1), 2), tgt[:, :-1]], 1)
        out.append({"src_tokens": src, "prev_output_tokens": prev, "target": tgt, "ntokens": int(tgt.ne(0).sum())})
    return out


def single_trainer(cfg: Config, seed: int = 0, params: dict | None = None) -> Trainer:
    """The one-process Trainer (the 1 x 1 x 1 grid) on the CPU, its model built with `seed` (then loaded with
    `params`, single-process names, if given). Its parallel settings are ignored."""
    one = dataclasses.replace(cfg, parallel=ParallelConfig())
    tr = Trainer(one, VOCAB, grid=Grid(), init_seed=seed)
    if params is not None:
        with torch.no_grad():
            for name, p in tr.named_params().items():
                p.copy_(params[name])
    return tr


def reference_run(cfg: Config, steps: int, dp: int = 1) -> tuple[list[float], dict]:
    """The single-process Trainer on the global batches (dp * update_freq micro-batches per step)."""
    with one_thread():
        tr = single_trainer(cfg, seed=draw_init_seed(cfg.seed))
        losses = [tr.train_step(synthetic_batches(s, cfg.optim.update_freq * dp))["loss"] for s in range(steps)]
    return losses, {k: v.detach().clone() for k, v in tr.named_params().items()}


def parallel_losses(tr, steps: int, start: int = 0) -> list[float]:
    """Run a parallel Trainer on this replica's share of the same global batches."""
    dp, r = tr.grid.dp, tr.grid.dp_rank
    m = tr.cfg.optim.update_freq
    return [tr.train_step(synthetic_batches(s, m * dp)[r::dp])["loss"] for s in range(start, steps)]


def assert_matches(tr, losses: list[float], ref: tuple, what: str) -> None:
    """Per-step losses within 1e-5 relative, and this rank's parameters (tensor-parallel slices) equal to the
    single-process ones: every tensor within 1e-5 of its scale plus 1e-3 of the distance Adam can move it (the sum
    of the step sizes; a wrong gradient moves a parameter by ~lr per step), except the key biases. Softmax is
    invariant to
    a shift of all keys, so a key bias has an exactly zero gradient; in float32 it gets rounding noise that
    Adam's normalisation turns into steps of up to lr, different noise in every layout. They are held to what
    Adam can move two copies apart (2 * sum of the step sizes); all the others together to 1e-5 in relative L2."""
    travel = sum(inverse_sqrt_lr(t, tr.cfg.optim) for t in range(len(losses)))
    key_bias_tol = 2 * travel

    ref_losses, ref_params = ref
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}: step {step} loss {a} vs single-process {b}"
    assert len(losses) == len(ref_losses)
    diff2 = norm2 = 0.0
    for name, p in canonical_parameters(tr.model, tr.cfg.model).items():
        r = shard_of(ref_params[name], p)
        err = float((p.detach() - r).abs().max())
        key_bias = name.endswith("k_proj.bias")
        tol = key_bias_tol if key_bias else 1e-5 * float(r.abs().max()) + 1e-3 * travel
        assert err <= tol, f"{what}: parameter {name} differs by {err:.3g} (tolerance {tol:.3g})"
        if not key_bias:
            diff2 += float((p.detach() - r).double().square().sum())
            norm2 += float(r.double().square().sum())
    assert math.sqrt(diff2 / norm2) < 1e-5, f"{what}: parameters differ by {math.sqrt(diff2 / norm2):.3g} (relative L2)"


def assert_rel(a, b, what, rel=1e-5, floor=0.0):
    """max |a - b| <= rel * max(max |b|, floor); `floor` keeps gradients that are zero in exact arithmetic (k_proj's
    bias: softmax ignores a per-query constant) from being judged by their rounding noise alone."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err, scale = (a - b).abs().max().item(), max(b.abs().max().item(), floor)
    assert err <= rel * scale + 1e-12, f"{what}: max error {err:.3g} vs reference max {scale:.3g}"


class AlphaAudit:
    """Records the alpha each stack of each of a trainer's chunks holds in every forward and, through a hook on
    the chunk's output, in every backward: (phase "F" / "B", chunk index in the pipeline, stack, alpha)."""

    def __init__(self, tr):
        self.cfg, self.records = tr.cfg, []
        self.specs = tr.layout.chunks_of_rank(tr.grid.pp_rank)
        self.handles = [chunk.register_forward_hook(self._hook(v)) for v, chunk in enumerate(tr.model)]

    def _record(self, phase: str, v: int, chunk) -> None:
        for name in ("encoder", "decoder"):
            stack = getattr(chunk, name)
            if len(stack.layers):
                self.records.append((phase, self.specs[v].index, name, float(stack.coeffs.branch_scale)))

    def _hook(self, v: int):
        def hook(chunk, args, out):
            self._record("F", v, chunk)
            last = out if torch.is_tensor(out) else out[-1]
            if torch.is_grad_enabled() and last.requires_grad:
                last.register_hook(lambda g: self._record("B", v, chunk))

        return hook

    def errors(self, step: int) -> list[str]:
        """Every record since the last clear() must show alpha_at(step)."""
        mc = self.cfg.model
        want = alpha_at(step, mc.alpha_warmup_steps, mc.alpha_schedule) if mc.residual == "branchnorm" else 1.0
        return [
            f"chunk {c} {stack} {phase}: alpha {alpha} at step {step} (want {want})"
            for phase, c, stack, alpha in self.records
            if abs(alpha - want) > 1e-7
        ]
