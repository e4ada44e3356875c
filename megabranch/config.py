"""Typed configuration: dataclasses for model / parallel / optim / data / logging.

Each field is declared once: its type, its default and the rule of its valid values (`setting(default, rule)`:
a Range for numbers, a Choice or a Text for strings, FLAG for booleans), with a docstring under it saying what
it means (Megatron-core documents its config dataclasses the same way). Configs load from YAML or JSON and take
`--set section.key=value` overrides; unknown keys are user errors, so a typo never silently falls back to a
default. A value is checked where it enters: an empty or null value of a field that is not optional, a value
of the wrong type, a non-finite or out-of-range number or an unknown choice is a one-line error naming the
field and where it came from (the file or --set). `Config.to_dict()` is what checkpoints and logs record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml

from .errors import UserError

# the residual schemes (megabranch/residual.py: what each computes; README's table: the equations)
RESIDUALS = (
    "post_ln",
    "pre_ln",
    "deepnorm",
    "branchnorm",
    "ds_init",
    "admin",
    "rezero",
    "r_fixup",
    "t_fixup",
    "dlcl",
    "normformer",
    "subln",
)
# the schemes whose paper prescribes the initialisation: model.deepnorm_init=true does not apply to them
RESIDUALS_WITH_OWN_INIT = ("ds_init", "r_fixup", "t_fixup", "subln")
SCHEDULES = ("linear", "exp", "sigmoid")
# DeepNorm's encoder beta in an encoder-decoder, c * (N^4 M)^(-1/16): the DeepNet paper's c = 0.87 or
# torchscale 0.3.0's c = 1.15 (residual.ENCODER_BETA_FACTOR; docs/design.md)
DEEPNORM_BETAS = ("paper", "torchscale")
# pipeline schedules (megabranch/parallel/schedules.py), plus "auto" (planning/schedule_choice.py decides)
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v")


class InvalidValue(UserError):
    """A config field's value is out of its range; `key` names the field (so the caller can say where the value
    came from)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class Rule:
    """The values a field may take: `ok(value)` says whether one is valid, `describe()` says which are (the end of
    "must be ..."), `empty` is what an empty or null value becomes (None: refused)."""

    empty: Any = None

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, key: str, value: Any) -> None:
        """InvalidValue naming `key` unless `value` is valid."""
        if not self.ok(value):
            raise InvalidValue(key, f"{key}={value!r} is invalid: must be {self.describe()}")


