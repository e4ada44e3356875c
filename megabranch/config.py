"""Typed configuration: dataclasses for model / parallel / optim / data / logging.

Configs load from YAML or JSON and take `--set section.key=value` overrides; unknown keys are user errors,
so a typo never silently falls back to a default. Every numeric field has its valid range in RANGES (one entry
per field; tests/test_config.py walks every field): a non-finite or out-of-range value is a one-line error naming
the field and where it came from (the file or --set). `Config.to_dict()` is what checkpoints and logs record.
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

# the residual schemes (megabranch/residual.py: what each computes; README's table: the equations)
RESIDUALS = ("post_ln", "pre_ln", "deepnorm", "branchnorm", "ds_init", "admin", "rezero", "r_fixup", "t_fixup", "dlcl",
             "normformer", "subln")
# the schemes whose paper prescribes the initialisation: model.deepnorm_init=true does not apply to them
RESIDUALS_WITH_OWN_INIT = ("ds_init", "r_fixup", "t_fixup", "subln")
SCHEDULES = ("linear", "exp", "sigmoid")
# DeepNorm's encoder beta in an encoder-decoder, c * (N^4 M)^(-1/16): the DeepNet paper's c = 0.87 or
# torchscale 0.3.0's c = 1.15 (residual.ENCODER_BETA_FACTOR; docs/design.md)
DEEPNORM_BETAS = ("paper", "torchscale")
# pipeline schedules (megabranch/parallel/schedules.py), plus "auto" (planning/schedule_choice.py decides)
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v")


@dataclass
class ModelConfig:
    residual: str = "branchnorm"  # one of RESIDUALS
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
    deepnorm_init: bool | None = None  # None: on for deepnorm and branchnorm, off otherwise (not for own-init schemes)
    deepnorm_beta: str = "paper"  # one of DEEPNORM_BETAS: the encoder beta of DeepNorm's init
    fused_kernels: bool = False  # use megabranch.ops.residual_layernorm (C++/CUDA) for LN(r*x + s*F)
    compile: bool = False  # torch.compile each encoder / decoder layer (model/regional_compile.py)
    compile_backend: str = "inductor"  # the torch.compile backend: inductor, aot_eager (debugging), ...


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved | zb-h1 | zb-v | auto (parallel/schedules.py, planning.py)
    layout: str = ""  # explicit chunk layout in pipeline order, e.g. "E0-3|E4-5,D0|D1-3|D4-5" (see parallel/layout.py)
    balance: str = "time"  # what the automatic split balances: time | memory
    recompute: int = 0  # 0: off; k: checkpoint activations every k layers
    zero: bool = False  # ZeRO-1: shard the Adam state over the data-parallel replicas
    bucket_mb: float = 25.0  # data-parallel gradient all-reduce bucket size
    overlap: bool = True  # launch each bucket's all-reduce as soon as its gradients are ready
    timeout_s: float = 600.0  # bound on every wait for another rank (start-up, collectives, pipeline messages)


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
    max_failed_saves: int = 3  # native engines: saves that may fail in a row (training goes on) before the run stops
    tensorboard: bool = True
    health: bool = True  # per-layer gradient norms / update ratios, and a warning when a stack stops learning
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
        try:
            cfg.validate()
        except InvalidValue as e:
            raise UserError(f"{where}: {e}") from None
        return cfg

    def validate(self) -> None:
        """Every numeric field within RANGES, then the choices and the relations between fields; InvalidValue
        (a UserError naming the field) on the first one that is not."""
        for key, value in numeric_fields(self):
            RANGES[key].check(key, value)
        m = self.model
        _check(m.residual in RESIDUALS, "model.residual", m.residual, f"one of {', '.join(RESIDUALS)}")
        _check(m.deepnorm_init is not True or m.residual not in RESIDUALS_WITH_OWN_INIT, "model.deepnorm_init",
               m.deepnorm_init, f"unset or false with model.residual={m.residual} (it has its own initialisation)")
        _check(m.deepnorm_beta in DEEPNORM_BETAS, "model.deepnorm_beta", m.deepnorm_beta, " or ".join(DEEPNORM_BETAS))
        _check(m.alpha_schedule in SCHEDULES, "model.alpha_schedule", m.alpha_schedule, f"one of {', '.join(SCHEDULES)}")
        _check(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads, f"a divisor of model.d_model={m.d_model}")
        _check(m.activation in ("relu", "gelu"), "model.activation", m.activation, "relu or gelu")
        _check(m.positions in ("sinusoidal", "learned"), "model.positions", m.positions, "sinusoidal or learned")
        o = self.optim
        _check(o.precision in ("fp32", "bf16", "fp16"), "optim.precision", o.precision, "fp32, bf16 or fp16")
        _check(self.log.progress in ("auto", "bar", "none"), "log.progress", self.log.progress, "auto, bar or none")
        p = self.parallel
        _check(p.schedule in PIPELINE_SCHEDULES + ("auto",), "parallel.schedule", p.schedule,
               ", ".join(PIPELINE_SCHEDULES + ("auto",)))
        _check(p.balance in ("time", "memory"), "parallel.balance", p.balance, "time or memory")


class InvalidValue(UserError):
    """A config field's value is out of its range; `key` names the field (so the caller can say where the value
    came from)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take: finite, and within [lo, hi] (an end None: unbounded; open ends
    excluded). integer: whole numbers only (the field is an int)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def ok(self, v: float) -> bool:
        if not math.isfinite(v) or (self.integer and not v.is_integer()):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {self.hi:g}"
        return kind

    def check_flag(self, flag: str, value: float | None, note: str = "") -> None:
        """The same rule for a command-line number: `--flag value is invalid: must be ...` (a UserError); None
        (the flag not given) passes. `note` says what the number means (a unit, what 0 does)."""
        if value is not None and not self.ok(float(value)):
            shown = value if isinstance(value, int) else f"{value:g}"  # (an int as typed, not 1e+07)
            raise UserError(f"{flag} {shown} is invalid: must be {self.describe()}{note}")

    def check(self, key: str, value: Any) -> None:
        if value is None:  # an optional field left unset
            return
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not self.ok(float(v)):
                raise InvalidValue(key, f"{key}={value!r} is invalid: must be {self.describe()}"
                                        + (" (each)" if isinstance(value, tuple) else ""))


