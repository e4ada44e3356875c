"""The DeepSpeed backend: the same encoder-decoder model as a `deepspeed.pipe.PipelineModule`.

    megabranch-train --backend deepspeed --deepspeed_config launch/configs/ds_fp32.json --config ...

The model is a flat list of layer specs, built from the single-process model's own layer classes:

    index 0            source embedding          (src, prev)          -> (x, src, prev)
    1 .. N             encoder layers 0..N-1     (x, src, prev)       -> (x, src, prev)   (the last adds final_norm)
    N+1                target embedding          (memory, src, prev)  -> (memory, y, src)
    N+2 .. N+M+1       decoder layers 0..M-1     (memory, y, src)     -> (memory, y, src)
                       the last decoder layer                        -> y   (drops memory, adds final_norm)
    N+M+2              output projection         y                    -> logits;  loss_fn(logits, target)

What travels between stages follows DeepSpeed's rules for tuples (deepspeed/runtime/pipe/engine.py): every
floating tensor a stage sends is given requires_grad on the receiver, and a gradient is sent back for each; so a
floating tensor that the receiver does not use (its .grad stays None) would fail the gradient send, and one that
does not require grad on the sender would fail its backward. Hence: masks are never sent as floats (the source
tokens travel as int64 and each layer rebuilds its key mask from them), the decoder input tokens are int64 until
the target embedding consumes them, the encoder output (`memory`) rides with the decoder hidden through every
decoder stage, where cross-attention uses it (so its gradient is accumulated stage by stage and sent back), and the
last decoder layer drops it, so the output stage only receives `y`. Shapes change from micro-batch to micro-batch
(token batching), so the module is built with dynamic_shape=True.

Tied tables (fairseq's share_all_embeddings / share_decoder_input_output_embed) are one `TiedLayerSpec` key whose
module (`PipeEmbedding`) serves every role by the shape of its input: (src, prev) -> source embedding, a 3-tuple ->
target embedding, a tensor -> output projection. No forward_fn is used, so every layer index that uses the table
saves and loads it in DeepSpeed checkpoints (a forward_fn partial has no state_dict and DeepSpeed would skip it).

Weights are the single-process model's: every parameter is filled from model.transformer.initial_value by its
canonical name (`canonical_names`), so with the same seed the DeepSpeed model, build_model and the native parallel
engine start from identical weights.

Alpha: before each `engine.train_batch()` the global step (engine.global_steps, broadcast from global rank 0) is
written into every layer's ResidualCoefficients on every stage. Learning rate: the inverse-sqrt schedule of
megabranch (optim.lr / warmup_updates / warmup_init_lr) is set on the optimizer's groups before each step, unless
the DeepSpeed config brings its own "scheduler". Optimizer: torch AdamW from the megabranch config, unless the
DeepSpeed config has an "optimizer" section. Loss: each micro-batch's label-smoothed loss sum is divided by the
step's target tokens over all micro-batches and data-parallel replicas (and multiplied by the gradient
accumulation steps and dp, which DeepSpeed divides by), so the gradients are the single-process ones.

Gradient clipping: DeepSpeed's fp32 `clip_grad_norm_` sums squared norms over its model-parallel group (all stages
of a replica) but counts only parameters marked `model_parallel` on ranks other than the group's rank 0; unmarked,
only the first stage's gradients would enter the norm. Every parameter a stage owns is therefore marked
`model_parallel = True`, except the tied copies DeepSpeed marks `ds_pipe_replicated` (counted once, by their owner).

Checkpoints: `export_deepspeed` / `import_deepspeed` convert between the single-process state dict and DeepSpeed's
pipeline layout (`layer_XX-model_states.pt` per layer index, keys as that layer module's state_dict), so a
megabranch checkpoint can be loaded with engine.load_checkpoint(dir, load_module_only=True) and back.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ModelConfig
from ..errors import UserError
from ..model.embeddings import Embedder
from ..model.layers import DecoderLayer, EncoderLayer
from ..model.loss import label_smoothed_nll_loss
from ..model.norm import LayerNorm
from ..model.transformer import PAD, OutputProjection, initial_value
from ..residual import ResidualCoefficients, alpha_at, deepnorm_constants, set_step

PARTITIONS = ("megabranch", "parameters", "uniform", "type:<regex>")


# --- layer modules (no DeepSpeed import needed) ------------------------------------------------------------

def _coeffs(cfg: ModelConfig, stack: str) -> ResidualCoefficients:
    consts = deepnorm_constants(cfg.encoder_layers, cfg.decoder_layers)
    return ResidualCoefficients(cfg.residual, consts[stack][0], cfg.alpha_schedule, cfg.alpha_warmup_steps)


class PipeEmbedding(Embedder):
    """A (possibly tied) vocabulary table; its role comes from the input (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, vocab: int):
        super().__init__(nn.Embedding(vocab, cfg.d_model, padding_idx=PAD), cfg.max_positions, cfg.dropout)

    def forward(self, inputs):
        if torch.is_tensor(inputs):  # output projection: y -> logits
            return F.linear(inputs, self.table.weight)
        if len(inputs) == 2:  # source embedding
            src, prev = inputs
            return self._embed(src), src, prev
        memory, src, prev = inputs  # target embedding
        return memory, self._embed(prev), src

    def _embed(self, tokens):
        # DeepSpeed's bf16/fp16 engines cast the parameters, not this fp32 positions buffer: keep the table's dtype
        return super().forward(tokens).to(self.table.weight.dtype)


