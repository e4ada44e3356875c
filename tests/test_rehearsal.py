"""megabranch-train --rehearse (megabranch/rehearse.py, the instruments in planning/rehearsal.py): a layout's ranks
built at full size on fake tensors over a fake world and one training step run, checked against the same layout's
real CPU run over gloo, against the planner (planning/memory.py, planning/cost_model.py), and, where a CUDA build
of torch is installed beside the project's, against fake CUDA tensors; its one-line refusals."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from megabranch.errors import UserError
from megabranch.planning.rehearsal import (
    GPUS,
    HostReads,
    MemoryTimeline,
    SyncLog,
    fake_world,
    gpu_kernels,
    gpu_named,
)
from megabranch.rehearse import measure_step, rehearse
from tests.helpers.configs import VOCAB, make_cfg
from tests.helpers.dist import run_workers
from tests.helpers.env import ROOT

CUDA_PYTHON = os.path.join(ROOT, ".cache", "cuda-venv", "bin", "python")


def _tiny(layers: int = 4, m: int = 4, **parallel):
    """layers + layers of d_model 32 with dropout, bf16, m micro-batches of two 64-token sentences."""
    cfg = make_cfg(layers, layers, m=m, model={"dropout": 0.1}, **parallel)
    cfg.optim.precision = "bf16"
    cfg.data.max_tokens = 128
    return cfg


def _pp2_tp2_dp2():
    return _tiny(tp=2, pp=2, vpp=2, schedule="zb-v", zero=True, layout="E0-1|E2-3|D0-1|D2-3")


# --- the rehearsal against the same layout's real run ---------------------------------------------------------
def _real_step(rank, world, out_dir):
    """One rank of the real 8-process run: the same measurement on real tensors (host reads return their real
    values and are counted)."""
    r = measure_step(_pp2_tp2_dp2(), VOCAB, VOCAB, GPUS["H100"], granule=1, fake=False)
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as fh:
        json.dump(_numbers(r), fh)


def _numbers(r) -> dict:
    return {
        "rank": r.rank,
        "params": r.params,
        "static": r.static,
        "peak": r.peak.total,
        "kinds": r.peak.kinds,
        "held": r.held,
        "optimizer": r.high["after"],
        "flops": r.model_flops,
        "syncs": [r.syncs.inside_loop(), r.syncs.outside_loop()],
        "lines": r.syncs.lines(),
    }


@pytest.mark.distributed
@pytest.mark.slow
def test_rehearsed_ranks_match_the_real_run(tmp_path):
    """pp2 x tp2 x dp2, ZeRO-1, zb-v: the rehearsal of every pipeline stage (fake tensors, fake world of 8)
    against the real 8-process gloo run. Parameter, gradient and optimizer bytes exact (and equal to what the
    parameter count gives); every chunk's activations per micro-batch, the peak's activations and the peak during
    the optimizer step within 10%; FLOPs and device-to-host reads equal; a stage's tensor- and data-parallel
    ranks hold what its first rank holds (why the rehearsal's default ranks stand for them)."""
    run_workers(_real_step, 8, str(tmp_path))
    real = {}
    for r in range(8):
        with open(tmp_path / f"{r}.json") as fh:
            real[r] = json.load(fh)
    fake = rehearse(_pp2_tp2_dp2(), 8, vocab=VOCAB, granule=1, out=False)
    assert [x.rank for x in fake.ranks] == [0, 4]
    for x in fake.ranks:
        got, want = _numbers(x), real[x.rank]
        n = x.params
        assert got["static"] == want["static"] == {"params": 4 * n, "grads": 4 * n, "optim": 8 * -(-n // 2)}
        for phase, held in want["held"].items():
            if phase.startswith("F"):
                assert got["held"][phase] == pytest.approx(held, rel=0.10), (x.rank, phase)
        assert got["kinds"]["acts"] + got["kinds"]["msgs"] == pytest.approx(
            want["kinds"]["acts"] + want["kinds"]["msgs"], rel=0.10
        )
        assert got["peak"] == pytest.approx(want["peak"], rel=0.10)
        assert got["optimizer"] == pytest.approx(want["optimizer"], rel=0.10)  # the update ran (not skipped)
        assert got["flops"] == want["flops"] and got["syncs"] == want["syncs"], (got["lines"], want["lines"])
        assert got["syncs"][0] == 0  # nothing read back inside the micro-batch loop
        for other in (x.rank + 1, x.rank + 2, x.rank + 3):  # its tp rank 1, dp rank 1, both
            assert real[other]["static"] == want["static"]
            assert real[other]["peak"] == pytest.approx(want["peak"], rel=0.01)


# --- the instruments -------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_host_reads_answer_fake_tensors_and_count_each_read_once():
    """torch.tensor's data comes back from a fake tensor until it is changed in place (a collective over the
    fake world changes nothing); any other read is 1; a tolist() counts once; reads inside the loop are told
    apart; a host tensor's are not counted; on real tensors the real values come back, counted alike."""
    log = SyncLog()
    reads = HostReads(log)
    timeline = MemoryTimeline(GPUS["H100"], reads=reads)
    with fake_world(0, 2), FakeTensorMode(), reads, timeline:
        step = torch.tensor([7.0, 0.0], dtype=torch.float64)
        torch.distributed.broadcast(step, src=1)
        assert step.tolist() == [7.0, 0.0]
        assert float(torch.ones(3).sum()) == 1.0
        step.add_(1)
        assert step.tolist() == [1.0, 1.0]
        counter = torch.tensor(5)
        reads.host_tensor(counter)
        assert counter.item() == 5
        timeline.action("F", 0, 0)
        assert bool(torch.zeros(()))
    assert (log.inside_loop(), log.outside_loop()) == (1, 3)
    assert all("test_rehearsal.py" not in line for line in log.lines())  # the source line is megabranch's
    real = HostReads(SyncLog(), answer=False)
    with real, MemoryTimeline(GPUS["H100"], reads=real):
        assert torch.tensor([2.5, 3.0]).tolist() == [2.5, 3.0] and float(torch.full((), 4.0)) == 4.0
        torch.zeros(2).cpu()
    assert real.log.outside_loop() == 3


@pytest.mark.unit
def test_cpu_tensors_keep_what_cuda_tensors_keep_under_autocast():
    """Under bf16 autocast CUDA runs layer_norm in float32 and its dropout keeps a boolean mask; the CPU keeps
    the input dtype for both. gpu_kernels() gives the CPU the GPU's side: the output dtypes and saved bytes."""
    x = torch.randn(4, 8, requires_grad=True)

    def run(gpu: bool):
        saved = []
        with (
            gpu_kernels() if gpu else contextlib.nullcontext(),
            torch.autocast("cpu", dtype=torch.bfloat16),
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
        ):
            h = F.linear(x, torch.ones(8, 8, requires_grad=True))
            y = F.layer_norm(h, (8,))
            F.dropout(y, 0.5, training=True)
        return y.dtype, sorted(str(t.dtype) for t in saved if t.shape == (4, 8))

    # kept: the linear's input (cast), layer_norm's input, dropout's mask
    assert run(False) == (torch.bfloat16, ["torch.bfloat16", "torch.bfloat16", "torch.bfloat16"])
    assert run(True) == (torch.float32, ["torch.bfloat16", "torch.bool", "torch.float32"])


@pytest.mark.unit
def test_memory_timeline_on_real_tensors_is_what_was_allocated():
    """The timeline's bytes are the storages alive: a view costs nothing, a freed tensor is subtracted, a storage
    resized to 0 (the executor's freed sends) too; the peak keeps its kinds."""
    reads = HostReads(SyncLog(), answer=False)
    tl = MemoryTimeline(GPUS["H100"], granule=1, reads=reads)
    with reads, tl:
        a = torch.empty(1000)  # 4000 bytes
        tl.retag(a, "params")
        b = a.view(10, 100)
        c = torch.empty(250, dtype=torch.float64)  # 2000
        del c
        tl.at("later", kind="temps")
        d = torch.empty(100)  # 400
        d.untyped_storage().resize_(0)
    assert tl.total == 4000 and tl.peak.total == 6000 and tl.peak.kinds["params"] == 4000 and b.numel() == 1000


@pytest.mark.unit
def test_bad_input_is_one_line(capsys):
    cfg = _pp2_tp2_dp2()
    for kw, needle in [
        ({"ranks": "9"}, "--ranks: rank 9 is outside the world of 8 ranks (0-7)"),
        ({"ranks": "0,x"}, "expected comma-separated rank numbers"),
        ({"world_size": 6}, "world size 6 does not fit parallel.tp * parallel.pp = 2 * 2 = 4"),
        ({"gpu": "V100"}, "--gpu 'V100' is unknown: choose one of A100, H100"),
    ]:
        with pytest.raises(UserError, match=r".*") as e:
            rehearse(cfg, **{"world_size": 8, **kw}, vocab=VOCAB, out=False)
        assert needle in str(e.value) and "\n" not in str(e.value)
    assert gpu_named("h100") is GPUS["H100"]
    from megabranch.train import main

    layout = ["--set", "parallel.tp=2", "--set", "parallel.pp=2", "--vocab", "40"]
    for argv, message in [
        (["--rehearse", "--world-size", "8", "--ranks", "8"], "--ranks: rank 8 is outside the world of 8 ranks (0-7)"),
        (
            ["--rehearse", "--world-size", "6"],
            (
                "world size 6 does not fit parallel.tp * parallel.pp = 2 * 2 = 4: "
                "it must be a positive multiple of 4 (nodes x GPUs per node = tp * pp "
                "* dp)"
            ),
        ),
        (["--rehearse", "--world-size", "2"], "world size 2 does not fit parallel.tp * parallel.pp = 2 * 2 = 4"),
        (
            ["--rehearse", "--world-size", "8", "--set", "parallel.layout=E0|E1|D0"],
            "parallel.layout='E0|E1|D0' has 3 stages but parallel.pp * parallel.vpp = 2 * 1 = 2",
        ),
        (["--rehearse", "--gpu", "V100"], "--gpu 'V100' is unknown: choose one of A100, H100"),
        (["--ranks", "0"], "--ranks chooses the ranks --rehearse rehearses: add --rehearse"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(layout + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"megabranch-train: error: {message}"), (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err


# --- the planner against the rehearsal --------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    "parallel",
    [
        {"tp": 2, "pp": 2, "vpp": 2, "schedule": "zb-v", "layout": "E0|E1|D0|D1"},
        {"tp": 1, "pp": 2, "vpp": 1, "schedule": "1f1b", "layout": "E0-1,D0|D1", "recompute": 1},
    ],
    ids=["tp2-zb-v", "pp2-1f1b-recompute"],
)
def test_the_planner_agrees_with_the_rehearsal(parallel):
    """Planned peak memory per stage within 10% of the rehearsed one, FLOPs per step within 2% of the cost
    model's (the checks every recipe passes at full size: docs/benchmarks.md). Allocations are not rounded up
    to the allocator's blocks here: the plan leaves those out, which only a model this small notices."""
    cfg = _tiny(2, 2, **parallel)
    if cfg.parallel.recompute:  # the RNG states each recomputed group keeps (host memory on a GPU) stay small
        cfg.data.max_tokens = 512
    r = rehearse(cfg, parallel["tp"] * parallel["pp"] * 2, vocab=VOCAB, granule=1, out=False)
    for x in r.ranks:
        assert x.peak.total == pytest.approx(x.planned_peak, rel=0.10), (x.rank, x.peak, x.planned_peak)
        assert x.model_flops == pytest.approx(x.planned_flops, rel=0.02), x.rank
        assert x.syncs.inside_loop() == 0, x.syncs.lines()  # the loss (tp 1) and the vocab-parallel loss alike


# --- fake CUDA tensors (a CUDA build of torch, no GPU) ----------------------------------------------------------
_CUDA_CHECK = """
import json, sys
from torch.nn.attention import sdpa_kernel, SDPBackend
from megabranch.config import Config
from megabranch.rehearse import forward_held
with sdpa_kernel(SDPBackend.MATH):  # without a GPU torch picks the math kernel for CUDA tensors: the CPU's too
    for cfg, world, vocab in json.loads(sys.argv[1]):
        cfg = Config.from_dict(cfg)
        for stage in range(cfg.parallel.pp):
            rank = stage * world // cfg.parallel.pp
            cuda, cpu = (forward_held(cfg, rank, world, vocab, vocab, d) for d in ("cuda", "cpu"))
            assert cuda == cpu and min(cuda) > 0, (rank, cuda, cpu)
print("ok")
"""


@pytest.mark.unit
@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists(CUDA_PYTHON),
    reason="no CUDA build of torch in .cache/cuda-venv (python3 -m "
    "venv .cache/cuda-venv; .cache/cuda-venv/bin/pip install torch==2.14.1 numpy pyyaml safetensors "
    "sentencepiece sacrebleu)",
)
def test_fake_cuda_forward_makes_nothing_on_the_cpu_and_keeps_what_the_rehearsal_counts():
    """Each stage's forward on fake CUDA tensors under CUDA's own autocast: any tensor made on the CPU (a mask,
    positions, alpha, a seed) fails it, and what autograd keeps equals the CPU rehearsal's bytes (its float32
    layer_norm and boolean dropout masks are CUDA's)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    # tensor parallelism's bias add makes the stream float32 anyway; without it layer_norm's autocast shows
    layouts = [
        (_pp2_tp2_dp2().to_dict(), 8, VOCAB),
        (_tiny(pp=2, schedule="1f1b", layout="E0-1|E2-3,D0-3").to_dict(), 2, VOCAB),
    ]
    done = subprocess.run(
        [CUDA_PYTHON, "-c", _CUDA_CHECK, json.dumps(layouts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert sys.executable != CUDA_PYTHON
