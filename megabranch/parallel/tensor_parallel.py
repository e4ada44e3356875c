"""Tensor-parallel layers, the vocabulary-parallel loss and the dropout RNG for split regions.

Layers (each holds 1/tp of a full layer; `tp_size`/`tp_rank` default to the group's):

    ColumnParallelLinear   weight rows split: y_local = x @ W_r^T + b_r (outputs split; e.g. heads, fc1)
    RowParallelLinear      weight columns split: y = all_reduce(x_r @ W_r^T) + b (inputs split; out_proj, fc2)
    VocabParallelEmbedding table rows split; out-of-shard ids masked to 0, then all-reduce
    VocabParallelOutput    logits for my vocabulary shard; optionally tied to a VocabParallelEmbedding's weight

Sharded parameters carry `tp_split_dim`, `tp_size`, `tp_rank` and `tp_full_shape`, so a checkpoint converter or
initialiser can map a shard to its slice of the full tensor (see parallelize.shard_of). Parameters every
tensor-parallel rank holds in full (RowParallelLinear's bias, and LayerNorms, marked by apply_tensor_parallel)
carry `tp_replicated = True`; their gradients are identical on every tensor-parallel rank, so they are not
all-reduced, and the global grad norm counts them once.

Dropout and random numbers
--------------------------
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
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp


def _resolve(group, tp_size, tp_rank) -> tuple[int, int]:
    if tp_size is None:
        tp_size = 1 if group is None else dist.get_world_size(group)
    if tp_rank is None:
        tp_rank = 0 if group is None else dist.get_rank(group)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside a tensor-parallel group of {tp_size}")
    return tp_size, tp_rank


def _divide(n: int, k: int, what: str) -> int:
    if n % k:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {k}")
    return n // k


def mark_shard(p: nn.Parameter, dim: int, tp_size: int, tp_rank: int, full_shape: tuple) -> nn.Parameter:
    """Record on `p` that it is slice tp_rank of tp_size along `dim` of a parameter shaped `full_shape`."""
    p.tp_split_dim, p.tp_size, p.tp_rank, p.tp_full_shape = dim, tp_size, tp_rank, tuple(full_shape)
    return p


class ColumnParallelLinear(nn.Module):
    """Linear layer whose output features are split over the tensor-parallel group (weight rows, bias split).

    in_features/out_features are the local shapes (weight.shape == (out_features, in_features)), as for the
    nn.Linear it replaces; full_out_features is the unsplit width. The input is replicated: its gradient is
    all-reduced (copy_to_tp). gather_output=True all-gathers the output (rarely wanted: it defeats the split).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group=None, tp_size=None,
                 tp_rank=None, gather_output: bool = False, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.tp_size, self.tp_rank = _resolve(group, tp_size, tp_rank)
        self.in_features, self.full_out_features = in_features, out_features
        self.out_features = _divide(out_features, self.tp_size, "out_features")
        self.gather_output = gather_output
        kw = dict(device=device, dtype=dtype)
        self.weight = mark_shard(nn.Parameter(torch.empty(self.out_features, in_features, **kw)), 0,
                                  self.tp_size, self.tp_rank, (out_features, in_features))
        self.bias = None
        if bias:
            self.bias = mark_shard(nn.Parameter(torch.empty(self.out_features, **kw)), 0, self.tp_size,
                                    self.tp_rank, (out_features,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (of {self.full_out_features}), "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}")


class RowParallelLinear(nn.Module):
    """Linear layer whose input features are split (weight columns); partial products are all-reduced, then the
    full, replicated bias is added once (so it is not counted tp times).

    input_is_parallel=False splits a replicated input first (scatter_to_tp).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group=None, tp_size=None,
                 tp_rank=None, input_is_parallel: bool = True, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.tp_size, self.tp_rank = _resolve(group, tp_size, tp_rank)
        self.full_in_features, self.out_features = in_features, out_features
        self.in_features = _divide(in_features, self.tp_size, "in_features")
        self.input_is_parallel = input_is_parallel
        kw = dict(device=device, dtype=dtype)
        self.weight = mark_shard(nn.Parameter(torch.empty(out_features, self.in_features, **kw)), 1,
                                  self.tp_size, self.tp_rank, (out_features, in_features))
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
            self.bias.tp_replicated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (of {self.full_in_features}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table with its rows (the vocabulary) split in contiguous blocks over the tensor-parallel group.

    Rank r holds ids [vocab_start, vocab_end); ids outside produce zeros there, and the all-reduce assembles the
    full lookup. num_embeddings is the FULL vocabulary (as nn.Embedding's, which Embedder reads); padding_idx
    keeps its nn.Embedding meaning (that row gets no gradient from the lookup) on the rank that owns it.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, group=None,
                 tp_size=None, tp_rank=None, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.tp_size, self.tp_rank = _resolve(group, tp_size, tp_rank)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        per = _divide(num_embeddings, self.tp_size, "num_embeddings")
        self.vocab_start, self.vocab_end = self.tp_rank * per, (self.tp_rank + 1) * per
        self.local_padding_idx = None
        if padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_end:
            self.local_padding_idx = padding_idx - self.vocab_start
        self.weight = mark_shard(nn.Parameter(torch.empty(per, embedding_dim, device=device, dtype=dtype)), 0,
                                  self.tp_size, self.tp_rank, (num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight, self.local_padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self.local_padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}), "
                f"padding_idx={self.padding_idx}, tp={self.tp_rank}/{self.tp_size}")


class VocabParallelOutput(nn.Module):
    """hidden (replicated) -> logits of my vocabulary shard (..., V / tp).

    Tied: uses `tied_to.weight` (a VocabParallelEmbedding of the same vocabulary split), held in a list so the
    table stays registered only where it belongs, like model.transformer.OutputProjection. Feed the shard to
    vocab_parallel_label_smoothed_nll_loss; set gather_output=True (e.g. for decoding) to get full logits.
    """

    def __init__(self, d_model: int, vocab_size: int, *, group=None, tp_size=None, tp_rank=None,
                 tied_to: VocabParallelEmbedding | None = None, gather_output: bool = False, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.tp_size, self.tp_rank = _resolve(group, tp_size, tp_rank)
        self.d_model, self.vocab_size = d_model, vocab_size
        per = _divide(vocab_size, self.tp_size, "vocab_size")
        self.gather_output = gather_output
        self._tied_table = []
        self.weight = None
        if tied_to is not None:
            if tuple(tied_to.weight.shape) != (per, d_model) or tied_to.tp_rank != self.tp_rank:
                raise ValueError(f"cannot tie a ({per}, {d_model}) output shard of rank {self.tp_rank} to "
                                 f"{tuple(tied_to.weight.shape)} of rank {tied_to.tp_rank}")
            self._tied_table = [tied_to]
        else:
            self.weight = mark_shard(nn.Parameter(torch.empty(per, d_model, device=device, dtype=dtype)), 0,
                                      self.tp_size, self.tp_rank, (vocab_size, d_model))

    @property
    def tied_to(self) -> VocabParallelEmbedding | None:
        return self._tied_table[0] if self._tied_table else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.tied_to is None else self.tied_to.weight
        logits = F.linear(copy_to_tp(x, self.group), w)
        return gather_from_tp(logits, self.group) if self.gather_output else logits

    def extra_repr(self) -> str:
        return f"{self.d_model} -> {self.vocab_size} / {self.tp_size}, tied={self.tied_to is not None}"


# --- the vocabulary-parallel label-smoothed loss ---------------------------------------------------------


class _VocabParallelLSLoss(torch.autograd.Function):
    """Label-smoothed NLL on vocabulary-sharded logits; fp32 math; saves only the local softmax shard.

    Per token, with lse = logsumexp over the FULL vocabulary V:
        nll = lse - x_t            smooth = -sum_j logp_j = V * lse - sum_j x_j
    The max (for stability), sum(exp), the target logit and sum(x) are combined across ranks with all-reduces.
    Backward needs no communication: d nll/dx_j = p_j - [j = t], d smooth/dx_j = V p_j - 1, and every rank
    computes the (replicated) loss, so each rank's shard gradient is complete.
    """

    @staticmethod
    def forward(ctx, logits, target, epsilon, ignore_index, group):
        x = logits.float()
        tp = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        n_local = x.shape[-1]
        vocab = n_local * tp
        start = rank * n_local
        m = x.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = (x - m.unsqueeze(-1)).exp_()
        t_local = target - start
        own = (t_local >= 0) & (t_local < n_local)
        idx = t_local.masked_fill(~own, 0)
        t_logit = torch.where(own, x.gather(-1, idx.unsqueeze(-1)).squeeze(-1), torch.zeros((), device=x.device))
        sums = torch.stack([e.sum(-1), t_logit, x.sum(-1)])
        if group is not None:
            dist.all_reduce(sums, group=group)
        sum_exp, t_logit, sum_x = sums.unbind(0)
        lse = m + sum_exp.log()
        keep = target.ne(ignore_index)
        zero = torch.zeros((), device=x.device)
        nll_sum = torch.where(keep, lse - t_logit, zero).sum()
        smooth_sum = torch.where(keep, vocab * lse - sum_x, zero).sum()
        eps_i = epsilon / (vocab - 1)
        loss = (1.0 - epsilon - eps_i) * nll_sum + eps_i * smooth_sum
        e.div_(sum_exp.unsqueeze(-1))  # now the softmax over the full vocabulary, restricted to my shard
        ctx.save_for_backward(e, idx, own, keep)
        ctx.coef, ctx.vocab, ctx.dtype = (1.0 - epsilon - eps_i, eps_i), vocab, logits.dtype
        return loss, nll_sum

    @staticmethod
    def backward(ctx, g_loss, g_nll):
        p, idx, own, keep = ctx.saved_tensors
        c_nll, eps_i = ctx.coef
        a = g_loss * c_nll + g_nll  # coefficient of (p - onehot)
        b = g_loss * eps_i  # coefficient of (V p - 1)
        grad = p * (a + b * ctx.vocab) - b
        onehot = torch.zeros_like(grad).scatter_(-1, idx.unsqueeze(-1), own.unsqueeze(-1).to(grad.dtype))
        grad = (grad - a * onehot) * keep.unsqueeze(-1).to(grad.dtype)
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_label_smoothed_nll_loss(logits_shard: torch.Tensor, target: torch.Tensor, epsilon: float,
                                           ignore_index: int = 0, group=None):
    """-> (loss_sum, nll_sum), equal to megabranch.model.label_smoothed_nll_loss on the gathered logits.

    logits_shard (..., V / tp) is this rank's contiguous block of the vocabulary (as VocabParallelOutput makes);
    target (...) holds full-vocabulary ids. Both results are replicated on every rank of `group`; gradients
    flow to the local shard only (complete, no communication in backward). group=None: one process.
    """
    return _VocabParallelLSLoss.apply(logits_shard, target, float(epsilon), ignore_index, group)


# --- dropout RNG for tensor-parallel regions -------------------------------------------------------------


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
        try:
            yield
        finally:
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

    Installed from outside with forward hooks (the model code stays ignorant of tensor parallelism). Idempotent.
    """
    if getattr(module, "_megabranch_rng_fork", None) is not None:
        return
    stack: list = []
    module._megabranch_rng_fork = stack

    def pre(mod, args):
        cm = _TRACKER.fork(name) if mod.training and draws_random(mod) else None
        if cm is not None:
            cm.__enter__()
        stack.append(cm)

    def post(mod, args, out):
        if stack:
            cm = stack.pop()
            if cm is not None:
                cm.__exit__(None, None, None)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post, always_call=True)


def checkpoint(function, *args, **kwargs):
    """Activation recomputation that also replays the tracker: torch.utils.checkpoint (non-reentrant, default
    RNG state preserved) plus the tracker's states restored for the recompute, so split-region dropout masks
    in the recomputed forward equal the original ones.
    """
    saved = _TRACKER.get_states()

    def context_fn():
        return contextlib.nullcontext(), _TRACKER.restored(saved)

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