class PipeOutput(OutputProjection):
    """The untied output projection (its own `weight`)."""

    def __init__(self, cfg: ModelConfig, vocab: int):
        super().__init__(cfg.d_model, vocab, None)


class PipeEncoderLayer(EncoderLayer):
    """EncoderLayer (same parameter names) on the (x, src, prev) tuple; the last one adds pre_ln's final norm."""

    def __init__(self, cfg: ModelConfig, last: bool = False):
        super().__init__(cfg, cfg.fused_kernels)
        self.coeffs = _coeffs(cfg, "encoder")
        self.final_norm = LayerNorm(cfg.d_model, cfg.ln_eps) if last and cfg.residual == "pre_ln" else None

    def forward(self, inputs):
        x, src, prev = inputs
        x = super().forward(x, self.coeffs.r, self.coeffs.s, key_mask=src.ne(PAD))
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, src, prev


class PipeDecoderLayer(DecoderLayer):
    """DecoderLayer on (memory, y, src); the last one returns y alone (after pre_ln's final norm)."""

    def __init__(self, cfg: ModelConfig, last: bool = False):
        super().__init__(cfg, cfg.fused_kernels)
        self.coeffs = _coeffs(cfg, "decoder")
        self.last = last
        self.final_norm = LayerNorm(cfg.d_model, cfg.ln_eps) if last and cfg.residual == "pre_ln" else None

    def forward(self, inputs):
        memory, y, src = inputs
        y = super().forward(y, self.coeffs.r, self.coeffs.s, memory, src.ne(PAD))
        if not self.last:
            return memory, y, src
        return self.final_norm(y) if self.final_norm is not None else y


# --- the layer list and its names ----------------------------------------------------------------------------

