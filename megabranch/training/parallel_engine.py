"""`ParallelTrainer`: train.Trainer's interface over a tensor x pipeline x data-parallel grid.

One optimizer step, top to bottom (every rank runs the same code):
  1. the global step t is broadcast from global rank 0 (its owner) to every stage and replica, BEFORE any
     micro-batch; every chunk's ResidualCoefficients is set from it, so every forward and backward of every
     micro-batch of the step, on every stage, uses alpha_t (a chunk that lagged would use alpha_{t-1}:
     tests/test_engine.py checks for exactly that);
  2. the step's target tokens are summed over the data-parallel replicas; each micro-batch's loss is divided
     by that global count, so summing gradients over replicas gives the single-process gradient;
  3. the pipeline schedule runs this replica's micro-batches (executor.PipelineExecutor); the data-parallel
     all-reduce of gradients is armed for the last micro-batch (overlapped with its backward, or under a
     zero-bubble schedule with its W, the weight-gradient half of the backward: weight_grad.py);
  4. tied embedding tables held by several pipeline stages get their gradients summed over the embedding group;
  5. the global gradient norm (tp x pp, each element once) is measured and clipped; global rank 0 decides
     whether the step is skipped (non-finite norm) and broadcasts that decision; the optimizer steps (AdamW, or
     ZeRO-1 ShardedAdamW with parallel.zero) with the inverse-sqrt learning rate of step t; t += 1.

Precision: bf16 / fp16 run the chunks under autocast, and activations and their gradients cross pipeline stages
in that dtype (half the bytes of fp32). fp16 adds dynamic loss scaling (training.loss_scaler): the loss is scaled
in step 3, the gradients unscaled before step 5, and the overflow check is step 5's global norm: one inf or nan
gradient on any stage or replica makes it non-finite on every rank (the data-parallel all-reduce spreads it over
the replicas, the norm's all-reduce over tp and pp), rank 0's skip decision is broadcast, and every rank updates
its scaler with that one decision, so all skip together and all scalers agree.
With model.compile, every layer of every chunk is compiled (model/regional_compile.py).

Statistics (loss, nll_loss per target token) are the sums over all micro-batches and replicas divided by the
global token count, identical on every rank.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.distributed as dist

from .. import checkpoint
from ..config import Config
from ..errors import UserError
from ..model import build_model_from, canonical_parameters, draw_init_seed
from ..model.regional_compile import FirstStepTimer, compile_layers
from ..parallel.clip import clip_grad_norm_
from ..parallel.data_parallel import GradReducer
from ..parallel.executor import MicroBatch, PipelineExecutor
from ..parallel.gather import fits_on_rank0, free_memory_bytes, full_model_bytes, gather_to_rank0
from ..parallel.grid import Grid, build_grid, rank_of
from ..parallel.layout import Layout
from ..parallel.partition import plan_layout
from ..parallel.schedules import check_schedule, placement_of
from ..parallel.stage import build_stage
from ..parallel.tensor_parallel import model_parallel_seed
from ..parallel.zero import ShardedAdamW
from ..residual import current_alpha, set_step
from . import native_checkpoint
from .loss_scaler import DynamicLossScaler
from .lr_schedule import inverse_sqrt_lr
from .protocol import step_stats


class ParallelTrainer(native_checkpoint.NativeCheckpointing):
    """Owns this rank's pipeline chunks (`.model`: slices of the model), its optimizer shard and the step counter
    (`.step`, the broadcast copy of global rank 0's). Implements training.protocol.Engine."""

    def __init__(self, cfg: Config, vocab_size: int, tgt_vocab_size: int | None = None,
                 device: torch.device | str = "cpu", grid: Grid | None = None, init_seed: int | None = None,
                 vocab_sha256: str | None = None):
        p, o = cfg.parallel, cfg.optim
        self.cfg, self.device = cfg, torch.device(device)
        self.vocab_sha256 = vocab_sha256
        if o.precision == "fp16" and self.device.type != "cuda":
            raise UserError("optim.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(o.precision)
        self.scaler = DynamicLossScaler() if o.precision == "fp16" else None
        self.grid = grid if grid is not None else build_grid(p.tp, p.pp, p.vpp, p.timeout_s)
        g = self.grid
        check_schedule(p.schedule, g.pp, g.vpp, o.update_freq)
        vocab, tgt_vocab = vocab_size, tgt_vocab_size or vocab_size
        self.vocab_sizes = (vocab, tgt_vocab)
        self.rank, self.data_shards, self.data_shard = g.rank, g.dp, g.dp_rank
        self.layout: Layout = plan_layout(cfg.model, g.pp, g.vpp, vocab, tgt_vocab, g.tp, layout=p.layout,
                                          by=p.balance, recompute=p.recompute, placement=placement_of(p.schedule))
        if init_seed is None:
            init_seed = draw_init_seed(cfg.seed)
        self.model = build_stage(cfg.model, self.layout, g, vocab, tgt_vocab, seed=init_seed, device=self.device,
                                 recompute=p.recompute)
        model_parallel_seed(cfg.seed, g)  # dropout streams: same on a tp group, distinct per stage / replica
        if cfg.model.compile:
            compile_layers(self.model, cfg.model.compile_backend, self.device, cfg.model.fused_kernels)
        self.first_step = FirstStepTimer(cfg.model.compile)
        self.params = list(canonical_parameters(self.model, cfg.model).values())
        self._setup_embedding_groups()
        bucket_mb = p.bucket_mb
        overlap = p.overlap
        # a table used by two local chunks gets two backward contributions per micro-batch; it is reduced after
        # the schedule (with the embedding group), never from a backward hook
        users: dict = {}
        for ch in self.model:
            used = {id(x) for x in ch.parameters()}
            for i in used:
                users[i] = users.get(i, 0) + 1
        self.shared = [q for q in self.params if users.get(id(q), 0) > 1 or id(q) in self._emb_ids]
        shared_ids = {id(q) for q in self.shared}
        # one reducer per chunk, armed right before that chunk's last backward (chunks finish at different times)
        self.reducers = [
            GradReducer([q for q in ch.parameters() if id(q) not in shared_ids], g.dp_group, bucket_mb, overlap)
            for ch in self.model
        ]
        self.shared_reducer = GradReducer(self.shared, g.dp_group, bucket_mb, overlap=False)
        if p.zero:
            self.optimizer = ShardedAdamW(self.params, g.dp_group, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps,
                                          weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps,
                                               weight_decay=o.weight_decay)
        self.executor = PipelineExecutor(self.model, self.layout, g, p.schedule, cfg.model.d_model,
                                         dtype=self.amp_dtype or torch.float32, label_smoothing=o.label_smoothing)
        self.executor.on_last_backward = lambda v, ready: self.reducers[v].arm(ready)
        self.step = 0
        self.step_offset = 0  # tests only: a stage that lags by this many steps (must be caught)
        self.bleu_free_bytes = None  # memory rank 0 may fill with the gathered model (None: what is free there)
        self._model_bytes = None
        self._bleu_skip_said = False

    # --- groups ----------------------------------------------------------------------------------------
    def _setup_embedding_groups(self) -> None:
        """For each tied table held by more than one pipeline stage: a process group per (tp, dp) pipeline over
        the stages that hold a copy. Every rank creates every group, in the same order."""
        g, lay, mc = self.grid, self.layout, self.cfg.model
        holders = {"encoder": set(lay.ranks_holding("src_embed")), "decoder": set(lay.ranks_holding("tgt_embed"))}
        if mc.share_decoder_input_output_embed:
            holders["decoder"] |= set(lay.ranks_holding("output"))
        if mc.share_all_embeddings:
            holders = {"encoder": holders["encoder"] | holders["decoder"]}
        names = {"encoder": "encoder.embed.table.weight", "decoder": "decoder.embed.table.weight"}
        mine = canonical_parameters(self.model, mc)
        self.embedding_groups: list = []  # (parameter, group)
        self._emb_ids: set = set()
        for key in sorted(holders):
            stages = sorted(holders[key])
            if len(stages) < 2:
                continue
            for t in range(g.tp):
                for d in range(g.dp):
                    ranks = [rank_of(t, d, s, g.tp, g.dp) for s in stages]
                    group = dist.new_group(ranks, timeout=g.timeout)
                    if g.rank in ranks:
                        param = mine[names[key]]
                        self.embedding_groups.append((param, group))
                        self._emb_ids.add(id(param))

    # --- one step --------------------------------------------------------------------------------------
    def _broadcast(self, values: list[float], dtype=torch.float64) -> list:
        t = torch.tensor(values, dtype=dtype, device=self.device)  # on the device: NCCL needs it there
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(t, src=0)
        return t.tolist()

    def _sum(self, values: list[float], group="world") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if group == "world":
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(t)
        elif group is not None:
            dist.all_reduce(t, group=group)
        return t.tolist()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _microbatches(self, batches: list[dict]) -> list[MicroBatch]:
        return [MicroBatch.from_batch(i, b, self.device) for i, b in enumerate(batches)]

    def _local_loss_share(self, loss_sum: float, nll_sum: float) -> list[float]:
        """This rank's contribution to the world sums: only the tp-rank-0 copy of the stage holding the output
        (the last stage; rank 0 under the V placement) counts."""
        if self.grid.pp_rank in self.layout.ranks_holding("output") and self.grid.tp_rank == 0:
            return [loss_sum, nll_sum]
        return [0.0, 0.0]

    def sync_step(self) -> int:
        """Broadcast the step from its owner (global rank 0) and point every local stack at it."""
        (step,) = self._broadcast([float(self.step)])
        self.step = int(step)
        for ch in self.model:
            set_step(ch, self.step - self.step_offset)
        return self.step

    def train_step(self, batches: list[dict]) -> dict:
        o = self.cfg.optim
        self.model.train()
        step = self.sync_step()
        alpha = current_alpha(self.model)
        lr = inverse_sqrt_lr(step, o)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local_tokens = sum(int(b["ntokens"]) for b in batches)
        (ntokens,) = self._sum([float(local_tokens)], self.grid.dp_group)
        ntokens = int(ntokens)
        scale = self.scaler.scale if self.scaler is not None else 1.0
        with self._autocast(), self.first_step.first_step():
            loss_sum, nll_sum = self.executor.run(self._microbatches(batches), scale / ntokens)
        for reducer in self.reducers:
            reducer.finish()
        for param, group in self.embedding_groups:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=group)
        self.shared_reducer.finish()
        if self.scaler is not None:
            self.scaler.unscale_(self.params)
        max_norm = o.clip_norm if o.clip_norm > 0 else float("inf")
        gnorm = clip_grad_norm_(self.params, max_norm, self.grid)
        (skip,) = self._broadcast([0.0 if math.isfinite(gnorm) else 1.0])  # the owner's decision
        skipped = bool(skip)
        if self.scaler is not None:
            self.scaler.update(skipped)  # the same decision on every rank: every scaler keeps the same state
        if not skipped:
            self.optimizer.step()
        for reducer in self.reducers + [self.shared_reducer]:  # every parameter is in exactly one
            reducer.zero_grad()  # dp > 1: one fill_ per bucket (the .grad are views into it); dp == 1: None
        self.step += 1
        loss_sum, nll_sum = self._sum(self._local_loss_share(loss_sum, nll_sum))
        return {**step_stats(loss_sum, nll_sum, ntokens, lr, alpha, gnorm, skipped), **self.first_step.take()}

    @torch.no_grad()
    def valid_loss(self, batches) -> dict:
        """Collective: every rank passes its data-parallel shard of the validation batches."""
        self.model.eval()
        batches = list(batches)
        self.sync_step()
        (ntokens,) = self._sum([float(sum(int(b["ntokens"]) for b in batches))], self.grid.dp_group)
        with self._autocast():
            loss_sum, nll_sum = self.executor.run(self._microbatches(batches), 1.0, forward_only=True)
        loss_sum, nll_sum = self._sum(self._local_loss_share(loss_sum, nll_sum))
        return {"loss": loss_sum / max(ntokens, 1), "nll_loss": nll_sum / max(ntokens, 1)}

    # --- the rest of the protocol -----------------------------------------------------------------------------
    def describe(self) -> str:
        m = self.cfg.model
        return (f"{m.residual} {m.encoder_layers}L-{m.decoder_layers}L d={m.d_model}, {self.grid.describe()}, "
                f"stages {self.layout}, device {self.device}")

    def alpha(self) -> float:
        return current_alpha(self.model)

    def max_over_ranks(self, value: int) -> int:
        """Collective over the world: the largest value any rank passed."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def bleu_model(self):
        """Collective. The whole single-process model on global rank 0 (parallel/gather.py), None on the other
        ranks; None everywhere when it does not fit on rank 0 (said once)."""
        if self._model_bytes is None:
            self._model_bytes = full_model_bytes(self.cfg.model, *self.vocab_sizes)
        free = self.bleu_free_bytes if self.bleu_free_bytes is not None else free_memory_bytes(self.device)
        (fits,) = self._broadcast([float(fits_on_rank0(self._model_bytes, free))])  # rank 0's memory decides
        if not fits:
            if self.rank == 0 and not self._bleu_skip_said:
                self._bleu_skip_said = True
                print(f"validation BLEU off: the whole model ({self._model_bytes / 2**30:.2f} GiB fp32) does not fit "
                      f"twice into rank 0's free {free / 2**30:.2f} GiB; decode a saved step directory with "
                      "megabranch-generate", file=sys.stderr)
            return None
        full = gather_to_rank0(self.named_params(), self.grid, self.device)
        if full is None:
            return None
        with torch.device(self.device):
            return build_model_from(self.cfg.model, *self.vocab_sizes, full, self.step, "the gathered model")

    # --- checkpoints (one shard per rank; training.native_checkpoint) ------------------------------------------
    def _describe(self) -> dict:
        g = self.grid
        return {"tp": g.tp, "pp": g.pp, "dp": g.dp, "vpp": g.vpp, "tp_rank": g.tp_rank, "pp_rank": g.pp_rank,
                "dp_rank": g.dp_rank, "layout": str(self.layout)}

    def named_params(self) -> dict:
        """This rank's parameters by single-process name (tensor-parallel slices)."""
        return canonical_parameters(self.model, self.cfg.model)

    def position(self) -> dict:
        """Where this rank sits, as megabranch.checkpoint.load_for_rank reads it."""
        return dict(self._describe(), zero=bool(self.cfg.parallel.zero))

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict) -> None:
        """Restore from megabranch.checkpoint.load_for_rank's result (already cut for this rank's layout)."""
        checkpoint.restore(self.named_params(), self.optimizer, state)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.sync_step()
