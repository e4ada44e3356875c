"""The instruments of a rehearsal: one rank's training step run at full size on one CPU, on fake tensors, over a
fake world, measured against the plan (megabranch/rehearse.py builds the engine and runs the step with these).

    fake_world(rank, world)  torch.distributed's "fake" backend: any rank of any world size in one process.
                             Collectives and point-to-point messages move nothing; a receive buffer is the tensor
                             of the planned shape and dtype that the executor allocates, a fake one here.
    FakeTensorMode           (torch) tensors with shapes, dtypes and devices but no storage: the real model, stage,
                             executor and optimizer code runs unchanged, at full size, in seconds.
    MemoryTimeline           a dispatch mode that sees every tensor the step creates: the bytes of every storage
                             alive at each moment by kind (parameters, gradients, optimizer state, activations,
                             message buffers, backward temporaries, other), the peak and the action of the step it
                             falls in (the executor's on_action), and each op's FLOPs (torch.utils.flop_counter's
                             formulas) and roofline time on a named GPU (GPUS).
    HostReads                every device-to-host read (.item(), .tolist(), float(t), Python branching on a tensor,
                             .cpu(), a data-dependent shape) answered so the step goes on, and counted by source
                             line and by whether it falls inside the micro-batch loop (the timeline calls it).
    gpu_kernels()            layer_norm in float32 under autocast and dropout's boolean mask, as CUDA computes
                             them, so the CPU's tensors keep what the GPU run's keep.

What a rehearsal cannot see: NCCL's own buffers, the caching allocator's fragmentation (every storage is rounded
up to the allocator's 512-byte granule, nothing more), the workspace kernels allocate internally, and time spent
communicating; its times are roofline predictions, not measurements.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from ..errors import UserError
from ..parallel.schedules import simulate


# --- the GPUs a rehearsal prices its roofline for ------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense tensor-core peak, FLOP/s (bf16 and fp16)
    fp32_flops: float  # without tensor cores (torch's default: TF32 off for float32 matrix products)
    hbm_bytes_s: float  # memory bandwidth, bytes/s

    def matmul_flops(self, dtype: torch.dtype) -> float:
        return self.bf16_flops if dtype in (torch.bfloat16, torch.float16) else self.fp32_flops


# NVIDIA's data sheets: A100 SXM4 80 GB and H100 SXM5 80 GB
GPUS = {
    "A100": GPU("A100 SXM4 80GB", 312e12, 19.5e12, 2.039e12),
    "H100": GPU("H100 SXM5 80GB", 989.4e12, 66.9e12, 3.35e12),
}


def gpu_named(name: str) -> GPU:
    """The GPU `name` (case-insensitive) -> its specs; a one-line UserError naming the choices otherwise."""
    for key, gpu in GPUS.items():
        if name.strip().upper() == key:
            return gpu
    raise UserError(f"--gpu {name!r} is unknown: choose one of {', '.join(GPUS)}")


# --- a world of N ranks in this process ------------------------------------------------------------------------------
@contextlib.contextmanager
def fake_world(rank: int, world: int):
    """This process as global rank `rank` of `world` over the fake process-group backend (nothing moves)."""
    if dist.is_initialized():
        raise UserError("--rehearse runs every rank in one process: start it without torchrun")
    dist.init_process_group("fake", rank=rank, world_size=world)  # torch brings its store
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def autocast_of(precision):
    """`precision`'s autocast (training/precision.py). torch.autocast turns itself off for CUDA when no GPU is
    present; a rehearsal on fake CUDA tensors sets autocast's state directly instead, so they get the GPU run's
    casts."""
    device, dtype = precision.device_type, precision.amp_dtype
    if dtype is None or device != "cuda" or torch.cuda.is_available():
        with precision.autocast():
            yield
        return
    before = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    torch.set_autocast_enabled(device, True)
    torch.set_autocast_dtype(device, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device, before[0])
        torch.set_autocast_dtype(device, before[1])


@contextlib.contextmanager
def gpu_kernels():
    """CPU tensors computed as CUDA tensors are, where that changes what autograd keeps: layer_norm runs in float32
    under bf16 / fp16 autocast (CUDA autocast's float32 list; the CPU's keeps the input dtype), and dropout is the
    fused kernel that keeps a boolean mask (the CPU's keeps a mask in the input's dtype). torch.nn.functional's two
    functions are swapped for the context: the model's modules call them by name, in the forward and in a
    recomputation during the backward alike (where a torch function mode would no longer be active)."""
    layer_norm, dropout = F.layer_norm, F.dropout

    def gpu_layer_norm(x, *args, **kwargs):
        if torch.is_autocast_enabled("cpu") and x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return layer_norm(x, *args, **kwargs)

    def gpu_dropout(x, p: float = 0.5, training: bool = True, inplace: bool = False):
        if training and 0.0 < p < 1.0 and not inplace and x.numel():
            return torch.native_dropout(x, p, True)[0]
        return dropout(x, p, training, inplace)

    F.layer_norm, F.dropout = gpu_layer_norm, gpu_dropout
    try:
        yield
    finally:
        F.layer_norm, F.dropout = layer_norm, dropout


# --- device-to-host reads ----------------------------------------------------------------------------------------
class SyncLog:
    """Device-to-host reads of a step: (what, source line, inside the micro-batch loop) -> count."""

    def __init__(self):
        self.counts: dict = defaultdict(int)

    def add(self, what: str, inside: bool) -> None:
        self.counts[(what, _caller(), inside)] += 1

    def inside_loop(self) -> int:
        return sum(n for (_, _, inside), n in self.counts.items() if inside)

    def outside_loop(self) -> int:
        return sum(n for (_, _, inside), n in self.counts.items() if not inside)

    def lines(self) -> list[str]:
        return [
            f"{n} x {what} at {where}{' (in the micro-batch loop)' if inside else ''}"
            for (what, where, inside), n in sorted(self.counts.items(), key=lambda kv: (not kv[0][2], kv[0][1]))
        ]


def _caller() -> str:
    """file:line (function) of the nearest megabranch frame outside this module."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if "/megabranch/" in name and not name.endswith("/planning/rehearsal.py"):
            return f"{name[name.rindex('/megabranch/') + 1 :]}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "torch"