@dataclass(frozen=True)
class Range(Rule):
    """The values a numeric field may take: finite, and within [lo, hi] (an end None: unbounded; open ends
    excluded). integer: whole numbers only (the field is an int). A tuple field's entries each."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def ok(self, v: Any) -> bool:
        if isinstance(v, tuple):
            return all(self.ok(x) for x in v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        try:
            v = float(v)
        except OverflowError:  # an int beyond any float (10**400)
            return False
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
        if not self.ok(value):
            raise InvalidValue(
                key,
                f"{key}={value!r} is invalid: must be {self.describe()}"
                + (" (each)" if isinstance(value, tuple) else ""),
            )


@dataclass(frozen=True)
class Choice(Rule):
    """One of a few names."""

    names: tuple[str, ...]

    def ok(self, value: Any) -> bool:
        return value in self.names

    def describe(self) -> str:
        return f"one of {', '.join(self.names)}"


@dataclass(frozen=True)
class Text(Rule):
    """Free text (a path, a backend's name); empty only where `empty_ok` (then a null value means "")."""

    what: str = "a non-empty string"
    empty_ok: bool = False

    @property
    def empty(self) -> str | None:
        return "" if self.empty_ok else None

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and (self.empty_ok or bool(value.strip()))

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class Flag(Rule):
    """true or false."""

    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"


def ints(lo: int) -> Range:
    """Whole numbers >= lo."""
    return Range(lo=lo, integer=True)


# the rules most fields (and command-line numbers: Range.check_flag) take
POSITIVE, NON_NEGATIVE, FRACTION, FINITE = Range(lo=0, lo_open=True), Range(lo=0), Range(0, 1, hi_open=True), Range()
FLAG, PATH = Flag(), Text("a non-empty path")


def setting(default: Any, rule: Rule) -> Any:
    """A config field: its default and the rule its values follow (one declaration; validate() and the loaders
    read the rule from the field's metadata)."""
    return field(default=default, metadata={"rule": rule})


@dataclass
class ModelConfig:
    """The network: depth and width, the residual scheme, embeddings, dropout and how the layers run."""

    residual: str = setting("branchnorm", Choice(RESIDUALS))
    """The residual scheme, one of RESIDUALS (megabranch/residual.py says what each computes; the README's table
    gives the equations)."""
    encoder_layers: int = setting(6, ints(1))
    """Encoder layers N."""
    decoder_layers: int = setting(6, ints(1))
    """Decoder layers M."""
    d_model: int = setting(512, ints(1))
    """Hidden size (embeddings, attention, residual stream)."""
    n_heads: int = setting(8, ints(1))
    """Attention heads; must divide d_model."""
    ffn_dim: int = setting(2048, ints(1))
    """Inner size of the feed-forward sub-layer."""
    dropout: float = setting(0.1, FRACTION)
    """Dropout on every sub-layer output F(x) before the residual, and on the embeddings."""
    attention_dropout: float = setting(0.0, FRACTION)
    """Dropout on the attention probabilities."""
    activation_dropout: float = setting(0.0, FRACTION)
    """Dropout after the feed-forward activation."""
    activation: str = setting("relu", Choice(("relu", "gelu")))
    """The feed-forward activation."""
    share_all_embeddings: bool = setting(True, FLAG)
    """One table for source, target and output (a joint vocabulary)."""
    share_decoder_input_output_embed: bool = setting(True, FLAG)
    """The output projection is the decoder's input embedding."""
    max_positions: int = setting(1024, ints(1))
    """Longest sequence (tokens, eos included) the position table covers."""
    embed_scale: float | None = setting(None, POSITIVE)
    """Token embeddings times this; None: sqrt(d_model) (fairseq's default). Imported torchscale / fairseq models
    set it to how they were trained."""
    positions: str = setting("sinusoidal", Choice(("sinusoidal", "learned")))
    """sinusoidal (fixed, fairseq's table) or learned (a trained table)."""
    position_offset: int = setting(0, ints(0))
    """The first token's position index (fairseq and torchscale count from pad + 1 = 2)."""
    ln_eps: float = setting(1e-5, POSITIVE)
    """LayerNorm epsilon."""
    alpha_schedule: str = setting("linear", Choice(SCHEDULES))
    """BranchNorm: alpha_t = schedule(t / T), clipped to 1."""
    alpha_warmup_steps: int = setting(4000, ints(0))
    """BranchNorm: T, the optimizer steps until alpha_t reaches 1."""
    deepnorm_init: bool | None = setting(None, FLAG)
    """DeepNorm's beta-scaled initialization; None: on for deepnorm and branchnorm, off otherwise. The schemes in
    RESIDUALS_WITH_OWN_INIT refuse true."""
    deepnorm_beta: str = setting("paper", Choice(DEEPNORM_BETAS))
    """The encoder beta of DeepNorm's init: paper, 0.87 (N^4 M)^(-1/16) (the DeepNet paper's), or torchscale,
    1.15 (N^4 M)^(-1/16) (torchscale 0.3.0's encoder.py)."""
    fused_kernels: bool = setting(False, FLAG)
    """Use megabranch.ops.residual_layernorm (C++/CUDA) for LN(r * x + s * F)."""
    compile: bool = setting(False, FLAG)
    """torch.compile each encoder / decoder layer (model/regional_compile.py)."""
    compile_backend: str = setting("inductor", Text("a torch.compile backend's name"))
    """The torch.compile backend: inductor, aot_eager (debugging), ..."""
    compile_dynamic: bool = setting(True, FLAG)
    """Compile each layer kind with symbolic batch and sequence dimensions from the first step: token batches vary
    in both, so torch's default (a static graph for the first shape, a symbolic one at the second) compiles every
    kind twice. false: torch's default, for batches of one fixed shape."""


@dataclass
class ParallelConfig:
    """How the model is split over processes: tensor, pipeline and data parallelism."""

    tp: int = setting(1, ints(1))
    """Tensor-parallel size: each layer's matrices split over this many ranks."""
    sequence_parallel: bool = setting(False, FLAG)
    """With tp > 1: the LayerNorm / dropout / residual activations (what tensor parallelism replicates) split
    along the sequence over the tensor-parallel ranks, 1/tp each (Megatron's --sequence-parallel;
    parallel/sequence_parallel.py). Native engine only; not with model.residual=admin."""
    pp: int = setting(1, ints(1))
    """Pipeline-parallel size: the layers split into this many stages."""
    vpp: int = setting(1, ints(1))
    """Virtual pipeline chunks per stage (interleaved schedules)."""
    schedule: str = setting("1f1b", Choice(PIPELINE_SCHEDULES + ("auto",)))
    """The pipeline schedule (parallel/schedules.py); auto: the one planning/schedule_choice.py picks."""
    layout: str = setting("", Text("a chunk layout", empty_ok=True))
    """Explicit chunk layout in pipeline order, e.g. "E0-3|E4-5,D0|D1-3|D4-5" (parallel/layout.py); empty: the
    automatic split."""
    balance: str = setting("time", Choice(("time", "memory")))
    """What the automatic split balances."""
    recompute: int = setting(0, ints(0))
    """Activation checkpointing: 0 off; k: every k layers."""
    zero: bool = setting(False, FLAG)
    """ZeRO-1: shard the Adam state over the data-parallel replicas."""
    bucket_mb: float = setting(25.0, POSITIVE)
    """Data-parallel gradient all-reduce bucket size (MB)."""
    overlap: bool = setting(True, FLAG)
    """Launch each bucket's all-reduce as soon as its gradients are ready."""
    timeout_s: float = setting(600.0, POSITIVE)
    """Bound on every wait for another rank (start-up, collectives, pipeline messages), seconds."""


@dataclass
class OptimConfig:
    """Adam, the inverse-sqrt learning-rate schedule, the loss and the precision."""

    lr: float = setting(5e-4, POSITIVE)
    """Peak learning rate (reached after warmup_updates)."""
    betas: tuple = setting((0.9, 0.98), FRACTION)
    """Adam's (beta1, beta2)."""
    adam_eps: float = setting(1e-8, POSITIVE)
    """Adam's epsilon."""
    weight_decay: float = setting(0.0001, NON_NEGATIVE)
    """Decoupled weight decay (AdamW)."""
    warmup_updates: int = setting(4000, ints(0))
    """Linear warmup from warmup_init_lr to lr, then lr * sqrt(warmup / step)."""
    warmup_init_lr: float = setting(1e-7, NON_NEGATIVE)
    """The learning rate at step 0."""
    clip_norm: float = setting(0.0, NON_NEGATIVE)
    """Gradient-norm clipping; 0: none (the norm is still measured and logged)."""
    label_smoothing: float = setting(0.1, FRACTION)
    """Label smoothing of the cross-entropy loss."""
    max_updates: int = setting(1000, ints(1))
    """Optimizer steps to train."""
    update_freq: int = setting(1, ints(1))
    """Gradient accumulation: batches per optimizer step."""
    precision: str = setting("fp32", Choice(("fp32", "bf16", "fp16")))
    """fp32, bf16 (autocast) or fp16 (CUDA only, dynamic loss scaling)."""


@dataclass
class DataConfig:
    """The preprocessed data directory and how it is batched."""

    data_dir: str = setting("data-bin/kjv_web", PATH)
    """A directory megabranch-preprocess wrote."""
    max_tokens: int = setting(4096, ints(1))
    """Padded tokens per batch (fairseq's --max-tokens)."""
    max_sentences: int = setting(0, ints(0))
    """Sentences per batch at most; 0: unlimited."""
    shuffle: bool = setting(True, FLAG)
    """Shuffle the training batches every epoch."""
    sampling_temperature: float = setting(1.0, POSITIVE)
    """Multilingual data: direction i is drawn with probability ~ n_i^(1/T); 1 = in proportion to the data
    (every pair once an epoch), 5 = OPUS-100 / mBART. A single-pair directory ignores it."""


@dataclass
class LogConfig:
    """Where the run writes, how often it logs, validates and saves."""

    save_dir: str = setting("runs/default", PATH)
    """Checkpoints, log.jsonl and TensorBoard events go here."""
    log_interval: int = setting(10, ints(1))
    """Steps between training log records."""
    valid_interval: int = setting(200, ints(1))
    """Steps between validation loss (and checkpoint saves)."""
    bleu_sentences: int = setting(100, ints(0))
    """Validation subset decoded for BLEU at each validation; 0: off."""
    bleu_beam: int = setting(1, ints(1))
    """Beam size of that decoding."""
    keep_last: int = setting(2, ints(0))
    """Checkpoints kept besides the best; 0: every one."""
    async_save: bool = setting(True, FLAG)
    """Native engines: snapshot to host memory, write and publish in the background."""
    max_failed_saves: int = setting(3, ints(1))
    """Native engines: saves that may fail in a row (training goes on, the previous checkpoint stays latest)
    before the run stops with exit 2."""
    tensorboard: bool = setting(True, FLAG)
    """Write TensorBoard scalars next to log.jsonl."""
    health: bool = setting(True, FLAG)
    """Per-layer gradient norms and update ratios at log intervals (training/health.py), and a warning when a
    stack's bottom layers stop learning."""
    progress: str = setting("auto", Choice(("auto", "bar", "none")))
    """auto (a bar on a terminal), bar or none."""


@dataclass
class Config:
    """A whole run: the seed and one section per concern."""

    seed: int = setting(1, Range(0, 2**63 - 1, integer=True))
    """Seeds initialization, dropout and the batch order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor, pipeline and data parallelism."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, schedule, loss and precision."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data directory and batching."""
    log: LogConfig = field(default_factory=LogConfig)
    """Outputs, logging, validation and saving."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> Config:
        cfg = cls()
        _apply(cfg, d, where)
        try:
            cfg.validate()
        except InvalidValue as e:
            raise UserError(f"{where}: {e}") from None
        return cfg

    def validate(self) -> None:
        """Every field by its declared rule, then the relations between fields; InvalidValue (a UserError naming
        the field) on the first one that is not valid."""
        for s in settings(self):
            if not (s.value is None and s.optional):
                s.rule.check(s.key, s.value)
        m = self.model
        if m.deepnorm_init is True and m.residual in RESIDUALS_WITH_OWN_INIT:
            raise InvalidValue(
                "model.deepnorm_init",
                f"model.deepnorm_init=True is invalid: must be unset or false "
                f"with model.residual={m.residual} (it has its own "
                f"initialisation)",
            )
        if m.d_model % m.n_heads:
            raise InvalidValue(
                "model.n_heads",
                f"model.n_heads={m.n_heads!r} is invalid: must be a divisor of model.d_model={m.d_model}",
            )
        p = self.parallel
        if p.sequence_parallel and p.tp == 1:
            raise InvalidValue(
                "parallel.sequence_parallel",
                "parallel.sequence_parallel=True is invalid: must be "
                "false with parallel.tp=1 (it splits the sequence over the tensor-parallel ranks)",
            )
        if p.sequence_parallel and m.residual == "admin":
            raise InvalidValue(
                "parallel.sequence_parallel",
                "parallel.sequence_parallel=True is invalid: must be "
                "false with model.residual=admin (Admin's profiling pass takes variances over whole "
                "sequences, which sequence parallelism splits over the tensor-parallel ranks)",
            )
        if p.sequence_parallel and m.max_positions % p.tp:
            raise InvalidValue(
                "model.max_positions",
                f"model.max_positions={m.max_positions} is invalid: must be a "
                f"multiple of parallel.tp={p.tp} with parallel.sequence_parallel (sequences are "
                f"padded to one)",
            )


class Setting(NamedTuple):
    """One field of a config as declared: dotted key, current value, rule, and whether None (unset) is valid."""

    key: str
    value: Any
    rule: Rule
    optional: bool


def settings(obj: Any, prefix: str = "") -> list[Setting]:
    """Every field of a config (a Config or one section), nested sections walked, in declaration order."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += settings(value, f"{prefix}{f.name}.")
        else:
            out.append(_setting(f, value, prefix))
    return out


def _setting(f: dataclasses.Field, value: Any, prefix: str) -> Setting:
    return Setting(f"{prefix}{f.name}", value, f.metadata["rule"], "None" in str(f.type))


def ranges() -> dict[str, Range]:
    """{dotted key: Range} of every numeric field (what command-line checks and tests/test_config.py read)."""
    return {s.key: s.rule for s in settings(Config()) if isinstance(s.rule, Range)}


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
        elif value is None:  # YAML's null, and `--set key=` (nothing after the =)
            setattr(obj, key, _empty(_setting(fields[key], current, prefix), where))
        else:
            setattr(obj, key, _coerce(value, current, f"{prefix}{key}", where))


def _empty(s: Setting, where: str) -> Any:
    """What an empty or null value of a field becomes: None for an optional field, the rule's empty value (a
    layout's ""), else a one-line UserError naming the field (checked here, where the value enters, so no caller
    ever sees a None it did not allow)."""
    if s.optional:
        return None
    if s.rule.empty is None:
        each = " (each)" if isinstance(s.value, tuple) else ""
        raise UserError(f"{where}: {s.key} is empty: must be {s.rule.describe()}{each}")
    return s.rule.empty


def _coerce(value: Any, current: Any, key: str, where: str) -> Any:
    """Coerce a YAML/JSON/--set value (not None) to the type of the field's default."""
    if current is None:
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
        except Exception as e:  # any parse failure is the user's file
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
