"""Bubble-aware planning (megabranch/planning/schedule_choice.py): the cost model's stage memory against the meta-device
build, the planner's peaks against the memory plan, zero-bubble memory in flight, parallel.schedule=auto's
choice and its one-line refusals, and the trainer and --dry-run taking the same decision."""

from __future__ import annotations

import copy
import io
import math
import os

import pytest

from megabranch.config import load_config
from megabranch.dry_run import dry_run
from megabranch.errors import UserError
from megabranch.planning.memory import cost_model, peak_in_flight, plan, stage_statics
from megabranch.planning.partition import plan_layout
from megabranch.planning.schedule_choice import (
    GiB,
    budget_bytes,
    choose,
    micro_batch_counts,
    options,
    resolve,
)
from megabranch.train import plan_schedule
from tests.helpers.configs import make_cfg
from tests.helpers.env import ROOT

RECIPES = os.path.join(ROOT, "launch", "configs")


def _tiny(**parallel):
    cfg = make_cfg(6, 6, m=4, **parallel)
    cfg.optim.precision = "bf16"
    cfg.data.max_tokens = 2048
    return cfg


@pytest.mark.unit
@pytest.mark.parametrize(
    "tp, pp, vpp, placement, share",
    [(1, 2, 2, "v", True), (2, 2, 2, "interleaved", False), (1, 3, 2, "v", False), (2, 4, 1, "interleaved", True)],
)
def test_cost_model_stage_parameters_are_the_meta_build(tp, pp, vpp, placement, share):
    """The planner prices every candidate layout with the cost model; its per-rank parameters (each table once
    per rank, also when the V placement puts the first and last chunk together) equal the real build's."""
    cfg = make_cfg(6, 6, tp=tp, model={"share_all_embeddings": share, "n_heads": 4})
    layout = plan_layout(cfg.model, pp, vpp, 40, tp=tp, max_imbalance=1e9, placement=placement)
    statics = stage_statics(cfg.model, layout, 40, tp, 2, False, 0)
    cm = cost_model(cfg, 40, 512, 64, 64, 2, False)
    assert [cm.params_of(layout.chunks_of_rank(r)) for r in range(pp)] == [s.params for s in statics]


@pytest.mark.unit
def test_cost_model_messages_are_the_executors():
    """What the memory plan prices as a chunk's received message is what the executor receives for it
    (model/span.py's message shapes, in the compute dtype) and what the chunk before it sends: the encoder hidden,
    the encoder output, the encoder output and the decoder hidden."""
    cfg = make_cfg(6, 6)
    cfg.optim.precision = "bf16"
    layout = plan_layout(cfg.model, 4, 1, 40, layout="E0-2|E3-5|D0-2|D3-5")
    cm = cost_model(cfg, 40, 512, 64, 64, 1, False)
    received = [cm.received_bytes(c) for c in layout.chunks]
    shapes = [c.message_shapes(True, 8, 64, 64, cfg.model.d_model) for c in layout.chunks]
    assert received == [2.0 * sum(math.prod(x) for x in s) for s in shapes]
    assert received[1:] == [cm.message_bytes(c) for c in layout.chunks[:-1]] and 0 not in received[1:]


@pytest.mark.unit
@pytest.mark.parametrize("schedule, vpp", [("1f1b", 1), ("zb-h1", 1), ("interleaved", 2), ("zb-v", 2)])
def test_planner_peaks_are_the_memory_plans(schedule, vpp):
    """The dry run's schedule table and its memory table agree for the configured schedule."""
    cfg = _tiny(pp=2, vpp=vpp, schedule=schedule)
    opts = options(cfg, 40, 40, 2)
    mine = next(o for o in opts if (o.schedule, o.vpp, o.m) == (schedule, vpp, 4))
    _, rows, _ = plan(cfg, 40, cfg.data.max_tokens, 64, 64, cfg.parallel.balance, 2, False, 4)
    assert mine.peaks == pytest.approx([r.peak for r in rows], rel=1e-9)


@pytest.mark.unit
def test_zero_bubble_h1_holds_about_1f1b_peak_memory():
    """Rank r of ZB-H1 holds pp - r micro-batches from F to B and postpones r W's: pp in all on every rank,
    1F1B's rank-0 peak; ZB-V holds at most 1F1B's too (two half-size chunks per rank)."""
    for pp in (2, 4, 8):
        for m in (pp, 2 * pp, 4 * pp):
            one = [peak_in_flight("1f1b", pp, 1, m, r, [1.0]) for r in range(pp)]
            h1 = [peak_in_flight("zb-h1", pp, 1, m, r, [1.0], [1.0]) for r in range(pp)]
            assert one == [min(pp - r, m) for r in range(pp)]
            assert max(h1) == max(one) and all(x == min(pp, m) for x in h1), (pp, m, h1)
            v = [peak_in_flight("zb-v", pp, 2, m, r, [0.5, 0.5], [0.5, 0.5]) for r in range(pp)]
            assert max(v) <= max(one) + 0.5, (pp, m, v)
    # what B leaves for W counts from B to W: the last rank holds its r = 3 postponed W's and the one just B'd
    assert peak_in_flight("zb-h1", 4, 1, 8, 3, [1.0], [3.0]) == 4 * 3.0
    assert peak_in_flight("zb-h1", 4, 1, 8, 0, [1.0], [3.0]) == 3 * 1.0 + 3.0  # rank 0: no W waits