def _flat(data) -> list:
    if isinstance(data, (list, tuple)):
        return [x for part in data for x in _flat(part)]
    return [float(data) if isinstance(data, float) else data]


class HostReads:
    """Device-to-host reads (a tensor's value read into Python: .item(), .tolist(), float(t), bool(t) and Python
        branching on a tensor, .cpu(), .numpy()) counted in `log` by source line and by whether they fall inside the
        micro-batch loop; on fake tensors, answered so the step goes on.

        The answer is the data a tensor was made from with torch.tensor (the engine's step counter, token counts,
        skip decision) until an op changes it in place (a collective over the fake world changes nothing: every rank
        sees its own values); 1 for any other (a finite norm, a loss). `host_tensor` marks a tensor a GPU run keeps
        in host memory (AdamW's step counters): its reads are answered, not counted. A tolist() counts once (its
        first element). MemoryTimeline calls `read` and `changed` for every op; as a context, this patches
        torch.tensor (to learn the data), Tensor.cpu, .numpy and .tolist (which a CPU tensor answers without an op;
    a fake one's tolist() reads each element, counted once)."""

    def __init__(self, log: SyncLog, answer: bool = True):
        self.log, self.answer = log, answer
        self.inside = False  # set by the timeline: in the micro-batch loop now
        self._known: dict = {}  # id(storage) -> (flat values, weakref)
        self._host: dict = {}  # id(storage) -> weakref
        self._patched: list = []
        self._counting = False  # a counted cpu() / numpy() / tolist() is under way: its element reads are not

    def _remember(self, table: dict, t: torch.Tensor, value) -> None:
        st = t.untyped_storage()
        key = id(st)
        table[key] = (value, weakref.ref(st, lambda _, k=key: table.pop(k, None)))

    @property
    def known_values(self) -> bool:
        return bool(self._known)

    def host_tensor(self, t: torch.Tensor) -> None:
        self._remember(self._host, t, True)

    def changed(self, t: torch.Tensor) -> None:
        self._known.pop(id(t.untyped_storage()), None)

    def read(self, t: torch.Tensor):
        """A scalar read of `t` (an element at its storage offset): -> the answer, or None to read it really."""
        key = id(t.untyped_storage())
        offset = t.storage_offset()
        if key not in self._host and offset == 0 and not self._counting:
            self.log.add("read", self.inside)
        if not self.answer:
            return None
        known = self._known.get(key)
        value = known[0][offset] if known is not None and offset < len(known[0]) else 1
        if t.is_floating_point():
            return float(value)
        return bool(value) if t.dtype == torch.bool else int(value)

    def __enter__(self):
        tensor, cpu, numpy, tolist = torch.tensor, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist
        reads = self

        def made(*args, **kwargs):
            out = tensor(*args, **kwargs)
            data = args[0] if args else kwargs.get("data")
            if isinstance(out, torch.Tensor) and not isinstance(data, torch.Tensor):
                reads._remember(reads._known, out, _flat(data))
            return out

        def copied(what, method):
            def read(t, *args, **kwargs):
                if id(t.untyped_storage()) not in reads._host:
                    reads.log.add(what, reads.inside)
                reads._counting, before = True, reads._counting  # a fake tensor's tolist() reads each element
                try:
                    return method(t, *args, **kwargs)
                finally:
                    reads._counting = before

            return read

        self._patched = [
            (torch, "tensor", tensor),
            (torch.Tensor, "cpu", cpu),
            (torch.Tensor, "numpy", numpy),
            (torch.Tensor, "tolist", tolist),
        ]
        torch.tensor, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist = (
            made,
            copied("cpu()", cpu),
            copied("numpy()", numpy),
            copied("tolist()", tolist),
        )
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._patched:
            setattr(owner, name, value)
        self._patched = []