def layer_plan(cfg: ModelConfig, vocab: int, tgt_vocab: int | None = None) -> list[dict]:
    """One entry per DeepSpeed layer index: {"kind", "cls", "args", "tie" (key or None), "prefix"/"names"}.

    `names` maps the layer module's state_dict keys to the single-process model's names. Pure Python: the
    checkpoint converter and --dry-run use it without DeepSpeed."""
    tgt_vocab = tgt_vocab or vocab
    n, m = cfg.encoder_layers, cfg.decoder_layers
    src_key = "embed"
    tgt_key = "embed" if cfg.share_all_embeddings else "tgt_embed"
    src_name = "encoder.embed.table.weight"
    tgt_name = src_name if cfg.share_all_embeddings else "decoder.embed.table.weight"
    plan = [dict(kind="src_embed", cls=PipeEmbedding, args=(cfg, vocab), tie=src_key, names={"table.weight": src_name})]
    for i in range(n):
        plan.append(dict(kind="encoder", index=i, cls=PipeEncoderLayer, args=(cfg, i == n - 1), tie=None,
                         prefix=f"encoder.layers.{i}.", final="encoder.final_norm."))
    plan.append(dict(kind="tgt_embed", cls=PipeEmbedding, args=(cfg, tgt_vocab), tie=tgt_key,
                     names={"table.weight": tgt_name}))
    for j in range(m):
        plan.append(dict(kind="decoder", index=j, cls=PipeDecoderLayer, args=(cfg, j == m - 1), tie=None,
                         prefix=f"decoder.layers.{j}.", final="decoder.final_norm."))
    if cfg.share_decoder_input_output_embed:
        plan.append(dict(kind="output", cls=PipeEmbedding, args=(cfg, tgt_vocab), tie=tgt_key,
                         names={"table.weight": tgt_name}))
    else:
        plan.append(dict(kind="output", cls=PipeOutput, args=(cfg, tgt_vocab), tie=None,
                         names={"weight": "decoder.output.weight"}))
    uses: dict = {}
    for e in plan:
        if e["tie"]:
            uses[e["tie"]] = uses.get(e["tie"], 0) + 1
    for e in plan:  # a table used at one index only is an ordinary layer
        if e["tie"] and uses[e["tie"]] < 2:
            e["tie"] = None
    return plan


def canonical_name(entry: dict, key: str) -> str:
    """The single-process name of `key` in the state_dict of the layer module described by `entry`."""
    if "names" in entry:
        return entry["names"][key]
    if key.startswith("final_norm."):
        return entry["final"] + key[len("final_norm."):]
    return entry["prefix"] + key


def layer_state_keys(entry: dict) -> list[str]:
    """The state_dict keys of the layer module (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        module = entry["cls"](*entry["args"])
    return list(module.state_dict().keys())


def ds_parts(cfg: Config, pp: int, vocab: int, tgt_vocab: int | None = None) -> list[int]:
    """DeepSpeed `parts` (stage s runs layer indices [parts[s], parts[s+1])) for megabranch's layout: the cost-model
    split of parallel.layout / plan_layout, with the source embedding riding with E0, the target embedding with D0
    and the output projection with the last decoder layer (as in the native engine)."""
    from ..parallel.partition import plan_layout

    p, mc = cfg.parallel, cfg.model
    n, m = mc.encoder_layers, mc.decoder_layers
    layout = plan_layout(mc, pp, 1, vocab, tgt_vocab, tp=1, layout=p.layout, by=p.balance, recompute=p.recompute)

    def index(b: int) -> int:
        if b == 0:
            return 0
        if b < n:
            return 1 + b
        if b == n:
            return n + 1  # the target embedding starts the decoder's first stage
        if b < n + m:
            return n + 2 + (b - n)
        return n + m + 3

    return [index(b) for b in layout.bounds()]


# --- building the PipelineModule -------------------------------------------------------------------------------

def _import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed JIT-builds ops with the ninja on PATH; a venv's ninja is not there unless the venv is activated
    import shutil

    here = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.exists(os.path.join(here, "ninja")):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise UserError(f"--backend deepspeed needs DeepSpeed: pip install 'megabranch[deepspeed]' ({e})") from None
    return deepspeed


def init_distributed() -> None:
    """deepspeed.init_distributed with gloo on the CPU and nccl on GPUs; must come before the PipelineModule."""
    deepspeed = _import_deepspeed()
    if "RANK" not in os.environ:
        raise UserError("--backend deepspeed needs a launcher: torchrun --nproc_per_node N, or the deepspeed launcher")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class TokenLoss:
    """loss_fn(logits, target): this micro-batch's label-smoothed loss sum times `scale` (set per step). Keeps the
    micro-batches' (loss, nll) sums of the step in `sums` for logging."""

    __name__ = "label_smoothed_nll_loss"

    def __init__(self, epsilon: float):
        self.epsilon = epsilon
        self.scale = 1.0
        self.sums = [0.0, 0.0]

    def __call__(self, logits, target):
        loss, nll = label_smoothed_nll_loss(logits, target, self.epsilon, PAD)
        self.sums[0] += float(loss.detach())
        self.sums[1] += float(nll.detach())
        return loss * self.scale