def ints(lo: int) -> Range:
    """Whole numbers >= lo."""
    return Range(lo=lo, integer=True)


# the ranges most fields (and command-line numbers: Range.check_flag) take
POSITIVE, NON_NEGATIVE, FRACTION, FINITE = Range(lo=0, lo_open=True), Range(lo=0), Range(0, 1, hi_open=True), Range()

# the valid values of every numeric field (ints and floats; a tuple's entries each): config.validate checks them
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**63 - 1, integer=True),
    "model.encoder_layers": ints(1), "model.decoder_layers": ints(1), "model.d_model": ints(1),
    "model.n_heads": ints(1), "model.ffn_dim": ints(1), "model.dropout": FRACTION,
    "model.attention_dropout": FRACTION, "model.activation_dropout": FRACTION, "model.max_positions": ints(1),
    "model.ln_eps": POSITIVE, "model.alpha_warmup_steps": ints(0), "model.embed_scale": POSITIVE,
    "model.position_offset": ints(0),
    "parallel.tp": ints(1), "parallel.pp": ints(1), "parallel.vpp": ints(1), "parallel.recompute": ints(0),
    "parallel.bucket_mb": POSITIVE, "parallel.timeout_s": POSITIVE,
    "optim.lr": POSITIVE, "optim.betas": FRACTION, "optim.adam_eps": POSITIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_updates": ints(0), "optim.warmup_init_lr": NON_NEGATIVE, "optim.clip_norm": NON_NEGATIVE,
    "optim.label_smoothing": FRACTION, "optim.max_updates": ints(1), "optim.update_freq": ints(1),
    "data.max_tokens": ints(1), "data.max_sentences": ints(0), "data.sampling_temperature": POSITIVE,
    "log.log_interval": ints(1), "log.valid_interval": ints(1), "log.bleu_sentences": ints(0),
    "log.bleu_beam": ints(1), "log.keep_last": ints(0), "log.max_failed_saves": ints(1),
}


def numeric_fields(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every int, float or tuple-of-numbers field of a config, nested sections included,
    optional ones (`float | None`) too, with their value None when unset (bools are not numbers here)."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += numeric_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, (int, float, tuple)) and not isinstance(value, bool):
            out.append((f"{prefix}{f.name}", value))
        elif value is None and any(t in str(f.type) for t in ("int", "float")) and "bool" not in str(f.type):
            out.append((f"{prefix}{f.name}", value))
    return out


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise InvalidValue(key, f"{key}={value!r} is invalid: must be {valid}")


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
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise UserError(f"{where}: {key}={value!r} is not a valid {type(current).__name__}") from None


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML/JSON (or defaults when path is None) and apply `a.b=c` overrides; an error names the file or
    --set, whichever the bad value came from."""
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
    cfg = Config()
    _apply(cfg, data, path or "config")
    set_keys = set()
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. model.encoder_layers=12")
        key, value = item.split("=", 1)
        key = key.strip()
        node: dict = {}
        top = node
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_scalar(value)
        _apply(cfg, top, "--set")
        set_keys.add(key)
    try:
        cfg.validate()
    except InvalidValue as e:
        if e.key in set_keys:
            raise UserError(f"--set {e}") from None
        raise UserError(f"{path}: {e}" if path else str(e)) from None
    return cfg
