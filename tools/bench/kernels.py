"""Benchmark of the fused residual LayerNorm (issue 4) against the eager PyTorch composition.

    python -m tools.bench.kernels                       # CPU: a grid that runs in ~2 minutes
    python -m tools.bench.kernels --device cuda         # GPU: hidden 512/1024/4096 x rows 8k..64k
    python -m tools.bench.kernels --hidden 512 --rows 16384 --dtype float32 bfloat16

Times forward and backward of y = LayerNorm(r * x + s * dropout(f)) (training mode, gradients
for x, f, weight and bias) for

* fused: megabranch.ops.residual_layernorm (the C++/CUDA extension);
* eager: the plain composition F.layer_norm(r * x + s * F.dropout(f)) with autograd;
* apex:  apex.normalization.FusedLayerNorm after an eager r * x + s * dropout(f), when apex is
  importable and the device is CUDA.

Byte model (what a perfect kernel must move, with e bytes per element, N rows, H columns):
  forward  reads x, f and writes y                      -> 3 * N * H * e
  backward reads dy, x, f and writes dx, df              -> 5 * N * H * e
(x and f are re-read in backward to recompute the normalised input instead of saving it; the
per-row mean/rstd and the H-sized parameters are ignored).  "GB/s" is that byte count divided
by the measured forward+backward time, for every implementation alike.

Prints a Markdown table (times are medians over repetitions, ms) with the device, torch
version and thread count. --copy-reference also measures a plain device copy (y.copy_(x) of 1 GiB on a
GPU, 64 MiB on the CPU; read + write bytes over time) and adds each row's fused GB/s as a share of it: what
a memory-bound kernel can reach on that device.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from megabranch.ops import backend, eager_residual_layernorm, residual_layernorm

from .machine import cpu_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _apex_layer_norm():
    try:
        from apex.normalization import FusedLayerNorm  # type: ignore
    except Exception:  # any import problem means: no apex column
        return None
    return FusedLayerNorm


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.multi_processor_count} SMs), CUDA {torch.version.cuda}"
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fn, inputs, dy, device, min_time=1.0, min_reps=5, max_reps=50, warmup=2):
    """Median forward and backward times (seconds) of y = fn(*inputs); y.backward(dy)."""
    x, f, w, b = inputs

    def once():
        for t in (x, f, w, b):
            t.grad = None
        _sync(device)
        t0 = time.perf_counter()
        y = fn()
        _sync(device)
        t1 = time.perf_counter()
        y.backward(dy)
        _sync(device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    for _ in range(warmup):
        once()
    fwd, bwd = [], []
    start = time.perf_counter()
    while len(fwd) < max_reps and (len(fwd) < min_reps or time.perf_counter() - start < min_time):
        a, c = once()
        fwd.append(a)
        bwd.append(c)
    return statistics.median(fwd), statistics.median(bwd)


def time_fwd_bwd_cuda(fn, inputs, dy, device, reps=20, warmup=3):
    """CUDA-event timing (no host sync between forward and backward)."""
    x, f, w, b = inputs
    fwd, bwd = [], []
    for i in range(warmup + reps):
        for t in (x, f, w, b):
            t.grad = None
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        y = fn()
        e1.record()
        y.backward(dy)
        e2.record()
        torch.cuda.synchronize(device)
        if i >= warmup:
            fwd.append(e0.elapsed_time(e1) / 1e3)
            bwd.append(e1.elapsed_time(e2) / 1e3)
    return statistics.median(fwd), statistics.median(bwd)


def copy_bandwidth(device, nbytes: int | None = None, reps: int = 10) -> float:
    """GB/s of y.copy_(x) (bytes read + written), the median over `reps` copies."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**26)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    times = []
    for _ in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[2:]) / 1e9


