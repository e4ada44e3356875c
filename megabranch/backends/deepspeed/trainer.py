"""`DeepSpeedTrainer`: the DeepSpeed backend's engine (training.protocol.Engine) over a `deepspeed.pipe`
PipelineModule whose layers are slices of the one model (layers.py).

    megabranch-train --backend deepspeed --deepspeed_config launch/configs/ds_fp32.json --config ...

Weights are the single-process model's: every parameter is filled from model.init.initial_value by its
single-process name, so with the same seed the DeepSpeed model, build_model and the native parallel engine start
from identical weights.

Alpha: before each `engine.train_batch()` the global step (engine.global_steps, broadcast from global rank 0) is
written into every unit's ResidualCoefficients on every stage. Learning rate: the inverse-sqrt schedule of
megabranch (optim.lr / warmup_updates / warmup_init_lr) is set on the optimizer's groups before each step, unless
the DeepSpeed config brings its own "scheduler". Optimizer: torch AdamW from the megabranch config, unless the
DeepSpeed config has an "optimizer" section. Loss: each micro-batch's label-smoothed loss sum is divided by the
step's target tokens over all micro-batches and data-parallel replicas (and multiplied by the gradient
accumulation steps and dp, which DeepSpeed divides by), so the gradients are the single-process ones.

Three dimensions (parallel.tp x parallel.pp x dp): the megabranch grid (parallel/grid.py) and DeepSpeed's
PipeModelDataParallelTopology number the ranks the same way (tensor-parallel rank fastest, then data, then pipeline),
so DeepSpeed's pipeline and data-parallel groups, built from the topology, and megabranch's tensor-parallel groups,
which the units' column / row-parallel layers use (layers.PipeUnit), are one grid. A world that tp * pp does not
divide is refused in one line.

Gradient norm and clipping: every parameter is marked `model_parallel` when tensor parallelism splits it
(DeepSpeed's bf16 / ZeRO optimizers count an unmarked one on tensor-parallel rank 0 only, as the native engine
counts a replicated one), and the tied copies DeepSpeed marks `ds_pipe_replicated` are the native engine's
`pp_duplicate` (counted once, by their owner). On the fp32 path DeepSpeed's `clip_grad_norm_` would count an
unmarked parameter on the first stage's tensor-parallel rank 0 only, so the norm there is megabranch's own
(parallel/clip.py over the same grid: grad_norm.py).

Checkpoints are DeepSpeed's own (engine.save_checkpoint into log.save_dir); checkpoint.py converts between them
and megabranch step directories.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist
from torch import nn

from ...config import Config
from ...errors import UserError
from ...model import canonical_name, canonical_parameters, draw_init_seed, label_smoothed_nll_loss
from ...model.init import fill_initial_values
from ...parallel.grid import Grid, build_grid, process_group_timeout
from ...parallel.parallelize import full_shape, shard_of
from ...parallel.tensor_parallel import model_parallel_seed, vocab_parallel_label_smoothed_nll_loss
from ...residual import alpha_at, set_step
from ...training.optimizer import build_optimizer, set_lr
from ...vocab import PAD
from .config import load_ds_config
from .grad_norm import keep_fp32_grad_norm
from .layers import PipeUnit, check_layout, check_scheme, layer_plan
from .partition import PARTITIONS, ds_parts


def import_deepspeed_package():
    """deepspeed (an optional dependency), on its CPU accelerator when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed JIT-builds ops with the ninja on PATH; a venv's ninja is not there unless the venv is activated
    here = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.exists(os.path.join(here, "ninja")):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    try:
        import deepspeed  # optional dependency
    except ImportError as e:
        raise UserError(f"--backend deepspeed needs DeepSpeed: pip install 'megabranch[deepspeed]' ({e})") from None
    return deepspeed


