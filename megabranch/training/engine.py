"""`Trainer`: the native engine (training.protocol.Engine) over a tensor x pipeline x data-parallel grid. One
process is the 1 x 1 x 1 grid of the same code: no process group, one chunk holding the whole model.

One optimizer step, top to bottom (Trainer.train_step; every rank runs the same code):
  1. sync_step: the global step t is broadcast from global rank 0 (its owner) to every stage and replica, BEFORE
     any micro-batch; every chunk's ResidualCoefficients is set from it, so every forward and backward of every
     micro-batch of the step, on every stage, uses alpha_t (a chunk that lagged would use alpha_{t-1}:
     tests/test_engine.py checks for exactly that); the learning rate of step t is set (optimizer.set_lr);
  2. the step's target tokens are summed over the data-parallel replicas; each micro-batch's loss is multiplied
     by loss_scale / that global count, so summing gradients over replicas gives the single-process gradient;
  3. the pipeline schedule runs this replica's micro-batches (parallel/executor.py; on one stage: forward and
     backward of each micro-batch in turn) under the precision's autocast; the data-parallel all-reduce of
     gradients is armed for the last micro-batch (overlapped with its backward, or under a zero-bubble schedule
     with its W, the weight-gradient half of the backward: parallel/weight_grad.py);
  4. reduce_gradients: the buckets finish, and tied embedding tables held by several pipeline stages get their
     gradients summed over the embedding group; under sequence parallelism (parallel/sequence_parallel.py) the
     replicated parameters used on sequence slices (the norms, ...) get theirs summed over the tp group;
  5. clip_and_step: the loss scale is taken off, the global gradient norm (tp x pp, each element once) is
     measured and clipped; global rank 0 decides whether the step is skipped (non-finite norm) and broadcasts
     that decision; the loss scaler learns it; the optimizer steps (AdamW, or ZeRO-1 ShardedAdamW with
     parallel.zero); t += 1.

Precision (training/precision.py): bf16 / fp16 run the chunks under autocast, and activations and their
gradients cross pipeline stages in that dtype (half the bytes of fp32). fp16 adds dynamic loss scaling: the
overflow check is step 5's global norm: one inf or nan gradient on any stage or replica makes it non-finite on
every rank (the data-parallel all-reduce spreads it over the replicas, the norm's all-reduce over tp and pp),
rank 0's skip decision is broadcast, and every rank updates its scaler with that one decision, so all skip
together and all scalers agree. With model.compile, every layer of every chunk is compiled
(model/regional_compile.py); the first step's stats carry its time (compile_s) and the graphs compiled.

Statistics (loss, nll_loss per target token) are the sums over all micro-batches and replicas divided by the
global token count, identical on every rank.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

from .. import checkpoint
from ..config import Config
from ..model import build_model_from, canonical_parameters, count_parameters, draw_init_seed
from ..model.regional_compile import FirstStepTimer, compile_layers
from ..parallel.clip import clip_by_norm_, global_sums_of_squares
from ..parallel.data_parallel import GradReducer
from ..parallel.executor import MicroBatch, PipelineExecutor
from ..parallel.gather import fits_on_rank0, free_memory_bytes, full_model_bytes, gather_to_rank0
from ..parallel.grid import Grid, build_grid, rank_of
from ..parallel.layout import Layout
from ..parallel.schedules import check_schedule, placement_of
from ..parallel.sequence_parallel import reduce_sequence_parallel_grads
from ..parallel.stage import build_stage
from ..parallel.tensor_parallel import model_parallel_seed
from ..planning.partition import plan_layout
from ..residual import current_alpha, set_step
from .health import HealthMonitor
from .native_checkpoint import NativeCheckpoints
from .optimizer import build_optimizer, set_lr
from .precision import Precision
from .protocol import step_stats


class Trainer:
    """Owns this rank's model chunks (`.model`: slices of the model; the whole model on one process), its
    optimizer (shard) and the step counter (`.step`, the broadcast copy of global rank 0's). Implements
    training.protocol.Engine.

    grid: the process grid (default: built from cfg.parallel over the initialised process group, or 1 x 1 x 1
    without one). init_seed: the weights' seed (default: drawn from cfg.seed, the same for every layout)."""

    def __init__(
        self,
        cfg: Config,
        vocab_size: int,
        tgt_vocab_size: int | None = None,
        device: torch.device | str = "cpu",
        grid: Grid | None = None,
        init_seed: int | None = None,
        vocab_sha256: str | None = None,
    ):
        p, o = cfg.parallel, cfg.optim
        self.cfg, self.device = cfg, torch.device(device)
        self.precision = Precision(o.precision, self.device)
        self.grid = grid if grid is not None else build_grid(p.tp, p.pp, p.vpp, p.timeout_s)
        g = self.grid
        check_schedule(p.schedule, g.pp, g.vpp, o.update_freq)
        vocab, tgt_vocab = vocab_size, tgt_vocab_size or vocab_size
        self.vocab_sizes = (vocab, tgt_vocab)
        self.rank, self.data_shards, self.data_shard = g.rank, g.dp, g.dp_rank
        self.layout: Layout = plan_layout(
            cfg.model,
            g.pp,
            g.vpp,
            vocab,
            tgt_vocab,
            g.tp,
            layout=p.layout,
            by=p.balance,
            recompute=p.recompute,
            placement=placement_of(p.schedule),
            sequence_parallel=p.sequence_parallel,
        )
        if init_seed is None:
            init_seed = draw_init_seed(cfg.seed)
        self.model = build_stage(
            cfg.model,
            self.layout,
            g,
            vocab,
            tgt_vocab,
            seed=init_seed,
            device=self.device,
            recompute=p.recompute,
            sequence_parallel=p.sequence_parallel,
        )
        self.seq_split = g.tp if p.sequence_parallel else 1  # the hiddens hold 1/seq_split of each sequence
        model_parallel_seed(cfg.seed, g)  # dropout streams: same on a tp group, distinct per stage / replica
        if cfg.model.compile:
            compile_layers(
                self.model, cfg.model.compile_backend, self.device, cfg.model.fused_kernels, cfg.model.compile_dynamic
            )
        self.first_step = FirstStepTimer(cfg.model.compile)
        self.params = list(canonical_parameters(self.model, cfg.model).values())
        self.embedding_groups = self._embedding_groups()
        self._build_reducers()
        self.optimizer = build_optimizer(self.params, o, g.dp_group, zero=p.zero)
        self.executor = PipelineExecutor(
            self.model,
            self.layout,
            g,
            p.schedule,
            cfg.model.d_model,
            dtype=self.precision.activation_dtype,
            label_smoothing=o.label_smoothing,
        )
        self.executor.on_last_backward = lambda v, ready: self.reducers[v].arm(ready)
        m = cfg.model
        quiet = None if self.rank == 0 else (lambda line: None)  # rank 0 says it
        self.health = (
            HealthMonitor(list(self.named_params()), m.encoder_layers, m.decoder_layers, g, self.device, quiet)
            if cfg.log.health
            else None
        )
        self.checkpoints = NativeCheckpoints(
            cfg, self.model, self.optimizer, self.precision, self.position(), self.vocab_sizes, vocab_sha256, self.rank
        )
        self.step = 0
        self._model_bytes: int | None = None
        self._whole_model_skip_said = False

    # --- set-up ------------------------------------------------------------------------------------------------
    def _embedding_groups(self) -> list:
        """(parameter, group) for each tied table this rank holds that more than one pipeline stage holds: a
        process group per (tp, dp) pipeline over the stages with a copy. Every rank creates every group, in the
        same order (new_group is collective)."""
        g, lay, mc = self.grid, self.layout, self.cfg.model
        holders = {"encoder": set(lay.ranks_holding("src_embed")), "decoder": set(lay.ranks_holding("tgt_embed"))}
        if mc.share_decoder_input_output_embed:
            holders["decoder"] |= set(lay.ranks_holding("output"))
        if mc.share_all_embeddings:
            holders = {"encoder": holders["encoder"] | holders["decoder"]}
        names = {"encoder": "encoder.embed.table.weight", "decoder": "decoder.embed.table.weight"}
        mine = canonical_parameters(self.model, mc)
        groups: list = []
        for key in sorted(holders):
            stages = sorted(holders[key])
            if len(stages) < 2:
                continue
            for t in range(g.tp):
                for d in range(g.dp):
                    ranks = [rank_of(t, d, s, g.tp, g.dp) for s in stages]
                    group = dist.new_group(ranks, timeout=g.timeout)
                    if g.rank in ranks:
                        groups.append((mine[names[key]], group))
        return groups

    def _build_reducers(self) -> None:
        """One data-parallel gradient reducer per chunk, armed right before that chunk's last backward (chunks
        finish at different times), and one for the shared tables: a table used by two local chunks gets two
        backward contributions per micro-batch, and a table tied across stages is summed over its embedding
        group first, so both are reduced after the schedule, never from a backward hook."""
        p, g = self.cfg.parallel, self.grid
        users: dict = {}
        for ch in self.model:
            for i in {id(x) for x in ch.parameters()}:
                users[i] = users.get(i, 0) + 1
        tied = {id(q) for q, _ in self.embedding_groups}
        shared = [q for q in self.params if users.get(id(q), 0) > 1 or id(q) in tied]
        shared_ids = {id(q) for q in shared}
        self.reducers = [
            GradReducer([q for q in ch.parameters() if id(q) not in shared_ids], g.dp_group, p.bucket_mb, p.overlap)
            for ch in self.model
        ]
        self.shared_reducer = GradReducer(shared, g.dp_group, p.bucket_mb, overlap=False)

    # --- collectives on a few numbers --------------------------------------------------------------------------
    def _distributed(self) -> bool:
        """Whether the grid spans several processes (a 1 x 1 x 1 grid inside a larger job talks to nobody)."""
        return self.grid.world > 1

    def _broadcast(self, values: list[float]) -> list:
        """Global rank 0's values, on every rank."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # on the device: NCCL needs it there
        if self._distributed():
            dist.broadcast(t, src=0)
        return t.tolist()

    def _sum(self, values: list[float], group="world") -> list[float]:
        """Sums over the world, or over `group` (None: a dimension of size 1, nothing to sum)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if group == "world":
            if self._distributed():
                dist.all_reduce(t)
        elif group is not None:
            dist.all_reduce(t, group=group)
        return t.tolist()

    def max_over_ranks(self, value: int) -> int:
        """Collective over the world: the largest value any rank passed."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        if self._distributed():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # --- one step ------------------------------------------------------------------------------------------------
    def sync_step(self) -> int:
        """Broadcast the step from its owner (global rank 0) and point every local stack at it."""
        (step,) = self._broadcast([float(self.step)])
        self.step = int(step)
        for ch in self.model:
            set_step(ch, self.step)
        return self.step

    def _microbatches(self, batches: list[dict]) -> list[MicroBatch]:
        return [MicroBatch.from_batch(i, b, self.device, self.seq_split) for i, b in enumerate(batches)]

    def _global_tokens(self, batches: list[dict]) -> int:
        """Target tokens of the step's batches over every data-parallel replica."""
        (ntokens,) = self._sum([float(sum(int(b["ntokens"]) for b in batches))], self.grid.dp_group)
        return int(ntokens)

    def _world_loss_sums(self, loss_sum: float, nll_sum: float) -> list[float]:
        """The step's (loss, nll) sums over the world: only the tp-rank-0 copy of the stage holding the output
        (the last stage; rank 0 under the V placement) contributes."""
        owns = self.grid.pp_rank in self.layout.ranks_holding("output") and self.grid.tp_rank == 0
        return self._sum([loss_sum, nll_sum] if owns else [0.0, 0.0])

    def reduce_gradients(self) -> None:
        """Finish the data-parallel buckets; sum the tied tables over their embedding groups, then reduce them;
        under sequence parallelism sum over the tp group the gradients of the replicated parameters that each tp
        rank used on its own positions only (the norms, row-parallel biases, ...: parallel/sequence_parallel.py)."""
        for reducer in self.reducers:
            reducer.finish()
        for param, group in self.embedding_groups:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=group)
        self.shared_reducer.finish()
        if self.seq_split > 1:
            reduce_sequence_parallel_grads(self.params, self.grid.tp_group)

    def clip_and_step(self) -> tuple[float, bool]:
        """Unscale, measure and clip the global gradient norm, skip the update when it is not finite (global rank
        0's decision, shared by every rank), step the optimizer, clear the gradients -> (norm, skipped). The
        norm's per-layer parts feed the health monitor (training/health.py), which also measures the update of
        the steps the loop logs."""
        o, health = self.cfg.optim, self.health
        self.precision.unscale_(self.params)
        if health is None:
            sums = global_sums_of_squares(self.params, self.grid)
        else:
            sums = global_sums_of_squares(self.params, self.grid, health.group_of, len(health.groups))
            health.observe_gradients(sums)
        gnorm = math.sqrt(float(sums.sum()))  # inf and nan pass through
        clip_by_norm_(self.params, gnorm, o.clip_norm if o.clip_norm > 0 else float("inf"))
        (skip,) = self._broadcast([0.0 if math.isfinite(gnorm) else 1.0])
        skipped = bool(skip)
        self.precision.update(skipped)  # the same decision on every rank: every scaler keeps the same state
        measure = health is not None and health.measure_next and not skipped
        if measure and health is not None:
            health.before_update(self.params)
        if not skipped:
            self.optimizer.step()
        if measure and health is not None:
            health.after_update(self.params, self.grid.tp_rank)
        for reducer in self.reducers + [self.shared_reducer]:  # every parameter is in exactly one
            reducer.zero_grad()  # dp > 1: one fill_ per bucket (the .grad are views into it); dp == 1: None
        return gnorm, skipped

    def train_step(self, batches: list[dict]) -> dict:
        self.model.train()
        step = self.sync_step()
        alpha = current_alpha(self.model)
        lr = set_lr(self.optimizer, step, self.cfg.optim)
        ntokens = self._global_tokens(batches)
        with self.precision.autocast(), self.first_step.first_step():
            loss_sum, nll_sum = self.executor.run(self._microbatches(batches), self.precision.loss_scale / ntokens)
        self.reduce_gradients()
        gnorm, skipped = self.clip_and_step()
        self.step += 1
        loss_sum, nll_sum = self._world_loss_sums(loss_sum, nll_sum)
        return {**step_stats(loss_sum, nll_sum, ntokens, lr, alpha, gnorm, skipped), **self.first_step.take()}

    @torch.no_grad()
    def valid_loss(self, batches) -> dict:
        """Collective: every rank passes its data-parallel shard of the validation batches; the alpha is that of
        the step the next update would take."""
        self.model.eval()
        batches = list(batches)
        self.sync_step()
        ntokens = self._global_tokens(batches)
        with self.precision.autocast():
            loss_sum, nll_sum = self.executor.run(self._microbatches(batches), 1.0, forward_only=True)
        loss_sum, nll_sum = self._world_loss_sums(loss_sum, nll_sum)
        return {"loss": loss_sum / max(ntokens, 1), "nll_loss": nll_sum / max(ntokens, 1)}

    # --- the rest of the protocol ----------------------------------------------------------------------------------
    def describe(self) -> str:
        m = self.cfg.model
        where = (
            f"{count_parameters(self.model) / 1e6:.2f}M parameters"
            if self.grid.world == 1
            else f"{self.grid.describe()}, stages {self.layout}"
        )
        return f"{m.residual} {m.encoder_layers}L-{m.decoder_layers}L d={m.d_model}, {where}, device {self.device}"

    def alpha(self) -> float:
        return current_alpha(self.model)

    def whole_model(self):
        """Collective. The whole single-process model on global rank 0, None on the other ranks. Without tensor or
        pipeline parallelism that is rank 0's own model; otherwise it is gathered (parallel/gather.py), or None
        everywhere when it does not fit twice into rank 0's memory (said once)."""
        g = self.grid
        if g.tp == 1 and g.pp == 1:
            return self.model[0] if self.rank == 0 else None
        if self._model_bytes is None:
            self._model_bytes = full_model_bytes(self.cfg.model, *self.vocab_sizes)
        free = free_memory_bytes(self.device)
        (fits,) = self._broadcast([float(fits_on_rank0(self._model_bytes, free))])  # rank 0's memory decides
        if not fits:
            if self.rank == 0 and not self._whole_model_skip_said:
                self._whole_model_skip_said = True
                print(
                    f"validation BLEU off: the whole model ({self._model_bytes / 2**30:.2f} GiB fp32) does not fit "
                    f"twice into rank 0's free {free / 2**30:.2f} GiB; decode a saved step directory with "
                    "megabranch-generate",
                    file=sys.stderr,
                )
            return None
        full = gather_to_rank0(self.named_params(), self.grid, self.device)
        if full is None:
            return None
        with torch.device(self.device):
            return build_model_from(self.cfg.model, *self.vocab_sizes, full, self.step, "the gathered model")

    # --- checkpoints (one shard per rank: training/native_checkpoint.py) ---------------------------------------
    has_checkpoints = staticmethod(checkpoint.has_checkpoints)

    def named_params(self) -> dict:
        """This rank's parameters by single-process name (tensor-parallel slices)."""
        return canonical_parameters(self.model, self.cfg.model)

    def position(self) -> dict:
        """Where this rank sits, as megabranch.checkpoint.load_for_rank reads it (one process: the "single"
        layout its checkpoints have always recorded)."""
        g = self.grid
        if g.world == 1:
            return dict(checkpoint.single_layout(), tp_rank=0, pp_rank=0, dp_rank=0)
        return {
            "tp": g.tp,
            "pp": g.pp,
            "dp": g.dp,
            "vpp": g.vpp,
            "tp_rank": g.tp_rank,
            "pp_rank": g.pp_rank,
            "dp_rank": g.dp_rank,
            "layout": str(self.layout),
            "zero": bool(self.cfg.parallel.zero),
        }

    def save(self, save_dir: str, loop_state: dict, valid_loss: float | None, best: float, is_best: bool) -> None:
        self.checkpoints.save(save_dir, self.step, self.alpha(), loop_state, valid_loss, best, is_best)

    def finish_saves(self) -> None:
        self.checkpoints.finish()

    def resume(self, where: str) -> dict:
        self.step, loop_state = self.checkpoints.resume(where)
        self.sync_step()
        return loop_state

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore from megabranch.checkpoint.load_for_rank's result (already cut for this rank's layout)."""
        self.step = self.checkpoints.restore(state)
        self.sync_step()