def bench_one(rows, hidden, dtype, device, p, apex_ln, min_time):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    f = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype)
    r = torch.tensor(1.7, device=device)
    s = torch.tensor(0.8, device=device)
    training = p > 0

    impls = {
        "fused": lambda: residual_layernorm(x, f, w, b, r, s, dropout_p=p, training=training),
        "eager": lambda: eager_residual_layernorm(x, f, w, b, r, s, dropout_p=p, training=training),
    }
    if apex_ln is not None:
        ln = apex_ln(hidden).to(device=device, dtype=dtype)
        impls["apex"] = lambda: ln(r * x + s * F.dropout(f, p=p, training=training))

    elem = torch.finfo(dtype).bits // 8
    nbytes = 8 * rows * hidden * elem  # 3 (forward) + 5 (backward) tensors
    out = {}
    for name, fn in impls.items():
        if device.type == "cuda":
            tf, tb = time_fwd_bwd_cuda(fn, (x, f, w, b), dy, device)
        else:
            tf, tb = time_fwd_bwd(fn, (x, f, w, b), dy, device, min_time=min_time)
        out[name] = (tf, tb, nbytes / (tf + tb) / 1e9)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (default 512 1024 4096)")
    parser.add_argument(
        "--rows", type=int, nargs="+", help="row counts (default: CPU 8192 16384; CUDA 8192 16384 32768 65536)"
    )
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout p (default 0)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--copy-reference",
        action="store_true",
        help="also measure a device copy's GB/s and give each fused row as a share of it",
    )
    parser.add_argument(
        "--min-time", type=float, default=1.0, help="CPU: seconds of repetitions per measurement (at least 5 reps)"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = args.hidden or [512, 1024, 4096]
    rows = args.rows or ([8192, 16384, 32768, 65536] if device.type == "cuda" else [8192, 16384])
    impl = backend(device)
    apex_ln = _apex_layer_norm() if device.type == "cuda" else None

    print(f"- date: {datetime.date.today().isoformat()}")
    print(f"- device: {device_description(device)}")
    print(
        f"- torch {torch.__version__}, threads: {torch.get_num_threads()}, "
        f"fused backend: {impl}, dropout p = {args.dropout}"
    )
    if impl == "eager":
        print("- WARNING: the extension is not in use, 'fused' below is the eager fallback")
    print(f"- apex FusedLayerNorm: {'yes' if apex_ln is not None else 'not available'}")
    print(
        "- byte model: forward 3*N*H*e (x, f in; y out), backward 5*N*H*e "
        "(dy, x, f in; dx, df out); GB/s = 8*N*H*e / (fwd + bwd time)"
    )
    copy_gbs = copy_bandwidth(device) if args.copy_reference else None
    if copy_gbs:
        print(f"- device copy (y.copy_(x), read + write): {copy_gbs:.1f} GB/s")
    print()
    head = [
        "hidden",
        "rows",
        "dtype",
        "fused fwd",
        "fused bwd",
        "fused fwd+bwd",
        "fused GB/s",
        "eager fwd",
        "eager bwd",
        "eager fwd+bwd",
        "eager GB/s",
        "speedup",
    ]
    if copy_gbs:
        head += ["fused / copy GB/s"]
    if apex_ln is not None:
        head += ["apex+add fwd+bwd", "apex GB/s", "speedup vs apex"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for dt in args.dtype:
        for h in hidden:
            for n in rows:
                res = bench_one(n, h, DTYPES[dt], device, args.dropout, apex_ln, args.min_time)
                ff, fb, fgb = res["fused"]
                ef, eb, egb = res["eager"]
                cells = [
                    str(h),
                    str(n),
                    dt,
                    f"{ff * 1e3:.2f}",
                    f"{fb * 1e3:.2f}",
                    f"{(ff + fb) * 1e3:.2f}",
                    f"{fgb:.1f}",
                    f"{ef * 1e3:.2f}",
                    f"{eb * 1e3:.2f}",
                    f"{(ef + eb) * 1e3:.2f}",
                    f"{egb:.1f}",
                    f"{(ef + eb) / (ff + fb):.2f}x",
                ]
                if copy_gbs:
                    cells.append(f"{100 * fgb / copy_gbs:.0f}%")
                if "apex" in res:
                    af, ab, agb = res["apex"]
                    cells += [f"{(af + ab) * 1e3:.2f}", f"{agb:.1f}", f"{(af + ab) / (ff + fb):.2f}x"]
                print("| " + " | ".join(cells) + " |", flush=True)
    print()
    print("Times in ms (medians); speedup = eager time / fused time (forward + backward).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
