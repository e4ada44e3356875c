"""Typed configuration: dataclasses for model / parallel / optim / data / logging.

Configs load from YAML or JSON and take `--set section.key=value` overrides; unknown keys are user errors,
so a typo never silently falls back to a default. `Config.to_dict()` is what checkpoints and logs record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import UserError

RESIDUALS = ("post_ln", "pre_ln", "deepnorm", "branchnorm")
SCHEDULES = ("linear", "exp", "sigmoid")


@dataclass
class ModelConfig:
    residual: str = "branchnorm"  # post_ln | pre_ln | deepnorm | branchnorm
    encoder_layers: int = 6
    decoder_layers: int = 6
    d_model: int = 512
    n_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1  # on every sub-layer output F(x) before the residual, and on embeddings
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: str = "relu"
    share_all_embeddings: bool = True  # one table for source, target and output (joint vocabulary)
    share_decoder_input_output_embed: bool = True
    max_positions: int = 1024
    # embeddings, as the model was trained (imported torchscale / fairseq models set them; defaults: megabranch's)
    embed_scale: float | None = None  # token embeddings times this; None: sqrt(d_model) (fairseq's default)
    positions: str = "sinusoidal"  # sinusoidal (fixed, fairseq's table) | learned (a trained table)
    position_offset: int = 0  # the first token's position index (fairseq and torchscale count from pad + 1 = 2)
    ln_eps: float = 1e-5
    # BranchNorm: alpha_t = schedule(t / T), clipped to 1.
    alpha_schedule: str = "linear"  # linear | exp | sigmoid
    alpha_warmup_steps: int = 4000  # T
    deepnorm_init: bool | None = None  # None: on for deepnorm and branchnorm, off otherwise
    fused_kernels: bool = False  # use megabranch.ops.residual_layernorm (C++/CUDA) for LN(r*x + s*F)
    compile: bool = False  # torch.compile each encoder / decoder layer (model/regional_compile.py)
    compile_backend: str = "inductor"  # the torch.compile backend: inductor, aot_eager (debugging), ...


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved
    layout: str = ""  # explicit chunk layout in pipeline order, e.g. "E0-3|E4-5,D0|D1-3|D4-5" (see parallel/layout.py)
    balance: str = "time"  # what the automatic split balances: time | memory
    recompute: int = 0  # 0: off; k: checkpoint activations every k layers
    zero: bool = False  # ZeRO-1: shard the Adam state over the data-parallel replicas
    bucket_mb: float = 25.0  # data-parallel gradient all-reduce bucket size
    overlap: bool = True  # launch each bucket's all-reduce as soon as its gradients are ready


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple = (0.9, 0.98)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0001
    warmup_updates: int = 4000
    warmup_init_lr: float = 1e-7
    clip_norm: float = 0.0  # 0: no clipping (the gradient norm is still measured and logged)
    label_smoothing: float = 0.1
    max_updates: int = 1000
    update_freq: int = 1  # gradient accumulation: batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (CUDA only, dynamic loss scaling)


@dataclass
class DataConfig:
    data_dir: str = "data-bin/kjv_web"
    max_tokens: int = 4096
    max_sentences: int = 0  # 0: unlimited
    shuffle: bool = True
    # multilingual data: direction i is drawn with probability ~ n_i^(1/T); 1 = in proportion to the data
    # (every pair once an epoch), 5 = OPUS-100 / mBART. A single-pair directory ignores it.
    sampling_temperature: float = 1.0


@dataclass
class LogConfig:
    save_dir: str = "runs/default"
    log_interval: int = 10
    valid_interval: int = 200  # steps between validation loss (and checkpoint saves)
    bleu_sentences: int = 100  # validation subset decoded for BLEU at each validation; 0: off
    bleu_beam: int = 1
    keep_last: int = 2
    async_save: bool = True  # native engines: snapshot to host memory, write and publish in the background
    tensorboard: bool = True
    progress: str = "auto"  # auto (bar on a terminal) | bar | none


@dataclass
class Config:
    seed: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "Config":
        cfg = cls()
        _apply(cfg, d, where)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        m, o = self.model, self.optim
        _check(m.residual in RESIDUALS, "model.residual", m.residual, f"one of {', '.join(RESIDUALS)}")
        _check(m.alpha_schedule in SCHEDULES, "model.alpha_schedule", m.alpha_schedule, f"one of {', '.join(SCHEDULES)}")
        for name in ("encoder_layers", "decoder_layers"):
            _check(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), "an integer >= 1")
        _check(m.d_model >= 1 and m.n_heads >= 1, "model.d_model", m.d_model, "positive")
        _check(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads, f"a divisor of model.d_model={m.d_model}")
        _check(m.ffn_dim >= 1, "model.ffn_dim", m.ffn_dim, "an integer >= 1")
        _check(m.activation in ("relu", "gelu"), "model.activation", m.activation, "relu or gelu")
        _check(m.positions in ("sinusoidal", "learned"), "model.positions", m.positions, "sinusoidal or learned")
        _check(m.position_offset >= 0, "model.position_offset", m.position_offset, ">= 0")
        _check(m.embed_scale is None or m.embed_scale > 0, "model.embed_scale", m.embed_scale, "> 0 (or unset: sqrt(d_model))")
        _check(m.alpha_warmup_steps >= 0, "model.alpha_warmup_steps", m.alpha_warmup_steps, ">= 0")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            v = getattr(m, name)
            _check(0.0 <= v < 1.0, f"model.{name}", v, "in [0, 1)")
        _check(0.0 <= o.label_smoothing < 1.0, "optim.label_smoothing", o.label_smoothing, "in [0, 1)")
        _check(o.lr > 0, "optim.lr", o.lr, "> 0")
        _check(o.max_updates >= 1, "optim.max_updates", o.max_updates, ">= 1")
        _check(o.update_freq >= 1, "optim.update_freq", o.update_freq, ">= 1")
        _check(o.precision in ("fp32", "bf16", "fp16"), "optim.precision", o.precision, "fp32, bf16 or fp16")
        _check(self.data.max_tokens >= 1, "data.max_tokens", self.data.max_tokens, ">= 1")
        t = self.data.sampling_temperature
        _check(math.isfinite(t) and t > 0, "data.sampling_temperature", t, "a number > 0 (1: in proportion to the data)")
        _check(self.log.progress in ("auto", "bar", "none"), "log.progress", self.log.progress, "auto, bar or none")
        p = self.parallel
        for name in ("tp", "pp", "vpp"):
            _check(getattr(p, name) >= 1, f"parallel.{name}", getattr(p, name), ">= 1")
        _check(p.schedule in ("gpipe", "1f1b", "interleaved"), "parallel.schedule", p.schedule, "gpipe, 1f1b or interleaved")
        _check(p.balance in ("time", "memory"), "parallel.balance", p.balance, "time or memory")
        _check(p.recompute >= 0, "parallel.recompute", p.recompute, ">= 0")
        _check(p.bucket_mb > 0, "parallel.bucket_mb", p.bucket_mb, "> 0")


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise UserError(f"{key}={value!r} is invalid: must be {valid}")


def _apply(obj: Any, d: dict, where: str, prefix: str = "") -> None:
    if not isinstance(d, dict):
        raise UserError(f"{where}: section {prefix.rstrip('.') or '<top>'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in d.items():
        if key not in fields:
            raise UserError(f"{where}: unknown config key {prefix}{key!s} (valid: {', '.join(sorted(fields))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, where, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, f"{prefix}{key}", where))


def _coerce(value: Any, current: Any, key: str, where: str) -> Any:
    """Coerce a YAML/JSON/--set value to the type of the field's default."""
    if current is None or value is None:
        return value
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            return bool(value)
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            if isinstance(value, str):
                value = [float(v) for v in value.strip("()[]").split(",")]
            return tuple(float(v) for v in value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {key}={value!r} is not a valid {type(current).__name__}") from None


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML/JSON (or defaults when path is None) and apply `a.b=c` overrides."""
    data: dict = {}
    if path:
        if not os.path.isfile(path):
            raise UserError(f"config file not found: {path}")
        with open(path) as fh:
            text = fh.read()
        try:
            if path.endswith(".json"):
                data = json.loads(text)
            else:
                data = yaml.safe_load(text) or {}
        except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
            raise UserError(f"cannot parse config {path}: {str(e).splitlines()[0]}") from None
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. model.encoder_layers=12")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return Config.from_dict(data, where=path or "--set")
