"""Dropout and random numbers for tensor-parallel regions, and the activation recomputation that replays them.

Regions whose activations are split across tensor-parallel ranks (attention probabilities of my heads, the fc1
activation of my FFN columns) must draw DIFFERENT masks on different ranks, or the heads of rank 1 would reuse
rank 0's masks. Regions whose activations are replicated (embedding dropout, the residual dropout on F(x)) must
draw the SAME mask on every rank, or the ranks' copies of the hidden state would diverge. So:

  * the default torch generator is seeded identically on every rank of a tensor-parallel group and drives the
    replicated regions, exactly as in a single process;
  * an RNG tracker keeps a second, forked generator state seeded by (seed, tp_rank), swapped in only while a
    split region runs (`with get_rng_tracker().fork(): ...`; apply_tensor_parallel installs this around every
    MultiheadAttention and FeedForward forward whose dropout is non-zero in training mode).

What is and is not identical to the single-process model (tp only, no pipeline, same batch, same seed):
  * dropout = embedding + residual dropout only (attention_dropout = activation_dropout = 0): identical masks,
    so identical results up to float summation order (the all-reduces add partial sums in another order).
  * attention_dropout or activation_dropout > 0: those masks come from the forked generator, so they differ from
    the single process's (statistically equivalent, not bit-equal); and because the single process draws them
    from its default generator, its later residual masks shift too, while tp > 1 leaves the default stream
    untouched by split regions. The tp run is still reproducible for a given (seed, tp).
  * with pipeline stages or data parallelism, model_parallel_seed derives a different default seed per
    (pp_rank, dp_rank), so masks never repeat across stages/replicas; they are not the single process's.
  * evaluation (model.eval()) has no randomness: identical up to summation order everywhere.
Activation recomputation must use `checkpoint` below (not torch.utils.checkpoint directly): it restores the
tracker state too, so the recomputed split-region masks equal the original ones.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.utils.checkpoint
from torch import nn


def _derive_seed(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _cuda_tracked() -> bool:
    return torch.cuda.is_available()


class RNGTracker:
    """Named generator states that can be swapped in for the default generator (CPU, and CUDA when present).

    `fork(name)` saves the default state, installs the named one, runs the block, stores the advanced named
    state and restores the default: the default stream is untouched by whatever is drawn inside.
    """

    def __init__(self):
        self._states: dict[str, dict] = {}
        self._forked: set[str] = set()  # the states swapped in now (a fork inside a fork of one name: no-op)

    def reset(self) -> None:
        self._states = {}

    def add(self, name: str, seed: int) -> None:
        state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if _cuda_tracked():
            saved = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(seed)
            state["cuda"] = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(saved)
        self._states[name] = state

    def has(self, name: str) -> bool:
        return name in self._states

    def get_states(self) -> dict:
        return {k: {d: s.clone() for d, s in v.items()} for k, v in self._states.items()}

    def set_states(self, states: dict) -> None:
        self._states = {k: {d: s.clone() for d, s in v.items()} for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = "tp"):
        """Reentrant: inside a fork of `name` (sequence parallelism forks a whole sub-layer, whose attention or FFN
        forks again), the inner one draws on from the same state instead of restarting it."""
        if name in self._forked:
            yield
            return
        if name not in self._states:
            raise RuntimeError(
                f"no RNG state {name!r}: call megabranch.parallel.tensor_parallel.model_parallel_seed(seed, grid) "
                "before training a tensor-parallel model with attention/activation dropout"
            )
        state = self._states[name]
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state() if "cuda" in state else None
        torch.set_rng_state(state["cpu"])
        if saved_cuda is not None:
            torch.cuda.set_rng_state(state["cuda"])
        self._forked.add(name)
        try:
            yield
        finally:
            self._forked.discard(name)
            state["cpu"] = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if saved_cuda is not None:
                state["cuda"] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)

    @contextlib.contextmanager
    def restored(self, states: dict):
        """Run a block with the tracker set to `states`, then put back what it held (used by recomputation)."""
        current = self.get_states()
        self.set_states(states)
        try:
            yield
        finally:
            self._states = current


_TRACKER = RNGTracker()


def get_rng_tracker() -> RNGTracker:
    return _TRACKER


def model_parallel_seed(seed: int, grid=None, distinct_dp: bool = True) -> None:
    """Seed the default generator and the tracker's "tp" state for this rank of `grid`.

    Default generator: `seed` itself on pipeline stage 0 / data-parallel replica 0 (so a tp-only run draws the
    single process's replicated-region masks after torch.manual_seed(seed)); a seed derived from (seed,
    pp_rank, dp_rank) elsewhere, the same on every rank of a tensor-parallel group. distinct_dp=False gives all
    data-parallel replicas the same streams. "tp" state: derived from (seed, tp_rank, pp_rank, dp_rank).
    """
    tp_rank = grid.tp_rank if grid is not None else 0
    pp_rank = grid.pp_rank if grid is not None else 0
    dp_rank = (grid.dp_rank if grid is not None else 0) if distinct_dp else 0
    default = seed if (pp_rank, dp_rank) == (0, 0) else _derive_seed(seed, "default", pp_rank, dp_rank)
    torch.manual_seed(default)
    _TRACKER.reset()
    _TRACKER.add("tp", _derive_seed(seed, "tp", tp_rank, pp_rank, dp_rank))


def install_rng_fork(module: nn.Module, draws_random, name: str = "tp") -> None:
    """Run `module`'s forward under tracker.fork(name) whenever it is training and draws_random(module) is True.

    Installed from outside (the model code stays ignorant of tensor parallelism) by giving `module` a subclass of
    its class whose forward forks: one subclass per class, so every layer of a kind runs the same code and
    torch.compile traces one graph per kind. Per-module forward hooks did the same job, but each registration has
    its own hook id, which Dynamo guards on: every layer compiled a graph of its own. Idempotent.
    """
    if getattr(module, "_megabranch_rng_fork", None) is not None:
        return
    module._megabranch_rng_fork = (name, draws_random)
    own = module.__dict__.get("forward")
    if own is not None:  # an instance's own forward (sequence parallelism's embedding split) shadows the class's

        def run(_module, *args, **kwargs):
            return own(*args, **kwargs)

        module.forward = lambda *args, **kwargs: _forked(module, run, *args, **kwargs)
    else:
        module.__class__ = _forking_class(type(module))


def _forked(module: nn.Module, forward, *args, **kwargs):
    """forward(module, *args, **kwargs), under the tracker's fork when `module` draws random numbers."""
    name, draws_random = module._megabranch_rng_fork
    if module.training and draws_random(module):
        with _TRACKER.fork(name):
            return forward(module, *args, **kwargs)
    return forward(module, *args, **kwargs)


_FORKING: dict[type, type] = {}  # a module class -> its subclass whose forward runs under the tracker's fork


def _forking_class(cls: type) -> type:
    if cls not in _FORKING:

        def forward(self, *args, **kwargs):
            return _forked(self, cls.forward, *args, **kwargs)

        forked = type(f"RngForked{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
        globals()[forked.__name__] = forked  # importable by name, so a module holding it still pickles
        _FORKING[cls] = forked
    return _FORKING[cls]


def checkpoint(function, *args, **kwargs):
    """Activation recomputation that also replays the tracker: torch.utils.checkpoint (non-reentrant, default
    RNG state preserved) plus the tracker's states restored for the recompute, so split-region dropout masks
    in the recomputed forward equal the original ones.
    """
    saved = _TRACKER.get_states()

    def context_fn():
        return contextlib.nullcontext(), _TRACKER.restored(saved)

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