# --- memory, FLOPs and roofline time ------------------------------------------------------------------------------
KINDS = ("params", "grads", "optim", "acts", "msgs", "temps", "other")
GRANULE = 512  # bytes: the CUDA caching allocator's smallest block, every allocation rounded up to it

_aten = torch.ops.aten
# metadata queries: nothing allocated, nothing computed
_PASS = {
    _aten.sym_size.default,
    _aten.sym_stride.default,
    _aten.sym_numel.default,
    _aten.sym_storage_offset.default,
    _aten.is_contiguous.default,
    _aten.is_contiguous.memory_format,
    _aten.dim.default,
    _aten.numel.default,
    _aten.size.default,
    _aten.stride.default,
    torch.ops.prim.device.default,
    torch.ops.prim.layout.default,
    _aten.is_strides_like_format.default,
    _aten.is_non_overlapping_and_dense.default,
}
_DEVICE = torch.ops.prim.device.default
_FLOPS = dict(flop_registry)


# the CPU's attention kernel, which torch's counter leaves out; under a causal mask the half a flash kernel computes
# (torch's formulas count the whole square), as the cost model counts it
def _cpu_attention(q, k, v, dropout_p=0.0, is_causal=False, *args, out_val=None, **kwargs):
    return sdpa_flop_count(q.shape, k.shape, v.shape) // (2 if is_causal else 1)


def _cpu_attention_backward(g, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, out_val=None, **kwargs):
    return sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape) // (2 if is_causal else 1)


