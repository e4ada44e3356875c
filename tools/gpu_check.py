#!/usr/bin/env python3
"""The GPU check: everything megabranch can only show on a GPU, in one run of at most 8 minutes, into one
Markdown report.

    python3 tools/gpu_check.py                   # on a one-GPU machine: $OUT/gpu_check.md (default ./gpu_check_out)
    python3 tools/gpu_check.py --cpu-smoke       # every part at toy size on the CPU (make test runs this)
    python3 tools/gpu_check.py --parts env,decode --out /some/dir

It needs only what a bare GPU image has (python3 with torch >= 2.11, sentencepiece, sacrebleu, safetensors,
pytest, ninja, nvcc; no deepspeed, no apex, no download): it runs from the source tree (PYTHONPATH), installs
nothing, and JIT-builds the CUDA kernels for the GPU's own architecture only. Each part runs in its own process
group with its own time budget (PARTS): a part that hangs is killed when its budget is spent, its report says
so, and the next part starts. The parts:

    env              GPU, driver, torch, CUDA, nvcc, triton, apex
    build            the fused residual LayerNorm's CUDA extension (JIT build, cached for the parts after it)
    kernel_tests     tests/test_kernels.py's CUDA tests (model.fused_kernels on CUDA and the fallback rules)
    bench_kernels    tools.bench.kernels on the GPU, GB/s against a measured device-to-device copy
    bench_train_512  tools.bench.train MFU at d=512, bf16: eager, fused, compiled
    bench_train_1024 the same at d=1024 (--cpu-smoke: the eager row only, the toy model is the same)
    deep             a 100L-100L BranchNorm model trained 50 steps in bf16: loss curve, peak memory against the
                     memory plan (megabranch.planning.memory)
    decode           beam-4 decoding speed, fp32 and bf16 weights (megabranch.inference.prepare)
    fp16             fp16 autocast with the engine's dynamic loss scaling and an injected overflow, against a
                     plain torch loop (the same model and batches) with torch's own GradScaler
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name, title, budget on the GPU (s), budget in --cpu-smoke (s). The GPU budgets sum to 470 s of the 480; a part
# never gets more than what is left of the 480.
PARTS = [
    ("env", "Environment", 10, 40),
    ("build", "CUDA extension build", 150, 150),
    ("kernel_tests", "CUDA kernel tests", 30, 60),
    ("bench_kernels", "Fused residual LayerNorm bandwidth", 30, 60),
    ("bench_train_512", "Training step, d=512 bf16", 70, 90),
    ("bench_train_1024", "Training step, d=1024 bf16", 70, 90),
    ("deep", "100L-100L bf16 training", 55, 90),
    ("decode", "Beam-4 decoding", 30, 60),
    ("fp16", "fp16 with dynamic loss scaling", 25, 60),
]
TOTAL_BUDGET_S = 480


# --- the parts (each runs in a child process: `gpu_check.py --part NAME`) -----------------------------------


class Part:
    """What a part writes: Markdown lines (flushed as they come, so a killed part keeps what it had) and data."""

    def __init__(self, path: Path, smoke: bool):
        self.path, self.smoke, self.data = path, smoke, {}
        self.fh = open(path, "w")

    def w(self, line: str = "") -> None:
        self.fh.write(line + "\n")
        self.fh.flush()

    def save(self) -> None:
        with open(str(self.path) + ".json", "w") as fh:
            json.dump(self.data, fh)


def _device(smoke: bool) -> str:
    return "cpu" if smoke else "cuda"


def _run_tool(p: Part, cmd: list[str]) -> int:
    """A module of this tree (`tools.bench.train`) in a subprocess from the repository root; its stdout goes into
    the report, the tail of its stderr on failure."""
    out = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True)
    p.w(out.stdout.rstrip())
    if out.returncode != 0:
        tail = "\n".join(out.stderr.splitlines()[-15:])
        p.w(f"\n`python -m {' '.join(cmd)}` exited {out.returncode}:\n\n```\n{tail}\n```")
    return out.returncode


def part_env(p: Part) -> None:
    import platform

    import torch

    from megabranch.model.norm import apex_fused_layer_norm

    p.w(f"- date: {datetime.date.today().isoformat()}, host python {platform.python_version()}, {os.cpu_count()} CPUs")
    p.w(
        f"- torch {torch.__version__}, built with CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else '-'}"
    )
    p.data["torch"] = torch.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        p.data["gpu"] = props.name
        p.w(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, "
            f"compute capability {props.major}.{props.minor}, {torch.cuda.device_count()} visible"
        )
        p.w(f"- bf16 supported: {torch.cuda.is_bf16_supported()}")
    else:
        p.data["gpu"] = None
        p.w("- GPU: none visible to torch" + (" (--cpu-smoke)" if p.smoke else ""))
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run(
            [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        p.w(f"- nvidia-smi: {q.stdout.strip() or q.stderr.strip()}")
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        p.w(f"- nvcc: {v[-1] if v else '?'}")
    else:
        p.w("- nvcc: not found")
    for mod in ("triton", "sentencepiece", "sacrebleu", "safetensors", "deepspeed"):
        try:
            version = getattr(__import__(mod), "__version__", "?")
        except Exception:  # absent or broken: reported as such
            version = "not importable"
        p.w(f"- {mod}: {version}")
    p.w(
        "- apex FusedLayerNorm: "
        + ("in use" if apex_fused_layer_norm() is not None else "not importable (torch LayerNorm)")
    )


def part_build(p: Part) -> None:
    import torch

    from megabranch.ops import backend, fallback_reason

    # the CPU extension too: the CUDA dropout test compares the two kernels' masks
    for dev in [torch.device(_device(p.smoke))] + ([] if p.smoke else [torch.device("cpu")]):
        t0 = time.perf_counter()
        name = backend(dev)
        p.data.setdefault("backend", name)
        p.w(
            f"- fused residual LayerNorm on {dev.type}: **{name}** (loaded or built in "
            f"{time.perf_counter() - t0:.1f} s, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '-')})"
        )
        if name == "eager":
            p.w(f"- why the eager fallback on {dev.type}: {fallback_reason(dev)}")


def part_kernel_tests(p: Part) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rA",
        "-p",
        "no:cacheprovider",
        "tests/test_kernels.py",
        "-k",
        "cuda and not compile",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    results = [ln for ln in lines if ln.split(" ", 1)[0] in ("PASSED", "FAILED", "SKIPPED", "ERROR")]
    p.data["summary"] = lines[-1] if lines else ""
    p.data["rc"] = out.returncode
    p.w(f'`pytest tests/test_kernels.py -k "cuda and not compile"`: **{p.data["summary"]}**')
    p.w()
    p.w("```")
    p.w("\n".join(results[:80]))
    if out.returncode not in (0, 5):
        p.w("\n".join(lines[-30:]))
    p.w("```")


def part_bench_kernels(p: Part) -> None:
    if p.smoke:
        args = ["--device", "cpu", "--hidden", "64", "--rows", "256", "--min-time", "0.01", "--copy-reference"]
    else:
        args = [
            "--device",
            "cuda",
            "--hidden",
            "1024",
            "4096",
            "--rows",
            "16384",
            "65536",
            "--dtype",
            "float32",
            "bfloat16",
            "--copy-reference",
        ]
    p.data["rc"] = _run_tool(p, ["tools.bench.kernels", *args])


def _bench_train(p: Part, d: int) -> None:
    if p.smoke:
        args = [
            "--device",
            "cpu",
            "--precision",
            "bf16",
            "--d-model",
            "32",
            "--heads",
            "2",
            "--layers",
            "1",
            "--tokens",
            "64",
            "--seq-len",
            "8",
            "--vocab",
            "64",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--compile-backend",
            "aot_eager",
            "--compile-static",
        ]
    else:
        args = [
            "--device",
            "cuda",
            "--precision",
            "bf16",
            "--d-model",
            str(d),
            "--heads",
            str(d // 64),
            "--layers",
            "6",
            "--tokens",
            "16384",
            "--seq-len",
            "64",
            "--rounds",
            "3",
            "--steps",
            "5",
            "--warmup",
            "2",
        ]
    impls = "megabranch-eager,megabranch-fused,megabranch-compiled"
    if p.smoke and d != 512:  # at toy size every d is the same model: the first part has run all three
        impls = "megabranch-eager"
    js = str(p.path) + ".bench.json"
    p.data["rc"] = _run_tool(p, ["tools.bench.train", *args, "--no-memory", "--json", js, "--impls", impls])
    if os.path.exists(js):
        with open(js) as fh:
            p.data["rows"] = {
                k: {"tokens_per_s": v["tokens_per_s"], "mfu": v["mfu"]} for k, v in json.load(fh)["rows"].items()
            }


def part_bench_train_512(p: Part) -> None:
    _bench_train(p, 512)


def part_bench_train_1024(p: Part) -> None:
    _bench_train(p, 1024)


def copy_task_batch(tokens: int, seq_len: int, vocab: int, seed: int) -> dict:
    """A learnable batch: the target is the source (so 50 steps show a falling loss)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    bsz = max(1, tokens // seq_len)
    src = torch.randint(4, vocab, (bsz, seq_len), generator=g)
    prev = torch.cat([torch.full((bsz, 1), 2), src[:, :-1]], 1)
    return {"src_tokens": src, "prev_output_tokens": prev, "target": src.clone(), "ntokens": int(src.numel())}


def part_deep(p: Part) -> None:
    import torch

    from megabranch.config import load_config
    from megabranch.model import count_parameters
    from megabranch.planning.memory import plan
    from megabranch.training.engine import Trainer

    dev = torch.device(_device(p.smoke))
    layers, d, steps, tokens, seq, vocab = (2, 32, 5, 64, 8, 64) if p.smoke else (100, 512, 50, 4096, 32, 8000)
    cfg = load_config(
        None,
        [
            "model.residual=branchnorm",
            f"model.encoder_layers={layers}",
            f"model.decoder_layers={layers}",
            f"model.d_model={d}",
            f"model.n_heads={max(1, d // 64)}",
            f"model.ffn_dim={4 * d}",
            "model.dropout=0.1",
            "model.fused_kernels=true",
            f"model.alpha_warmup_steps={steps}",
            "optim.precision=bf16",
            "optim.lr=0.0005",
            "optim.warmup_updates=10",
            "optim.clip_norm=1.0",
            f"optim.max_updates={steps}",
        ],
    )
    tr = Trainer(cfg, vocab, device=dev, init_seed=1)
    p.w(
        f"{tr.describe()}; copy task (target = source), {tokens} target tokens per step ({tokens // seq} x {seq}), "
        f"bf16 autocast, fused residual LayerNorm, {steps} steps"
    )
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], time.perf_counter()
    for s in range(steps):
        stats = tr.train_step([copy_task_batch(tokens, seq, vocab, s)])
        losses.append(stats["loss"])
        if s == 0:
            t_first = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    p.data.update(losses=losses, params=count_parameters(tr.model))
    shown = sorted(set(range(0, steps, max(1, steps // 10))) | {steps - 1})
    p.w()
    p.w("| step | " + " | ".join(str(s + 1) for s in shown) + " |")
    p.w("|---|" + "---|" * len(shown))
    p.w("| loss | " + " | ".join(f"{losses[s]:.3f}" for s in shown) + " |")
    p.w()
    p.w(
        f"- first step {t_first:.2f} s, then {(wall - t_first) / max(1, steps - 1):.3f} s/step; loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    _, rows, _ = plan(cfg, vocab, tokens, seq, seq, "time", 1, False, 1)
    predicted = rows[0].peak
    p.data["plan_peak_bytes"] = predicted
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        p.data["peak_bytes"] = peak
        p.w(
            f"- peak CUDA memory allocated {peak / 2**30:.2f} GiB; memory plan {predicted / 2**30:.2f} GiB "
            f"(weights {rows[0].weights / 2**30:.2f} + grads {rows[0].grads / 2**30:.2f} + Adam "
            f"{rows[0].optim / 2**30:.2f} + activations {rows[0].act / 2**30:.2f}); measured / planned = "
            f"{peak / predicted:.3f}"
        )
    else:
        p.w(f"- memory plan {predicted / 2**20:.1f} MiB (no CUDA allocator to compare with on the CPU)")


def part_decode(p: Part) -> None:
    import torch

    from megabranch.config import ModelConfig
    from megabranch.decoding import beam_search
    from megabranch.inference import prepare
    from megabranch.model import build_model
    from megabranch.residual import set_step

    dev = torch.device(_device(p.smoke))
    d, layers, bsz, src_len, out_len, vocab = (32, 1, 4, 6, 6, 64) if p.smoke else (512, 6, 64, 24, 32, 8000)
    cfg = ModelConfig(encoder_layers=layers, decoder_layers=layers, d_model=d, n_heads=max(1, d // 64), ffn_dim=4 * d)
    src = torch.randint(4, vocab, (bsz, src_len), generator=torch.Generator().manual_seed(0)).to(dev)
    p.w(
        f"{layers}L-{layers}L d={d}, vocabulary {vocab}, random weights; {bsz} sentences of {src_len} tokens, beam 4, "
        f"up to {out_len} tokens each"
    )
    p.w()
    p.w("| weights | s | sentences/s | output tokens/s | same hypotheses as fp32 |")
    p.w("|---|---|---|---|---|")
    hyps = {}
    for precision in ("fp32", "bf16"):
        model = prepare(build_model(cfg, vocab, seed=1), dev, precision)
        set_step(model, 10**6)
        beam_search(model, src[:2], 2, 3, beam=4, max_len_a=0, max_len_b=4)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        hyps[precision] = beam_search(model, src, 2, 3, beam=4, max_len_a=0, max_len_b=out_len)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        ntok = sum(len(h) + 1 for h in hyps[precision])
        same = sum(a == b for a, b in zip(hyps[precision], hyps["fp32"]))
        p.data[precision] = {"s": dt, "tokens_per_s": ntok / dt}
        p.w(f"| {precision} | {dt:.3f} | {bsz / dt:.1f} | {ntok / dt:.0f} | {same}/{bsz} |")


def part_fp16(p: Part) -> None:
    import torch

    from megabranch.config import load_config
    from megabranch.model import build_model, draw_init_seed, label_smoothed_nll_loss
    from megabranch.residual import set_step
    from megabranch.training.engine import Trainer
    from megabranch.training.loss_scaler import DynamicLossScaler
    from megabranch.training.lr_schedule import inverse_sqrt_lr

    dev = torch.device(_device(p.smoke))
    precision = "fp32" if p.smoke else "fp16"  # fp16 needs CUDA; the smoke run checks the scaler over fp32
    steps, overflow_at, vocab = 10, 5, 512
    cfg = load_config(
        None,
        [
            "model.encoder_layers=2",
            "model.decoder_layers=2",
            "model.d_model=64",
            "model.n_heads=4",
            "model.ffn_dim=256",
            "model.dropout=0.0",
            f"optim.precision={precision}",
            "optim.warmup_updates=4",
            "optim.lr=0.001",
        ],
    )
    engine = Trainer(cfg, vocab, device=dev)
    if engine.precision.scaler is None:  # the CPU smoke run: the scaler's rules over fp32
        engine.precision.scaler = DynamicLossScaler()
    # the reference: the same initial weights in a plain torch loop with torch.amp.GradScaler
    model = build_model(cfg.model, vocab, seed=draw_init_seed(cfg.seed)).to(dev)
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    name = "decoder.layers.1.ffn.block.fc2.weight"
    ref_step = [0]
    engine.named_params()[name].register_hook(
        lambda g: torch.full_like(g, float("inf")) if engine.step == overflow_at else g
    )
    dict(model.named_parameters())[name].register_hook(
        lambda g: torch.full_like(g, float("inf")) if ref_step[0] == overflow_at else g
    )

    def reference_step(batch) -> tuple[float, bool]:
        set_step(model, ref_step[0])  # BranchNorm's alpha_t
        for group in opt.param_groups:
            group["lr"] = inverse_sqrt_lr(ref_step[0], o)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=precision == "fp16"):
            logits = model(batch["src_tokens"].to(dev), batch["prev_output_tokens"].to(dev))
        loss, _ = label_smoothed_nll_loss(logits, batch["target"].to(dev), o.label_smoothing)
        scaler.scale(loss / batch["ntokens"]).backward()
        before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.unscale_(opt)
        finite = all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
        scaler.step(opt) if scaler.is_enabled() else (opt.step() if finite else None)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ref_step[0] += 1
        skipped = (scaler.get_scale() < before) if before is not None else not finite
        return float(loss) / batch["ntokens"], bool(skipped)

    rows = []
    for s in range(steps):
        batch = copy_task_batch(256, 16, vocab, s)
        scale = engine.precision.loss_scale
        a = engine.train_step([batch])
        loss_b, skipped_b = reference_step(batch)
        rows.append((s, scale, a["loss"], loss_b, a["skipped"], int(skipped_b)))
    p.w(
        f"{precision} autocast on {dev.type}; the engine's DynamicLossScaler against a plain torch loop with "
        f"{'torch.amp.GradScaler' if scaler.is_enabled() else 'no scaler (fp32: skip on a non-finite gradient)'}; "
        f"an inf injected into {name}'s gradient at step {overflow_at}"
    )
    p.w()
    p.w("| step | scale | engine loss | reference loss | skipped (engine, reference) |")
    p.w("|---|---|---|---|---|")
    for s, scale, la, lb, sa, sb in rows:
        p.w(f"| {s} | {scale:g} | {la:.5f} | {lb:.5f} | {sa}, {sb} |")
    err = max(abs(la - lb) / abs(lb) for _, _, la, lb, _, _ in rows)
    skips = [s for s, *_, sa, sb in rows if sa and sb]
    p.data.update(max_rel_loss_diff=err, skipped_both=skips)
    p.w()
    p.w(
        f"- largest relative loss difference {err:.2e}; steps both skipped: {skips}; scale after: "
        f"{engine.precision.loss_scale:g} (engine)"
        + (f", {scaler.get_scale():g} (GradScaler)" if scaler.is_enabled() else "")
    )


# --- the driver -----------------------------------------------------------------------------------------------


def _child_env(smoke: bool, extra: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _cuda_arch() -> str | None:
    """The GPU's own architecture (a JIT build for it alone takes half the time of the default two)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    q = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True)
    cap = q.stdout.strip().splitlines()[0].strip() if q.returncode == 0 and q.stdout.strip() else ""
    return cap or None


def run_part(name: str, budget: float, smoke: bool, work: Path, extra_env: dict) -> dict:
    """One part in its own process group, killed with its group when the budget is spent."""
    path = work / f"{name}.md"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-out", str(path)]
    if smoke:
        cmd.append("--cpu-smoke")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_child_env(smoke, extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=budget)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = f"timed out after {budget:.0f} s"
    text = path.read_text() if path.exists() else ""
    data = {}
    if os.path.exists(str(path) + ".json"):
        with open(str(path) + ".json") as fh:
            data = json.load(fh)
    return {
        "status": status,
        "seconds": time.perf_counter() - t0,
        "budget": budget,
        "text": text,
        "data": data,
        "log_tail": "\n".join((out or "").strip().splitlines()[-20:]),
    }


def write_report(results: dict, smoke: bool, out_dir: Path, started: float) -> Path:
    env = results.get("env", {}).get("data", {})
    gpu = env.get("gpu") or ("no GPU (--cpu-smoke)" if smoke else "no GPU visible")
    lines = [
        f"# megabranch GPU check: {gpu}, {datetime.date.today().isoformat()}",
        "",
        f"`python3 tools/gpu_check.py{' --cpu-smoke' if smoke else ''}`, torch {env.get('torch', '?')}, "
        f"{time.perf_counter() - started:.0f} s in all (budget {TOTAL_BUDGET_S} s)."
        + (" A smoke run: every part at toy size on the CPU; the titles name the GPU sizes." if smoke else ""),
        "",
        "| part | status | s | budget s |",
        "|---|---|---|---|",
    ]
    titles = {n: t for n, t, *_ in PARTS}
    for name, r in results.items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.1f} | {r['budget']:.0f} |")
    for name, r in results.items():
        lines += ["", f"## {titles[name]} ({name}: {r['status']}, {r['seconds']:.1f} s)", "", r["text"].rstrip()]
        if r["status"] != "ok" and r["log_tail"]:
            lines += ["", "Last output:", "", "```", r["log_tail"], "```"]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.md"
    path.write_text("\n".join(lines) + "\n")
    with open(out_dir / "gpu_check.json", "w") as fh:
        json.dump({n: {k: v for k, v in r.items() if k != "text"} for n, r in results.items()}, fh, indent=1)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="report folder (default $OUT)")
    ap.add_argument("--cpu-smoke", action="store_true", help="every part at toy size on the CPU")
    ap.add_argument("--parts", default=",".join(n for n, *_ in PARTS), help="comma-separated subset, in order")
    ap.add_argument(
        "--part-budget", action="append", default=[], metavar="NAME=SECONDS", help="override a part's time budget"
    )
    ap.add_argument("--part", help=argparse.SUPPRESS)  # the child process: run this part
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        part = Part(Path(args.part_out), args.cpu_smoke)
        try:
            globals()[f"part_{args.part}"](part)
        finally:
            part.save()
        return 0
    budgets = {n: (smoke if args.cpu_smoke else gpu) for n, _, gpu, smoke in PARTS}
    for item in args.part_budget:
        name, _, value = item.partition("=")
        if name not in budgets:
            raise SystemExit(f"gpu_check: error: --part-budget {item}: no part {name!r}")
        budgets[name] = float(value)
    wanted = [n for n in args.parts.split(",") if n]
    unknown = [n for n in wanted if n not in budgets]
    if unknown:
        raise SystemExit(f"gpu_check: error: unknown part(s) {', '.join(unknown)} (valid: {', '.join(budgets)})")
    extra_env: dict = {}
    arch = None if args.cpu_smoke else _cuda_arch()
    if arch and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        extra_env["TORCH_CUDA_ARCH_LIST"] = arch
    started = time.perf_counter()
    deadline = started + (TOTAL_BUDGET_S if not args.cpu_smoke else 10 * TOTAL_BUDGET_S)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name in [n for n, *_ in PARTS if n in wanted]:
            left = deadline - time.perf_counter()
            budget = min(budgets[name], left)
            if left < 3:
                results[name] = {
                    "status": "not run (the 8 minutes were spent)",
                    "seconds": 0.0,
                    "budget": 0,
                    "text": "",
                    "data": {},
                    "log_tail": "",
                }
                continue
            results[name] = r = run_part(name, budget, args.cpu_smoke, Path(tmp), extra_env)
            print(f"gpu_check: {name}: {r['status']} ({r['seconds']:.1f} s)", file=sys.stderr, flush=True)
            if name == "build" and r["data"].get("backend") in (None, "eager"):
                extra_env["MEGABRANCH_NO_JIT"] = "1"  # no part after it retries a failed or killed build
    path = write_report(results, args.cpu_smoke, Path(args.out), started)
    print(f"gpu_check: report in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
