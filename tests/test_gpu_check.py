"""tools/gpu_check.py at toy size on the CPU (--cpu-smoke), so the GPU check cannot rot between the rare runs on
a GPU: every part runs and reports its numbers, and a part that overruns its budget is killed and reported
while the others still run. One child process at a time (each part in turn)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.env import ROOT, subprocess_env

pytestmark = [pytest.mark.unit, pytest.mark.slow]

TOOL = [sys.executable, "tools/gpu_check.py", "--cpu-smoke"]


def _run(out, *extra) -> tuple[str, dict]:
    subprocess.run(
        [*TOOL, "--out", str(out), *extra], cwd=ROOT, env=subprocess_env(), check=True, capture_output=True, timeout=600
    )
    return (out / "gpu_check.md").read_text(), json.loads((out / "gpu_check.json").read_text())


def test_every_part_runs_at_toy_size(tmp_path):
    report, res = _run(tmp_path)
    parts = [
        "env",
        "build",
        "kernel_tests",
        "bench_kernels",
        "bench_train_512",
        "bench_train_1024",
        "deep",
        "decode",
        "fp16",
    ]
    assert list(res) == parts
    assert {n: r["status"] for n, r in res.items()} == dict.fromkeys(parts, "ok")
    assert report.startswith("# megabranch GPU check: no GPU (--cpu-smoke), ")
    assert res["build"]["data"]["backend"] in ("cpu-ext", "eager")
    assert res["kernel_tests"]["data"]["rc"] in (0, 5)  # the CUDA tests skip without a GPU
    assert "device copy (y.copy_(x), read + write)" in report
    rows_512, rows_1024 = (res[name]["data"]["rows"] for name in ("bench_train_512", "bench_train_1024"))
    assert set(rows_512) == {"megabranch-eager", "megabranch-fused", "megabranch-compiled"}
    assert set(rows_1024) == {"megabranch-eager"}  # the same toy model: the smoke run measures it once
    assert all(r["tokens_per_s"] > 0 for r in [*rows_512.values(), *rows_1024.values()])
    deep = res["deep"]["data"]
    assert len(deep["losses"]) == 5 and deep["plan_peak_bytes"] > 0
    assert res["decode"]["data"]["bf16"]["tokens_per_s"] > 0
    fp16 = res["fp16"]["data"]
    # fp32 compute under the loss scaler equals the unscaled single-process Trainer, and both skip the overflow
    assert fp16["skipped_both"] == [5] and fp16["max_rel_loss_diff"] == 0.0


def test_a_part_over_budget_is_killed_and_the_rest_still_run(tmp_path):
    report, res = _run(tmp_path, "--parts", "decode,fp16", "--part-budget", "decode=0.5")
    assert res["decode"]["status"].startswith("timed out")
    assert res["fp16"]["status"] == "ok"
    assert "| decode | timed out" in report