_FLOPS[_aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention
_FLOPS[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_attention_backward
_RECV = {torch.ops.c10d.recv_.default, torch.ops.c10d.recv_any_source_.default}
_DATA_DEPENDENT = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.index.Tensor}
_MUTATES: dict = {}  # op -> whether it writes into its first argument


def _mutates(func) -> bool:
    known = _MUTATES.get(func)
    if known is None:
        args = func._schema.arguments
        info = args[0].alias_info if args else None
        known = _MUTATES[func] = bool(info is not None and info.is_write)
    return known


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            if isinstance(y, torch.Tensor):
                yield y


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Peak:
    total: int = 0
    kinds: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    where: str = ""


class MemoryTimeline(TorchDispatchMode):
    """Every storage created under it (and alive), by kind; the peak and where it falls; FLOPs and roofline
    seconds by phase of the step ("F0" forward of local chunk 0, "B0", "W0", "step" for the rest).

    New storages take the kind of the moment (`phase`): a forward's are activations, a backward's or W's
    temporaries, the rest "other"; received buffers are message buffers; `retag` moves a storage to another
    kind (parameters, gradients, optimizer state: see megabranch/rehearse.py). Storages freed by
    `UntypedStorage.resize_(0)` (the executor's sent activations) count as freed then, on any thread."""

    def __init__(self, gpu: GPU, granule: int = GRANULE, reads: HostReads | None = None):
        super().__init__()
        self.gpu, self.granule = gpu, granule
        self.reads = reads if reads is not None else HostReads(SyncLog())
        self.fake = self.reads.answer
        self.now = dict.fromkeys(KINDS, 0)
        self.total = 0
        self.peak = Peak()
        self.kind, self.phase, self.where = "other", "step", "building the engine"
        self.in_loop = False
        self.flops: dict = defaultdict(float)
        self.seconds: dict = defaultdict(float)
        self.held: dict = defaultdict(int)  # by phase: bytes its actions left held, summed over micro-batches
        self.actions: dict = defaultdict(int)  # by phase: how many actions ran
        self.rise: dict = defaultdict(int)  # by phase: the most bytes above its start one action reached
        self.high: dict = defaultdict(int)  # by phase: the most bytes alive while one of its actions ran
        self._started = self._high = 0
        self._window = ""
        self.at_end: dict = {}  # bytes by kind when the schedule's last action is done
        self._live: dict = {}  # id(storage) -> [bytes, kind, weakref]
        self._lock = threading.Lock()
        self._resize = None

    # --- where the step is ---------------------------------------------------------------------------------------
    def action(self, op: str, v, i) -> None:
        """The executor's on_action: the next action starts ("end": the schedule is done)."""
        if op == "end":
            self.at("after the schedule (gradient buckets, tied tables, clipping, optimizer)", window="after")
            self.at_end = dict(self.now)
            return
        self._open(f"{op}{v}")
        self.kind = "acts" if op == "F" else "temps"
        self.phase, self.where = f"{op}{v}", f"{op} of local chunk {v}, micro-batch {i}"
        self.in_loop = self.reads.inside = True

    def at(self, where: str, kind: str = "other", window: str = "") -> None:
        """Outside the schedule's actions: `where` names the moment; new storages are `kind`; a `window` name
        measures what happens from here to the next action or at() (held, rise)."""
        self._open(window)
        self.kind, self.phase, self.where = kind, "step", where
        self.in_loop = self.reads.inside = False

    def _open(self, window: str) -> None:
        """Close the measuring window that was open (the bytes it left held, and the most above its start it
        reached), open `window` ("": none)."""
        if self._window:
            self.held[self._window] += self.total - self._started
            self.actions[self._window] += 1
            self.rise[self._window] = max(self.rise[self._window], self._high - self._started)
            self.high[self._window] = max(self.high[self._window], self._high)
        self._window = window
        self._started = self._high = self.total

    def reset_peak(self) -> None:
        self.peak = Peak(self.total, dict(self.now), self.where)

    # --- storages -----------------------------------------------------------------------------------------------
    def _size(self, n: int) -> int:
        return -(-n // self.granule) * self.granule if self.granule > 1 else n

    def _add(self, t: torch.Tensor, kind: str) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        n = self._size(st.nbytes())
        with self._lock:
            self._live[key] = [n, kind, weakref.ref(st, lambda _, k=key: self._free(k))]
            self.now[kind] += n
            self.total += n
            self._high = max(self._high, self.total)
            if self.total > self.peak.total:
                self.peak = Peak(self.total, dict(self.now), self.where)

    def _free(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.now[entry[1]] -= entry[0]
                self.total -= entry[0]

    def retag(self, t: torch.Tensor, kind: str) -> None:
        """Count t's storage as `kind` from now on (tracking it if it was made before the timeline started)."""
        st = t.untyped_storage()
        entry = self._live.get(id(st))
        if entry is None:
            self._add(t, kind)
            return
        with self._lock:
            if entry[1] != kind:
                self.now[entry[1]] -= entry[0]
                self.now[kind] += entry[0]
                entry[1] = kind

    def _resized(self, st, size: int) -> None:
        entry = self._live.get(id(st))
        if entry is None:
            return
        n = self._size(size)
        with self._lock:
            self.now[entry[1]] += n - entry[0]
            self.total += n - entry[0]
            entry[0] = n

    def __enter__(self):
        original = torch.UntypedStorage.resize_
        timeline = self

        def resize_(st, size):
            out = original(st, size)
            timeline._resized(st, size)
            return out

        self._resize = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    # --- every op ---------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEVICE:  # asked for most often, by autograd and autocast: answered without the fake mode's call
            device = getattr(args[0], "fake_device", None)
            return device if device is not None else func(*args)
        if func in _PASS:
            return func(*args, **kwargs)
        if func in _DATA_DEPENDENT:
            return self._data_dependent(func, args, kwargs)
        if self.reads.known_values and func.namespace != "c10d" and _mutates(func):  # (a fake collective: no)
            for t in _tensors(args[0]):
                self.reads.changed(t)
        out = func(*args, **kwargs)
        if func in _RECV:  # the buffer the executor allocated for a message: a message buffer from now on
            for t in _tensors(args[0]):
                self.retag(t, "msgs")
        self._count(func, args, kwargs, out)
        return out

    def _data_dependent(self, func, args, kwargs):
        """What depends on the values: a scalar read HostReads did not see (torch's own), a boolean mask's
        size (which also syncs a GPU). Fake tensors get 1 and every element selected (the largest); real ones run."""
        if func is _aten._local_scalar_dense.default:
            value = self.reads.read(args[0])
            if value is not None:
                return value
        elif func is _aten.nonzero.default:  # where a CUDA tensor's boolean index goes
            self.reads.log.add("nonzero", self.in_loop)
            if self.fake:
                x = args[0]
                return torch.zeros((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        elif any(i is not None and i.dtype == torch.bool for i in args[1]):
            # a boolean mask's size depends on the data (and syncs a GPU): taken as all True, the largest
            self.reads.log.add("boolean-mask index", self.in_loop)
            if self.fake:
                index = []
                for i in args[1]:
                    if i is not None and i.dtype == torch.bool:
                        index += [torch.zeros(i.numel(), dtype=torch.long, device=i.device)] * i.dim()
                    else:
                        index.append(i)
                args = (args[0], index)
        out = func(*args, **kwargs)
        self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        """Track the storages `out` holds; add the op's FLOPs and roofline seconds to the phase."""
        kind = self.kind
        if func is _aten._to_copy.default and args[0].requires_grad and args[0].is_leaf:
            kind = "other"  # autocast's low-precision copy of a weight, kept for the whole step
        moved = 0
        if isinstance(out, torch.Tensor):
            self._add(out, kind)
            moved = _nbytes(out)
        elif isinstance(out, (tuple, list)):
            for t in _tensors(out):
                self._add(t, kind)
                moved += _nbytes(t)
        if func.is_view:
            return
        for a in args:
            for t in _tensors(a):
                moved += _nbytes(t)
        seconds = moved / self.gpu.hbm_bytes_s
        count = _FLOPS.get(func._overloadpacket)
        if count is not None:
            flops = count(*args, **kwargs, out_val=out)
            self.flops[self.phase] += flops
            dtype = args[0].dtype if isinstance(args[0], torch.Tensor) else torch.float32
            seconds = max(seconds, flops / self.gpu.matmul_flops(dtype))
        self.seconds[self.phase] += seconds


def phase_totals(values: dict, vpp: int) -> tuple[list, list, list, float]:
    """(F, B, W per local chunk, the rest) of a per-phase dict such as MemoryTimeline.flops."""
    pick = [[values.get(f"{op}{v}", 0.0) for v in range(vpp)] for op in "FBW"]
    return pick[0], pick[1], pick[2], values.get("step", 0.0)


def roofline_step(kind: str, pp: int, vpp: int, m: int, f: list, b: list, w: list) -> float:
    """The makespan of the schedule's action lists on an ideal machine (schedules.simulate: the bubble included)
    with each chunk's measured forward, B and W seconds of one micro-batch (pipeline order)."""
    return simulate(kind, pp, vpp, m, f, b, w)