def init_distributed(timeout_s: float | None = None) -> None:
    """deepspeed.init_distributed with gloo on the CPU and nccl on GPUs; must come before the PipelineModule.
    timeout_s (parallel.timeout_s) bounds the world group's waits and those of every group DeepSpeed creates
    later (pipeline, data-parallel, point-to-point)."""
    deepspeed = import_deepspeed_package()
    if "RANK" not in os.environ:
        raise UserError("--backend deepspeed needs a launcher: torchrun --nproc_per_node N, or the deepspeed launcher")
    timeout = process_group_timeout(timeout_s)
    if timeout is not None:
        # DeepSpeed calls new_group(ranks) without a timeout, which torch fills in from these module defaults at
        # call time (30 minutes for gloo, 10 for NCCL); there is no other way to hand it ours
        c10d = dist.distributed_c10d
        for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
            if isinstance(getattr(c10d, name, None), type(timeout)):
                setattr(c10d, name, timeout)
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator JIT-builds its shared-memory all-reduce (deepspeed_shm_comm, about a CPU
        # minute of C++ the first time) inside init_distributed. Only its inference all-reduce calls it; training
        # reduces through the gloo process groups. Its op table marks ops this machine cannot build, and an op
        # marked so is skipped: mark this one (where this DeepSpeed has that table).
        ops = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(ops, dict):
            ops["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo",
        **({"timeout": timeout} if timeout is not None else {}),
    )


class TokenLoss:
    """loss_fn(logits, target): this micro-batch's label-smoothed loss sum times `scale` (set per step). Keeps the
    micro-batches' (loss, nll) sums of the step in `sums` for logging. tp_group: the logits are vocabulary-parallel
    over it (the vocabulary-parallel loss; every rank of the group gets the whole loss)."""

    __name__ = "label_smoothed_nll_loss"

    def __init__(self, epsilon: float, tp_group=None):
        self.epsilon, self.tp_group = epsilon, tp_group
        self.scale = 1.0
        self.sums = [0.0, 0.0]

    def __call__(self, logits, target):
        if self.tp_group is not None:
            loss, nll = vocab_parallel_label_smoothed_nll_loss(logits, target, self.epsilon, PAD, self.tp_group)
        else:
            loss, nll = label_smoothed_nll_loss(logits, target, self.epsilon, PAD)
        self.sums[0] += float(loss.detach())
        self.sums[1] += float(nll.detach())
        return loss * self.scale


def local_layers(module) -> list[tuple[int, nn.Module]]:
    """(global layer index, unit) for the layers this stage runs (a tied unit once per index using it)."""
    return [(module._local_start + i, f) for i, f in enumerate(module.forward_funcs) if isinstance(f, nn.Module)]


def canonical_state(module) -> dict:
    """This stage's parameters by single-process name (tests and converters)."""
    return {canonical_name(k, layer.cfg): v for _, layer in local_layers(module) for k, v in layer.state_dict().items()}


def build_pipeline_module(
    cfg: Config,
    vocab: int,
    tgt_vocab: int | None = None,
    num_stages: int | None = None,
    partition: str = "megabranch",
    seed: int | None = None,
    loss_fn=None,
    activation_checkpoint_interval: int | None = None,
    grid: Grid | None = None,
):
    """The PipelineModule for this process (init_distributed must have run). seed: the init seed (build_model's);
    None draws it from cfg.seed like every engine. partition: 'megabranch' (the cost-model layout, or
    parallel.layout), or a DeepSpeed partition_method ('parameters', 'uniform', 'type:<regex>'). grid: the
    megabranch grid of this tp x pp x dp job (needed for parallel.tp > 1: its tensor-parallel groups)."""
    import_deepspeed_package()
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec  # optional dependency
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # optional dependency

    mc = cfg.model
    tgt_vocab = tgt_vocab or vocab
    pp = num_stages or cfg.parallel.pp
    tp = cfg.parallel.tp
    dp = check_layout(cfg, dist.get_world_size())
    if tp > 1 and (grid is None or grid.tp != tp):
        raise ValueError(f"parallel.tp={tp} needs the job's megabranch grid (grid=build_grid(tp, pp))")
    specs = []
    for e in layer_plan(mc):
        if e.tie:
            table = "encoder.embed.table.weight" if mc.share_all_embeddings else "decoder.embed.table.weight"
            specs.append(TiedLayerSpec(e.tie, PipeUnit, mc, vocab, tgt_vocab, e.unit, grid, tied_weight_attr=[table]))
        else:
            specs.append(LayerSpec(PipeUnit, mc, vocab, tgt_vocab, e.unit, grid))
    parts = None
    method = partition
    if partition in ("megabranch", "best", "", None):
        parts = ds_parts(cfg, pp, vocab, tgt_vocab)
        method = "uniform"  # unused: _partition_layers takes `parts`

    class MegabranchPipe(PipelineModule):
        def _partition_layers(self, method="uniform"):
            if parts is None:
                return super()._partition_layers(method)
            self.parts = list(parts)
            self._set_bounds(start=parts[self.stage_id], stop=parts[self.stage_id + 1])

        def _is_checkpointable(self, funcs):
            # only transformer layers: DeepSpeed's (reentrant) checkpoint of an embedding, whose inputs are
            # token ids, would cut the embedding out of the backward
            return all(getattr(f, "holds_layers", False) for f in funcs)

    interval = cfg.parallel.recompute if activation_checkpoint_interval is None else activation_checkpoint_interval
    # the same rank order as megabranch's grid: model (tp) fastest, then data, then pipe
    where = (
        dict(topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)) if tp > 1 else dict(num_stages=pp)
    )
    loss_fn = loss_fn or TokenLoss(cfg.optim.label_smoothing, grid.tp_group if tp > 1 else None)
    try:
        module = MegabranchPipe(
            layers=specs,
            loss_fn=loss_fn,
            partition_method=method,
            activation_checkpoint_interval=interval,
            dynamic_shape=True,
            **where,
        )
    except NotImplementedError as e:
        raise UserError(
            f"deepspeed pipeline partition {partition!r}: {e} (use one of {', '.join(PARTITIONS)})"
        ) from None
    if seed is None:
        seed = draw_init_seed(cfg.seed)
    fill_initial_values(
        canonical_parameters([f for _, f in local_layers(module)], mc), mc, seed, full_shape=full_shape, shard=shard_of
    )
    for p in module.parameters():  # see the module docstring: the gradient norm
        p.model_parallel = not getattr(p, "tp_replicated", False)
        if getattr(p, "ds_pipe_replicated", False):
            p.pp_duplicate = True
    return module


