"""Training-step throughput and peak memory: megabranch (eager / fused kernels) vs a fairseq-style reference.

    python -m tools.bench.train --d-model 64 --layers 6 --tokens 1024
    python -m tools.bench.train --d-model 256 --layers 6 --tokens 4096 --steps 3
    python -m tools.bench.train --device cuda --precision bf16 --d-model 512 --layers 6 --tokens 16384   # + MFU

The same Post-LN encoder-decoder (d, heads, ffn = 4d, layers, shared 8k vocabulary, dropout 0.1; hence the same
FLOPs) trained one full step at a time (forward, label-smoothed loss, backward, gradient norm, AdamW):

* megabranch-eager: megabranch.training.engine.Trainer.train_step on build_model(model.residual=post_ln);
* megabranch-fused: the same with model.fused_kernels=true (megabranch.ops.residual_layernorm);
* megabranch-compiled: megabranch-eager with model.compile=true (each layer torch.compiled, --compile-backend);
  megabranch-compiled-fused: compiled and fused;
* reference: reference_transformer.py, written as fairseq writes `transformer`, with the same step.

Timing is round-robin (each round times every implementation for --steps steps, in turn) so a noisy shared
machine slows all of them alike; the per-step time is the median over rounds. Peak memory is measured in a fresh
child process per implementation: after one step (which allocates gradients and the AdamW state) the kernel's
peak-RSS mark is reset, then the peak RSS over the next steps and its growth over the RSS before them (the
step's working set: activations, gradients' temporaries, autograd buffers; on CUDA the allocator's peak).
Model FLOPs per step are counted analytically (`train_flops`: every matrix product of forward and backward,
attention included, as torch's FlopCounterMode counts them); achieved TFLOP/s is printed always, and model FLOPs
utilisation (MFU) against --peak-tflops, which defaults to the dense peak of known GPUs for the precision.
The "first step" column is the first warm-up step's time: for the compiled rows that includes compilation.
Prints a Markdown table and the ratios.
A benchmark, not a test: tests run it at toy size only to check that it works.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from megabranch.config import load_config
from megabranch.model import count_parameters
from megabranch.ops import backend, fallback_reason
from megabranch.training.engine import Trainer

from .reference_transformer import ReferenceTransformer, label_smoothed_loss

ROOT = Path(__file__).resolve().parents[2]

IMPLS = ("megabranch-eager", "megabranch-fused", "megabranch-compiled", "megabranch-compiled-fused", "reference")
DEFAULT_IMPLS = ("megabranch-eager", "megabranch-fused", "megabranch-compiled", "reference")


def make_batch(tokens: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    bsz = max(1, tokens // seq_len)
    src = torch.randint(4, vocab, (bsz, seq_len), generator=g)
    tgt = torch.randint(4, vocab, (bsz, seq_len), generator=g)
    prev = torch.cat([torch.full((bsz, 1), 2), tgt[:, :-1]], 1)
    return {"src_tokens": src, "prev_output_tokens": prev, "target": tgt, "ntokens": int(tgt.numel())}


# Dense peak TFLOP/s by (device-name fragment, precision): the vendors' datasheet numbers without sparsity.
PEAK_TFLOPS = {
    ("H100", "bf16"): 989.4,
    ("H200", "bf16"): 989.4,
    ("A100", "bf16"): 312.0,
    ("H100", "fp32"): 66.9,
    ("H200", "fp32"): 66.9,
    ("A100", "fp32"): 19.5,
}


def train_flops(
    bsz: int, src_len: int, tgt_len: int, d: int, ffn: int, vocab: int, enc_layers: int, dec_layers: int
) -> int:
    """FLOPs of one training step (forward + backward = 3x forward) of the encoder-decoder: all matrix products
    (projections, FFN, attention scores and values over the full length, the output projection); 2 per
    multiply-add. Embeddings, LayerNorm, softmax and the optimizer are not counted (MFU convention)."""
    B, S, T = bsz, src_len, tgt_len
    enc = 2 * B * S * (4 * d * d + 2 * d * ffn) + 4 * B * S * S * d
    dec = (
        2 * B * T * 4 * d * d
        + 4 * B * T * T * d  # self-attention
        + 2 * B * T * 2 * d * d
        + 2 * B * S * 2 * d * d
        + 4 * B * T * S * d  # cross-attention
        + 2 * B * T * 2 * d * ffn
    )  # FFN
    return 3 * (enc_layers * enc + dec_layers * dec + 2 * B * T * d * vocab)


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for (frag, prec), v in PEAK_TFLOPS.items() if frag in name and prec == args.precision), None)


def build_step(impl: str, args):
    """-> (step function running one training step, parameter count)."""
    device = torch.device(args.device)
    if impl.startswith("megabranch"):
        cfg = load_config(
            None,
            [
                "model.residual=post_ln",
                f"model.d_model={args.d_model}",
                f"model.n_heads={args.heads}",
                f"model.ffn_dim={4 * args.d_model}",
                f"model.encoder_layers={args.layers}",
                f"model.decoder_layers={args.layers}",
                f"model.fused_kernels={'true' if impl.endswith('fused') else 'false'}",
                "optim.warmup_updates=100",
                f"model.compile={'true' if 'compiled' in impl else 'false'}",
                f"model.compile_backend={args.compile_backend}",
                f"model.compile_dynamic={'false' if args.compile_static else 'true'}",
                "optim.lr=0.0005",
                f"optim.precision={args.precision}",
            ],
        )
        trainer = Trainer(cfg, args.vocab, device=device, init_seed=1)
        return (lambda batch: trainer.train_step([batch])), count_parameters(trainer.model)

    torch.manual_seed(1)
    model = ReferenceTransformer(args.vocab, args.d_model, args.heads, 4 * args.d_model, args.layers, args.layers)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(batch):
        model.train()
        src, prev, tgt = (batch[k].to(device) for k in ("src_tokens", "prev_output_tokens", "target"))
        with amp:
            logits = model(src, prev)
        loss = label_smoothed_loss(logits, tgt, 0.1)
        (loss / batch["ntokens"]).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # fairseq always measures it
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()) / batch["ntokens"], "gnorm": float(gnorm)}

    return step, sum(p.numel() for p in model.parameters())


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(impl: str, args) -> dict:
    """Run in a fresh process: RSS after building, peak RSS over a few steps."""
    torch.set_num_threads(args.threads)
    batch = make_batch(args.tokens, args.seq_len, args.vocab)
    step, _ = build_step(impl, args)
    step(batch)  # the first step allocates the optimizer state
    gc.collect()
    if args.device == "cuda":  # the caching allocator's own accounting
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        for _ in range(max(2, min(args.steps, 3))):
            step(batch)
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"rss_base_mb": round(base, 1), "rss_peak_mb": round(peak, 1), "step_growth_mb": round(peak - base, 1)}
    base = _rss_mb()
    reset = _reset_peak()
    for _ in range(max(2, min(args.steps, 3))):
        step(batch)
    peak = _peak_mb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"rss_base_mb": round(base, 1), "rss_peak_mb": round(peak, 1), "step_growth_mb": round(peak - base, 1)}


def measure_memory(impl: str, args) -> dict:
    cmd = [sys.executable, "-m", "tools.bench.train", "--memory-child", impl, *_shared_argv(args)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _shared_argv(args) -> list[str]:
    return [
        "--d-model",
        str(args.d_model),
        "--heads",
        str(args.heads),
        "--layers",
        str(args.layers),
        "--tokens",
        str(args.tokens),
        "--seq-len",
        str(args.seq_len),
        "--vocab",
        str(args.vocab),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--compile-backend",
        args.compile_backend,
        *(["--compile-static"] if args.compile_static else []),
    ]


def run_bench(args) -> dict:
    torch.set_num_threads(args.threads)
    impls = [i for i in args.impls.split(",") if i]
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"bench_train: error: unknown implementation {i!r} (valid: {', '.join(IMPLS)})")
    batch = make_batch(args.tokens, args.seq_len, args.vocab)
    steps, params, times, first = {}, {}, {i: [] for i in impls}, {}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for i in impls:
        steps[i], params[i] = build_step(i, args)
        for w in range(args.warmup):
            t0 = time.perf_counter()
            steps[i](batch)
            sync()
            if w == 0:
                first[i] = time.perf_counter() - t0
    extra = {}
    if "megabranch-fused" in impls:
        extra["fused_backend"] = backend(torch.device(args.device))
        extra["fused_fallback_reason"] = fallback_reason(torch.device(args.device))
    for _ in range(args.rounds):
        for i in impls:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[i](batch)
            sync()
            times[i].append((time.perf_counter() - t0) / args.steps)
    bsz, seq = batch["src_tokens"].shape
    flops = train_flops(bsz, seq, seq, args.d_model, 4 * args.d_model, args.vocab, args.layers, args.layers)
    peak = peak_tflops(args)
    rows = {}
    for i in impls:
        med = statistics.median(times[i])
        tflops = flops / med / 1e12
        rows[i] = {
            "params": params[i],
            "s_per_step": med,
            "tokens_per_s": batch["ntokens"] / med,
            "tflops": tflops,
            "mfu": tflops / peak if peak else None,
            "first_step_s": first.get(i),
            "all_s_per_step": [round(t, 4) for t in times[i]],
        }
        if args.memory:
            rows[i].update(measure_memory(i, args))
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    return {
        "rows": rows,
        "ntokens": batch["ntokens"],
        "batch_shape": list(batch["src_tokens"].shape),
        "flops_per_step": flops,
        "peak_tflops": peak,
        "device": device,
        **extra,
    }


def format_result(res: dict, args) -> str:
    rows = res["rows"]
    lines = [
        f"d_model={args.d_model}, heads={args.heads}, ffn={4 * args.d_model}, {args.layers}L-{args.layers}L, "
        f"vocab {args.vocab}, batch {res['batch_shape'][0]}x{res['batch_shape'][1]} ({res['ntokens']} target tokens), "
        f"threads {args.threads}, "
        f"{args.rounds} rounds x {args.steps} steps, {args.precision}; torch {torch.__version__}, {res['device']}, "
        f"{datetime.date.today()}; {res['flops_per_step'] / 1e9:.2f} GFLOP per step"
        + (f", peak {res['peak_tflops']} TFLOP/s" if res["peak_tflops"] else ""),
    ]
    if "fused_backend" in res:
        lines[0] += f"; fused backend: {res['fused_backend']}"
    mem = "peak CUDA memory (MB)" if args.device == "cuda" else "peak RSS (MB)"
    lines += [
        "",
        f"| implementation | params | s/step (median) | tokens/s | TFLOP/s | MFU | first step (s) | {mem} | "
        "step growth (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in rows.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        first = f"{r['first_step_s']:.2f}" if r.get("first_step_s") is not None else "-"
        lines.append(
            f"| {i} | {r['params'] / 1e6:.2f}M | {r['s_per_step']:.4f} | {r['tokens_per_s']:.0f} | "
            f"{r['tflops']:.3f} | {mfu} | {first} | {r.get('rss_peak_mb', '-')} | {r.get('step_growth_mb', '-')} |"
        )
    if "reference" in rows:
        ref = rows["reference"]["tokens_per_s"]
        ratios = [f"{i} / reference = {r['tokens_per_s'] / ref:.3f}" for i, r in rows.items() if i != "reference"]
        if ratios:
            lines += ["", "throughput ratios: " + "; ".join(ratios)]
    if "megabranch-eager" in rows:
        eager = rows["megabranch-eager"]["tokens_per_s"]
        lines += [
            f"{i.removeprefix('megabranch-')} / eager = {rows[i]['tokens_per_s'] / eager:.3f}"
            for i in IMPLS[1:4]
            if i in rows
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="bench_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=6, help="encoder = decoder layers")
    ap.add_argument("--tokens", type=int, default=1024, help="target tokens per batch")
    ap.add_argument("--seq-len", type=int, default=32, help="source = target length (no padding)")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: autocast for all implementations (megabranch: optim.precision=bf16)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's dense peak for --precision, for MFU (default: known GPUs, else no MFU)",
    )
    ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"comma-separated, of: {', '.join(IMPLS)}")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    ap.add_argument(
        "--compile-static",
        action="store_true",
        help="compile for the one batch shape (model.compile_dynamic=false; default: as training does, symbolic "
        "in batch and length, which at toy size makes a compile several times slower)",
    )
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the child-process memory runs")
    ap.add_argument("--json", help="also write the raw result here")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train: error: --device cuda, but this torch sees no CUDA device")
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return {}
    res = run_bench(args)
    print(format_result(res, args))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