@pytest.mark.unit
def test_micro_batch_counts_keep_the_tokens_per_update():
    assert micro_batch_counts(4096, 4) == [1, 2, 4, 8, 16]
    assert micro_batch_counts(1024, 16) == [1, 2, 4, 8, 16]
    assert micro_batch_counts(4096, 3) == [3, 6, 12]
    assert micro_batch_counts(512, 1) == [1]  # never below MIN_MICRO_TOKENS (but never dropping the configured)


@pytest.mark.unit
def test_auto_picks_the_least_bubble_that_fits_and_refuses_in_one_line():
    cfg = load_config(os.path.join(RECIPES, "base_500L-500L.yaml"), ["parallel.schedule=auto"])
    for gb in (80, 48, 40):
        plan_ = resolve(cfg, 32000, 32000, 8, gb)
        fitting = [o for o in plan_.options if o.peak <= budget_bytes(gb)]
        assert plan_.chosen.bubble == min(o.bubble for o in fitting) and plan_.chosen.peak <= budget_bytes(gb)
        c = plan_.cfg
        assert (c.parallel.schedule, c.parallel.vpp, c.optim.update_freq, c.data.max_tokens) == (
            plan_.chosen.schedule,
            plan_.chosen.vpp,
            plan_.chosen.m,
            plan_.chosen.max_tokens,
        )
        assert c.optim.update_freq * c.data.max_tokens == 16384  # the tokens per update never change
    assert resolve(cfg, 32000, 32000, 8, 40).chosen.schedule != resolve(cfg, 32000, 32000, 8, 80).chosen.schedule
    with pytest.raises(UserError) as e:
        resolve(cfg, 32000, 32000, 8, 32)
    msg = str(e.value)
    assert "parallel.schedule=auto: no schedule of this pipeline fits --gpu-memory-gb 32" in msg and "\n" not in msg
    assert "parallel.recompute=1" in msg and "the least memory is" in msg
    # an explicit schedule that does not fit names one that does
    explicit = load_config(
        os.path.join(RECIPES, "base_500L-500L.yaml"), ["optim.update_freq=4", "data.max_tokens=4096"]
    )
    with pytest.raises(UserError) as e:
        dry_run(explicit, 32, vocab=32000, out=io.StringIO(), gpu_memory_gb=60)
    msg = str(e.value)
    assert msg.startswith("parallel.schedule=zb-v with optim.update_freq=4 needs ") and "over --gpu-memory-gb 60" in msg
    assert "fits (parallel.schedule=auto picks it)" in msg and "\n" not in msg
    dry_run(explicit, 32, vocab=32000, out=io.StringIO())  # no budget given: no memory check
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match=r"is invalid: must be a finite number > 0 \(GiB\)"):
            resolve(cfg, 32000, 32000, 8, bad)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["base_250L-250L.yaml", "base_500L-500L.yaml"])
def test_pipelined_recipes_are_what_auto_picks_for_80_gb(name):
    """The recipes' pipeline settings are the planner's own choice (so the comment in them stays true)."""
    cfg = load_config(os.path.join(RECIPES, name))
    auto = copy.deepcopy(cfg)
    auto.parallel.schedule = "auto"
    got = resolve(auto, 32000, 32000, 8, 80).cfg
    assert (got.parallel.schedule, got.parallel.vpp, got.optim.update_freq, got.data.max_tokens) == (
        cfg.parallel.schedule,
        cfg.parallel.vpp,
        cfg.optim.update_freq,
        cfg.data.max_tokens,
    )


@pytest.mark.unit
def test_trainer_and_dry_run_take_the_same_decision(monkeypatch):
    cfg = load_config(os.path.join(RECIPES, "base_250L-250L.yaml"), ["parallel.schedule=auto"])
    monkeypatch.setenv("WORLD_SIZE", "16")
    trained = plan_schedule(cfg, 32000, 32000, device="cpu", gpu_memory_gb=32)
    info = dry_run(cfg, 16, vocab=32000, out=io.StringIO(), gpu_memory_gb=32)
    assert (trained.parallel.schedule, trained.parallel.vpp, trained.optim.update_freq, trained.data.max_tokens) == (
        info["schedule"],
        info["vpp"],
        info["micro_batches"],
        info["max_tokens"],
    )
    assert max(info["peak_bytes"]) <= budget_bytes(32) and info["bubble"] <= 0.10
    assert choose([], 1.0) is None and GiB == 2**30
    with pytest.raises(UserError, match="parallel.schedule=auto plans the native engine"):
        plan_schedule(cfg, 32000, 32000, backend="deepspeed")