class DeepSpeedTrainer:
    """The engine protocol (training.protocol.Engine) over a DeepSpeed PipelineEngine."""

    def __init__(
        self,
        cfg: Config,
        vocab_size: int,
        tgt_vocab_size: int | None = None,
        ds_config: dict | None = None,
        partition: str | None = None,
        init_seed: int | None = None,
    ):
        check_scheme(cfg.model)
        deepspeed = import_deepspeed_package()
        self.cfg, self.dist = cfg, dist
        ds = load_ds_config(None, cfg) if ds_config is None else ds_config
        if (ds.get("fp16") or {}).get("enabled") and not torch.cuda.is_available():
            raise UserError(
                "the DeepSpeed config enables fp16, which needs CUDA devices; use a bf16 or fp32 "
                "DeepSpeed config on the CPU"
            )
        partition = partition or ds.get("pipeline", {}).get("partition", "megabranch")
        p = cfg.parallel
        check_layout(cfg, dist.get_world_size())
        self.grid = build_grid(p.tp, p.pp, 1, p.timeout_s)  # DeepSpeed's topology, megabranch's groups
        if p.tp > 1:
            model_parallel_seed(cfg.seed, self.grid)  # dropout streams of the tensor-parallel regions
        self.loss_fn = TokenLoss(cfg.optim.label_smoothing, self.grid.tp_group)
        self.module = build_pipeline_module(
            cfg, vocab_size, tgt_vocab_size, p.pp, partition, init_seed, self.loss_fn, grid=self.grid
        )
        o = cfg.optim
        optimizer = None if "optimizer" in ds else build_optimizer(self.module.parameters(), o)
        self.own_lr = "scheduler" not in ds
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=ds)
        keep_fp32_grad_norm(self.engine, self.grid)
        self.dp = self.engine.grid.get_data_parallel_world_size()
        self.dp_rank = self.engine.grid.get_data_parallel_rank()
        self.dp_group = self.engine.grid.get_data_parallel_group()
        self.gas = self.engine.gradient_accumulation_steps()
        self.rank, self.data_shards, self.data_shard = dist.get_rank(), self.dp, self.dp_rank
        self.health = None  # DeepSpeed computes and clips the gradient norm itself

    @property
    def step(self) -> int:
        return int(self.engine.global_steps)

    @property
    def parts(self) -> list[int]:
        return list(self.module.parts)

    def describe(self) -> str:
        m = self.cfg.model
        return (
            f"{m.residual} {m.encoder_layers}L-{m.decoder_layers}L d={m.d_model}; deepspeed pipeline "
            f"tp={self.cfg.parallel.tp} pp={self.cfg.parallel.pp} dp={self.dp}, layer parts {self.parts}"
        )

    def _broadcast_step(self) -> int:
        t = torch.tensor([float(self.engine.global_steps)], dtype=torch.float64)
        self.dist.broadcast(t, src=0)
        return int(t.item())

    def _items(self, batches: list[dict]):
        return [((b["src_tokens"], b["prev_output_tokens"]), b["target"]) for b in batches]

    def _set_scale(self, batches: list[dict]) -> int:
        t = torch.tensor([float(sum(int(b["ntokens"]) for b in batches))], dtype=torch.float64)
        if self.dp > 1:
            self.dist.all_reduce(t, group=self.dp_group)
        ntokens = int(t.item())
        self.loss_fn.scale = self.gas * self.dp / max(ntokens, 1)
        self.loss_fn.sums = [0.0, 0.0]
        return ntokens

    def _world_sums(self) -> list[float]:
        """The step's (loss, nll) sums over the world: the last stage's tensor-parallel rank 0 of each replica."""
        owns = self.engine.is_last_stage() and self.grid.tp_rank == 0
        t = torch.tensor(self.loss_fn.sums if owns else [0.0, 0.0], dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.tolist()

    def alpha(self, step: int | None = None) -> float:
        """The alpha of `step` (default: the next step) as the layers hold it (a float32 buffer)."""
        mc = self.cfg.model
        step = self.step if step is None else step
        a = alpha_at(step, mc.alpha_warmup_steps, mc.alpha_schedule) if mc.residual == "branchnorm" else 1.0
        return float(torch.tensor(a, dtype=torch.float32))

    def train_step(self, batches: list[dict]) -> dict:
        if len(batches) != self.gas:
            raise ValueError(
                f"train_step needs gradient_accumulation_steps={self.gas} micro-batches, got {len(batches)}"
            )
        o = self.cfg.optim
        step = self._broadcast_step()
        set_step(self.module, step)
        alpha = self.alpha(step)
        lr = set_lr(self.engine.optimizer, step, o) if self.own_lr else float(self.engine.get_lr()[0])
        ntokens = self._set_scale(batches)
        loss = float(self.engine.train_batch(data_iter=iter(self._items(batches))))
        _, nll_sum = self._world_sums()
        gnorm = self.engine.get_global_grad_norm()
        return {
            "loss": loss,
            "nll_loss": nll_sum / max(ntokens, 1),
            "lr": lr,
            "alpha": alpha,
            "gnorm": float(gnorm) if gnorm is not None else float("nan"),
            "ntokens": ntokens,
            "skipped": 0,
        }

    @torch.no_grad()
    def valid_loss(self, batches: list[dict]) -> dict:
        """Validation loss over this replica's batches, gradient_accumulation_steps micro-batches per eval_batch
        (fewer in the last one). With dp > 1 every replica runs as many batches as the smallest shard has."""
        batches = list(batches)
        set_step(self.module, self._broadcast_step())
        count = torch.tensor([float(len(batches))])
        if self.dp > 1:
            self.dist.all_reduce(count, op=self.dist.ReduceOp.MIN, group=self.dp_group)
        batches = batches[: int(count.item())]
        total, ntok = [0.0, 0.0], 0
        for i in range(0, len(batches), self.gas):
            group = batches[i : i + self.gas]
            ntok += self._set_scale(group)
            self.engine.eval_batch(data_iter=iter(self._items(group)), num_micro_batches=len(group))
            sums = self._world_sums()
            total = [total[0] + sums[0], total[1] + sums[1]]
        return {"loss": total[0] / max(ntok, 1), "nll_loss": total[1] / max(ntok, 1)}

    def max_over_ranks(self, value: int) -> int:
        """Collective over the world: the largest value any rank passed."""
        t = torch.tensor([float(value)], dtype=torch.float64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return int(t.item())

    def whole_model(self):
        return None  # the layers live in DeepSpeed's PipelineModule; decode a converted checkpoint instead

    # --- checkpoints: DeepSpeed's own (weights, optimizer, global step; ours in client_state: data order) ----
    @staticmethod
    def has_checkpoints(save_dir: str) -> bool:
        return os.path.exists(os.path.join(save_dir, "latest"))

    def save(self, save_dir: str, loop_state: dict, valid_loss: float, best: float, is_best: bool) -> None:
        self.engine.save_checkpoint(
            save_dir, client_state={"config": self.cfg.to_dict(), "data": loop_state, "best_valid_loss": best}
        )

    def finish_saves(self) -> None:
        """DeepSpeed's save_checkpoint is synchronous: nothing in flight (log.async_save does not apply)."""

    def resume(self, where: str) -> dict:
        save_dir = self.cfg.log.save_dir
        path, client = self.engine.load_checkpoint(save_dir, tag=None if where in ("", "last") else where)
        if path is None:
            raise UserError(f"--resume: no DeepSpeed checkpoint in {save_dir}")
        client = client or {}
        return {"data": client.get("data"), "best_valid_loss": client.get("best_valid_loss")}