def build_pipeline_module(cfg: Config, vocab: int, tgt_vocab: int | None = None, num_stages: int | None = None,
                          partition: str = "megabranch", seed: int | None = None, loss_fn=None,
                          activation_checkpoint_interval: int | None = None):
    """The PipelineModule for this process (init_distributed must have run). seed: the init seed (build_model's);
    None draws it from cfg.seed like train.run. partition: 'megabranch' (the cost-model layout, or
    parallel.layout), or a DeepSpeed partition_method ('parameters', 'uniform', 'type:<regex>')."""
    _import_deepspeed()
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    from ..parallel.engine import draw_init_seed

    mc = cfg.model
    tgt_vocab = tgt_vocab or vocab
    pp = num_stages or cfg.parallel.pp
    if cfg.parallel.tp != 1 or cfg.parallel.vpp != 1:
        raise UserError(f"--backend deepspeed runs pipeline x data parallelism only: set parallel.tp=1 and "
                        f"parallel.vpp=1 (got tp={cfg.parallel.tp}, vpp={cfg.parallel.vpp})")
    plan = layer_plan(mc, vocab, tgt_vocab)
    specs = []
    for e in plan:
        if e["tie"]:
            specs.append(TiedLayerSpec(e["tie"], e["cls"], *e["args"], tied_weight_attr=["table.weight"]))
        else:
            specs.append(LayerSpec(e["cls"], *e["args"]))
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

    interval = cfg.parallel.recompute if activation_checkpoint_interval is None else activation_checkpoint_interval
    try:
        module = MegabranchPipe(layers=specs, num_stages=pp, loss_fn=loss_fn or TokenLoss(cfg.optim.label_smoothing),
                                partition_method=method, activation_checkpoint_interval=interval, dynamic_shape=True,
                                # only transformer layers: DeepSpeed's (reentrant) checkpoint of the embedding,
                                # whose inputs are token ids, would cut the embedding out of the backward
                                checkpointable_layers=["PipeEncoderLayer", "PipeDecoderLayer"])
    except NotImplementedError as e:
        raise UserError(f"deepspeed pipeline partition {partition!r}: {e} (use one of {', '.join(PARTITIONS)})") from None
    module.megabranch_plan = plan
    if seed is None:
        seed = draw_init_seed(cfg.seed)
    init_weights(module, mc, seed)
    for p in module.parameters():  # see the module docstring: DeepSpeed's fp32 clipping over pipeline stages
        if not getattr(p, "ds_pipe_replicated", False):
            p.model_parallel = True
    return module


def local_layers(module) -> list[tuple[int, nn.Module]]:
    """(global layer index, module) for the layers this stage runs (a tied module once per index using it)."""
    return [(module._local_start + i, f) for i, f in enumerate(module.forward_funcs) if isinstance(f, nn.Module)]


@torch.no_grad()
def init_weights(module, cfg: ModelConfig, seed: int) -> None:
    plan = module.megabranch_plan
    for idx, layer in local_layers(module):
        for key, p in layer.named_parameters():
            p.copy_(initial_value(canonical_name(plan[idx], key), tuple(p.shape), cfg, seed))


def canonical_state(module) -> dict:
    """This stage's parameters by single-process name (tests and converters)."""
    plan = module.megabranch_plan
    out = {}
    for idx, layer in local_layers(module):
        for key, t in layer.state_dict().items():
            out[canonical_name(plan[idx], key)] = t
    return out


# --- checkpoint I/O in DeepSpeed's pipeline layout ---------------------------------------------------------------

def _layer_file(directory: str, idx: int) -> str:
    return os.path.join(directory, f"layer_{idx:02d}-model_states.pt")


EXPORT_TAG = "megabranch"


def _tag_dir(path: str) -> str:
    """A DeepSpeed checkpoint root (with `latest`) -> its latest tag folder; a tag folder -> itself."""
    latest = os.path.join(path, "latest")
    if not os.path.isfile(_layer_file(path, 0)) and os.path.isfile(latest):
        with open(latest) as fh:
            return os.path.join(path, fh.read().strip())
    return path


def export_deepspeed(model_state: dict, cfg, out_dir: str, vocab: int | None = None,
                     tgt_vocab: int | None = None, tag: str = EXPORT_TAG) -> list[str]:
    """Write the single-process state dict (build_model(...).state_dict(), canonical names) as a DeepSpeed pipeline
    checkpoint: out_dir/<tag>/layer_XX-model_states.pt, one per layer index, keys as that layer module's
    state_dict (what PipelineModule.save_state_dict writes with pipeline x data parallelism; a tied table is
    written by every index that uses it), an mp_rank_00_model_states.pt with no optimizer state, and
    out_dir/latest. The layer files do not depend on the pipeline size, so any pp loads them:
    engine.load_checkpoint(out_dir, load_module_only=True). cfg: a Config or ModelConfig. Returns the files."""
    mc = cfg.model if isinstance(cfg, Config) else cfg
    vocab, tgt_vocab = _vocabs(model_state, mc, vocab, tgt_vocab)
    plan = layer_plan(mc, vocab, tgt_vocab)
    used, files = set(), []
    tag_dir = os.path.join(out_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    for idx, entry in enumerate(plan):
        layer = {}
        for key in layer_state_keys(entry):
            name = canonical_name(entry, key)
            if name not in model_state:
                raise UserError(f"export_deepspeed: the state dict has no {name} (needed by DeepSpeed layer {idx}); "
                                f"is it a build_model state dict for this model config?")
            layer[key] = model_state[name].detach().clone().contiguous()
            used.add(name)
        files.append(_layer_file(tag_dir, idx))
        torch.save(layer, files[-1])
    aliases = _aliases(mc)
    for alias, name in aliases.items():  # build_model's state dict lists a shared table under both names
        if alias in model_state and not torch.equal(model_state[alias], model_state[name]):
            raise UserError(f"export_deepspeed: {alias} differs from {name}, but model.share_all_embeddings ties them")
    extra = sorted(set(model_state) - used - set(aliases))
    if extra:
        raise UserError(f"export_deepspeed: {len(extra)} tensors of the state dict have no DeepSpeed layer "
                        f"(first: {extra[0]}); the model config does not match the state dict")
    # what engine.load_checkpoint reads before the layer files: module None (-> the layer files), no optimizer
    files.append(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    torch.save({"module": None, "optimizer": None, "lr_scheduler": None, "global_steps": 0, "global_samples": 0,
                "skipped_steps": 0, "dp_world_size": 1, "mp_world_size": 1,
                "megabranch": {"model": dict(vars(mc)), "exported_by": "megabranch.backends.deepspeed"}}, files[-1])
    files.append(os.path.join(out_dir, "latest"))
    with open(files[-1], "w") as fh:
        fh.write(tag)
    return files


def import_deepspeed(in_dir: str, cfg, vocab: int | None = None, tgt_vocab: int | None = None) -> dict:
    """Read a DeepSpeed pipeline checkpoint's layer files (written by export_deepspeed or engine.save_checkpoint;
    in_dir: the checkpoint root, whose `latest` names the tag, or the tag folder) back into a single-process state
    dict (canonical names, build_model's key order). A tied table saved by several layer indices must be
    identical in all of them."""
    mc = cfg.model if isinstance(cfg, Config) else cfg
    if not os.path.isdir(in_dir):
        raise UserError(f"import_deepspeed: {in_dir} is not a directory")
    in_dir = _tag_dir(in_dir)
    first = _layer_file(in_dir, 0)
    if not os.path.isfile(first):
        raise UserError(f"import_deepspeed: {first} not found; pass a DeepSpeed pipeline checkpoint folder (holding "
                        f"`latest`, or layer_XX-model_states.pt; tensor-parallel layer files are not supported)")
    table = torch.load(first, map_location="cpu", weights_only=True)["table.weight"]
    vocab = vocab or table.shape[0]
    tgt_vocab = tgt_vocab or _tgt_vocab_from_files(in_dir, mc, vocab)
    plan = layer_plan(mc, vocab, tgt_vocab)
    state: dict = {}
    for idx, entry in enumerate(plan):
        path = _layer_file(in_dir, idx)
        if not os.path.isfile(path):
            raise UserError(f"import_deepspeed: {path} not found; the checkpoint does not hold a "
                            f"{mc.encoder_layers}L-{mc.decoder_layers}L model ({len(plan)} layer files expected)")
        layer = torch.load(path, map_location="cpu", weights_only=True)
        want = set(layer_state_keys(entry))
        if set(layer) != want:
            missing, unexpected = sorted(want - set(layer)), sorted(set(layer) - want)
            raise UserError(f"import_deepspeed: {path} does not match the model config (missing {missing[:2]}, "
                            f"unexpected {unexpected[:2]})")
        for key, t in layer.items():
            name = canonical_name(entry, key)
            if name in state and not torch.equal(state[name], t):
                raise UserError(f"import_deepspeed: the tied {name} differs between layer files (at {path})")
            state[name] = t
    for alias, name in _aliases(mc).items():
        state[alias] = state[name]
    order = _canonical_order(mc, vocab, tgt_vocab)
    return {k: state[k] for k in order}


def _aliases(mc: ModelConfig) -> dict:
    """State-dict names that are another name's tensor in build_model (a table shared by both stacks)."""
    return {"decoder.embed.table.weight": "encoder.embed.table.weight"} if mc.share_all_embeddings else {}


def _vocabs(model_state: dict, mc: ModelConfig, vocab, tgt_vocab):
    vocab = vocab or model_state["encoder.embed.table.weight"].shape[0]
    if tgt_vocab is None:
        for k in ("decoder.embed.table.weight", "decoder.output.weight"):
            if k in model_state:
                tgt_vocab = model_state[k].shape[0]
                break
    return vocab, tgt_vocab or vocab


def _tgt_vocab_from_files(in_dir: str, mc: ModelConfig, vocab: int) -> int:
    if mc.share_all_embeddings:
        return vocab
    n = mc.encoder_layers
    t = torch.load(_layer_file(in_dir, n + 1), map_location="cpu", weights_only=True)
    return t["table.weight"].shape[0]


def _canonical_order(mc: ModelConfig, vocab: int, tgt_vocab: int | None) -> list[str]:
    from ..model.transformer import meta_model

    return list(meta_model(mc, vocab, tgt_vocab).state_dict().keys())


# --- training ---------------------------------------------------------------------------------------------------

def load_ds_config(path: str | None, cfg: Config) -> dict:
    """The DeepSpeed config with megabranch's defaults filled in where it is silent: gradient_accumulation_steps =
    optim.update_freq (micro-batches per step; a different value is refused), gradient_clipping = optim.clip_norm,
    train_micro_batch_size_per_gpu = 1 (our micro-batches are token-sized; DeepSpeed only uses it for its reports),
    pipeline.pipe_partitioned/grad_partitioned = false."""
    ds: dict = {}
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--deepspeed_config: {path} not found")
        try:
            with open(path) as fh:
                ds = json.load(fh)
        except ValueError as e:
            raise UserError(f"--deepspeed_config: cannot parse {path}: {e}") from None
    o = cfg.optim
    gas = ds.get("gradient_accumulation_steps", o.update_freq)
    if gas != o.update_freq:
        raise UserError(f"{path}: gradient_accumulation_steps={gas} but optim.update_freq={o.update_freq}; they are "
                        f"the same thing (micro-batches per step): make them equal or drop one")
    ds["gradient_accumulation_steps"] = gas
    ds.setdefault("train_micro_batch_size_per_gpu", 1)
    ds.setdefault("gradient_clipping", float(o.clip_norm))
    ds.setdefault("steps_per_print", 10**9)  # megabranch logs the steps itself
    ds.setdefault("zero_allow_untested_optimizer", True)
    pipe = ds.setdefault("pipeline", {})
    pipe.setdefault("pipe_partitioned", False)
    pipe.setdefault("grad_partitioned", False)
    return ds


def _keep_fp32_grad_norm(engine) -> None:
    """DeepSpeed reports the global gradient norm only from its fp16 / bf16 / ZeRO optimizers; on the plain fp32
    path it computes the norm in clip_fp32_gradients and drops it (and skips the call when clipping is off).
    Keep it, as the native engines log it: clip with an infinite threshold when clipping is off (a no-op that
    still measures) and record what DeepSpeed's clip_grad_norm_ returns."""
    if engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization():
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    if engine.gradient_clipping() <= 0.0:
        engine._config.gradient_clipping = float("inf")

    def clip_and_keep():
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_and_keep


class DeepSpeedTrainer:
    """train.Trainer's interface (train_step(batches) -> stats, .step) over a DeepSpeed PipelineEngine."""

    def __init__(self, cfg: Config, vocab: int, tgt_vocab: int | None = None, ds_config: dict | None = None,
                 partition: str | None = None, seed: int | None = None):
        deepspeed = _import_deepspeed()
        import torch.distributed as dist

        self.cfg, self.dist = cfg, dist
        ds = load_ds_config(None, cfg) if ds_config is None else ds_config
        pipe = ds.get("pipeline", {})
        partition = partition or pipe.get("partition", "megabranch")
        pp = cfg.parallel.pp
        world = dist.get_world_size()
        if world % pp:
            raise UserError(f"world size {world} is not a multiple of parallel.pp={pp}")
        self.loss_fn = TokenLoss(cfg.optim.label_smoothing)
        self.module = build_pipeline_module(cfg, vocab, tgt_vocab, pp, partition, seed, self.loss_fn)
        o = cfg.optim
        optimizer = None
        if "optimizer" not in ds:
            params = list({id(p): p for p in self.module.parameters()}.values())
            optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps,
                                          weight_decay=o.weight_decay)
        self.own_lr = "scheduler" not in ds
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=ds)
        _keep_fp32_grad_norm(self.engine)
        self.dp = self.engine.grid.get_data_parallel_world_size()
        self.dp_rank = self.engine.grid.get_data_parallel_rank()
        self.dp_group = self.engine.grid.get_data_parallel_group()
        self.gas = self.engine.gradient_accumulation_steps()

    @property
    def step(self) -> int:
        return int(self.engine.global_steps)

    @property
    def parts(self) -> list[int]:
        return list(self.module.parts)

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
        t = torch.tensor(self.loss_fn.sums if self.engine.is_last_stage() else [0.0, 0.0], dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.tolist()

    def train_step(self, batches: list[dict]) -> dict:
        from ..train import inverse_sqrt_lr

        if len(batches) != self.gas:
            raise ValueError(f"train_step needs gradient_accumulation_steps={self.gas} micro-batches, got {len(batches)}")
        o, mc = self.cfg.optim, self.cfg.model
        step = self._broadcast_step()
        set_step(self.module, step)
        # the value the layers hold (a float32 buffer), as the native engines report it
        alpha = alpha_at(step, mc.alpha_warmup_steps, mc.alpha_schedule) if mc.residual == "branchnorm" else 1.0
        alpha = float(torch.tensor(alpha, dtype=torch.float32))
        lr = inverse_sqrt_lr(step, o)
        if self.own_lr:
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
        else:
            lr = float(self.engine.get_lr()[0])
        ntokens = self._set_scale(batches)
        loss = float(self.engine.train_batch(data_iter=iter(self._items(batches))))
        _, nll_sum = self._world_sums()
        gnorm = self.engine.get_global_grad_norm()
        return {
            "loss": loss, "nll_loss": nll_sum / max(ntokens, 1),
            "lr": lr, "alpha": alpha, "gnorm": float(gnorm) if gnorm is not None else float("nan"),
            "ntokens": ntokens, "skipped": 0,
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
            group = batches[i:i + self.gas]
            ntok += self._set_scale(group)
            self.engine.eval_batch(data_iter=iter(self._items(group)), num_micro_batches=len(group))
            sums = self._world_sums()
            total = [total[0] + sums[0], total[1] + sums[1]]
        return {"loss": total[0] / max(ntok, 1), "nll_loss": total[1] / max(ntok, 1)}


def run(cfg: Config, ds_config_path: str | None, resume: str | None = None) -> dict:
    """`megabranch-train --backend deepspeed`: train with engine.train_batch(); checkpoints with
    engine.save_checkpoint(log.save_dir) (DeepSpeed's own layout); --resume loads the latest one."""
    from ..data import EpochBatchIterator, load_split
    from ..metrics import MetricsLogger
    from ..train import _SilentLogger, _mean

    ds = load_ds_config(ds_config_path, cfg)
    if (ds.get("fp16") or {}).get("enabled") and not torch.cuda.is_available():
        raise UserError(f"{ds_config_path}: fp16 needs CUDA devices; use a bf16 or fp32 DeepSpeed config on the CPU")
    init_distributed()
    import torch.distributed as dist

    rank = dist.get_rank()
    train_set, tok, meta = load_split(cfg.data.data_dir, "train")
    valid_set, _, _ = load_split(cfg.data.data_dir, "valid")
    src_tok, tgt_tok = tok if isinstance(tok, tuple) else (tok, tok)
    tr = DeepSpeedTrainer(cfg, src_tok.vocab_size, tgt_tok.vocab_size, ds)
    save_dir = cfg.log.save_dir
    itr = EpochBatchIterator(train_set, cfg.data.max_tokens, seed=cfg.seed, max_sentences=cfg.data.max_sentences or None,
                             shuffle=cfg.data.shuffle, num_shards=tr.dp, shard_id=tr.dp_rank)
    if resume is not None:  # DeepSpeed's checkpoint: weights, optimizer, global step; ours in client_state: data order
        path, client = tr.engine.load_checkpoint(save_dir, tag=None if resume in ("", "last") else resume)
        if path is None:
            raise UserError(f"--resume: no DeepSpeed checkpoint in {save_dir}")
        if client and client.get("data"):
            itr.load_state_dict(client["data"])
    elif os.path.exists(os.path.join(save_dir, "latest")):
        raise UserError(f"{save_dir} already holds DeepSpeed checkpoints; pass --resume or set log.save_dir elsewhere")
    o, lg = cfg.optim, cfg.log
    logger = MetricsLogger(save_dir, o.max_updates, lg.tensorboard, lg.progress) if rank == 0 else _SilentLogger()
    if rank == 0:
        print(f"model: {cfg.model.residual} {cfg.model.encoder_layers}L-{cfg.model.decoder_layers}L "
              f"d={cfg.model.d_model}; deepspeed pipeline pp={cfg.parallel.pp} dp={tr.dp}, layer parts {tr.parts}",
              file=sys.stderr)
    valid_batches = list(EpochBatchIterator(valid_set, cfg.data.max_tokens, seed=cfg.seed, shuffle=False).next_epoch_itr())
    valid_batches = valid_batches[tr.dp_rank::tr.dp]
    groups = itr.update_groups(o.update_freq)
    interval: dict = {}
    valid_stats: dict = {}
    t0 = time.time()
    while tr.step < o.max_updates:
        stats = tr.train_step(next(groups))
        for k in ("loss", "nll_loss"):
            interval.setdefault(k, []).append(stats[k])
        if math.isfinite(stats["gnorm"]):  # not an overflowed fp16 step
            interval.setdefault("gnorm", []).append(stats["gnorm"])
        interval["ntokens"] = interval.get("ntokens", 0) + stats["ntokens"]
        logger.progress(tr.step, stats["loss"], stats["alpha"])
        step = tr.step
        if step % lg.log_interval == 0 or step == o.max_updates:
            record = {"step": step, "epoch": itr.epoch, "loss": _mean(interval["loss"]),
                      "nll_loss": _mean(interval["nll_loss"]), "lr": stats["lr"], "alpha": stats["alpha"],
                      "tokens_per_s": round(interval["ntokens"] / max(time.time() - t0, 1e-9), 1)}
            if interval.get("gnorm"):
                record.update(gnorm=_mean(interval["gnorm"]), gnorm_max=max(interval["gnorm"]))
            logger.log(record)
            interval, t0 = {}, time.time()
        if step % lg.valid_interval == 0 or step == o.max_updates:
            valid_stats = tr.valid_loss(valid_batches)
            logger.log({"step": step, **valid_stats}, tag="valid")
            tr.engine.save_checkpoint(save_dir, client_state={"config": cfg.to_dict(), "data": itr.state_dict()})
            t0 = time.time()
    logger.close()
    return valid_stats
