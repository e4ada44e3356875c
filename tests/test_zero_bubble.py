"""Zero-bubble pipelines: the zb-h1 and zb-v action lists (torch.distributed.pipelining's orders, deadlock-free,
the bubble theory), the V placement, interleaved 1F1B for any micro-batch count, the B/W split of a backward
(the full backward in two parts, nothing computed twice), and each new schedule trained for 20 steps over pp 2,
pp 4, tp 2 x pp 2 and dp 2 x pp 2 against the single-process Trainer."""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch

from megabranch.config import ModelConfig
from megabranch.errors import UserError
from megabranch.model import Transformer
from megabranch.model.span import Span
from megabranch.parallel.layout import chunk_index, parse_layout
from megabranch.parallel.schedules import (
    check_schedule,
    interleaved_rounds,
    schedule_actions,
    simulate,
    simulated_bubble,
)
from megabranch.parallel.weight_grad import WeightGradStore, defer_weight_grads
from tests.helpers.configs import VOCAB, make_cfg
from tests.helpers.dist import run_workers
from tests.helpers.reference import (
    AlphaAudit,
    assert_matches,
    parallel_losses,
    reference_run,
    single_trainer,
    synthetic_batches,
)

# --- the V placement ---------------------------------------------------------------------------------------


@pytest.mark.unit
def test_v_placement_puts_the_first_and_last_chunk_on_rank_zero():
    lay = parse_layout("E0|E1|E2|E3|D0|D1|D2|D3", 4, 4, pp=4, vpp=2, placement="v")
    assert [c.rank for c in lay.chunks] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert [c.virtual for c in lay.chunks] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [c.index for c in lay.chunks_of_rank(0)] == [0, 7] and [c.index for c in lay.chunks_of_rank(3)] == [3, 4]
    assert lay.ranks_holding("src_embed") == [0] and lay.ranks_holding("output") == [0]
    for c in lay.chunks:
        assert chunk_index(c.rank, c.virtual, 4, "v") == c.index
    inter = parse_layout("E0|E1|E2|E3|D0|D1|D2|D3", 4, 4, pp=4, vpp=2)  # the default placement is unchanged
    assert [c.rank for c in inter.chunks] == [0, 1, 2, 3, 0, 1, 2, 3] and str(inter) == str(lay)
    with pytest.raises(UserError, match="exactly 2 chunks per rank"):
        parse_layout("E0|E1|E2|E3|D0|D1", 4, 2, pp=2, vpp=3, placement="v")


# --- the action lists --------------------------------------------------------------------------------------


def _torch_order(cls, ns, rank, v_of):
    names = {
        "FORWARD": "F",
        "F": "F",
        "BACKWARD_INPUT": "B",
        "I": "B",
        "BACKWARD_WEIGHT": "W",
        "W": "W",
        "FULL_BACKWARD": "B",
        "B": "B",
    }
    out = []
    for a in cls._calculate_single_rank_operations(ns, rank):
        if a is not None:
            kind = str(a.computation_type).split(".")[-1]
            out.append((names[kind], v_of(a.stage_index), a.microbatch_index))
    return out


def _torch_schedules():
    sched = pytest.importorskip("torch.distributed.pipelining.schedules")
    for name in ("ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble"):
        if not hasattr(getattr(sched, name, None), "_calculate_single_rank_operations"):
            pytest.skip(f"this torch computes the {name} order elsewhere")
    return sched


@pytest.mark.unit
def test_zero_bubble_orders_are_torch_pipelinings():
    """zb-h1 is torch's ScheduleInterleavedZeroBubble (the paper's ZB1P) with one chunk per rank, zb-v its
    ScheduleZBVZeroBubble: the same action lists, for micro-batch counts below and above 2 pp - 1."""
    sched = _torch_schedules()
    for pp in (2, 3, 4):
        for m in range(1, 11):
            h1 = SimpleNamespace(n_local_stages=1, microbatches_per_round=m, pp_group_size=pp, _n_microbatches=m)
            v = SimpleNamespace(pp_group_size=pp, _n_microbatches=m, num_stages=2 * pp)
            for r in range(pp):
                theirs = _torch_order(sched.ScheduleInterleavedZeroBubble, h1, r, lambda s: 0)
                assert theirs == schedule_actions("zb-h1", pp, 1, m, r), ("zb-h1", pp, m, r)
                theirs = _torch_order(sched.ScheduleZBVZeroBubble, v, r, lambda s, pp=pp: int(s >= pp))
                assert theirs == schedule_actions("zb-v", pp, 2, m, r), ("zb-v", pp, m, r)


@pytest.mark.unit
def test_interleaved_runs_any_micro_batch_count_in_torchs_rounds():
    """Interleaved 1F1B without m % pp: torch's rounds (max(1, m // pp) of m / rounds micro-batches) where torch
    has an order, and rounds one apart in size where it refuses (m not a multiple of the round count)."""
    sched = _torch_schedules()
    compared = 0
    for pp in (2, 3, 4):
        for vpp in (2, 3):
            for m in range(1, 13):
                rounds = max(1, m // pp)
                assert sum(interleaved_rounds(pp, m)) == m and len(interleaved_rounds(pp, m)) == rounds
                if m % rounds:
                    continue
                ns = SimpleNamespace(
                    n_local_stages=vpp, microbatches_per_round=m // rounds, pp_group_size=pp, _n_microbatches=m
                )
                for r in range(pp):
                    theirs = _torch_order(sched.ScheduleInterleaved1F1B, ns, r, lambda s, pp=pp: s // pp)
                    assert theirs == schedule_actions("interleaved", pp, vpp, m, r), (pp, vpp, m, r)
                    compared += 1
    assert compared > 100 and interleaved_rounds(4, 9) == [5, 4]


@pytest.mark.unit
@pytest.mark.parametrize("kind, vpp", [("zb-h1", 1), ("zb-v", 2), ("interleaved", 2), ("interleaved", 3)])
def test_new_action_lists_are_complete_ordered_and_deadlock_free(kind, vpp):
    split = kind.startswith("zb")
    for pp in (1, 2, 3, 4, 5) if kind != "zb-v" else (2, 3, 4, 5):
        for m in range(1, 14):
            check_schedule(kind, pp, vpp, m)
            for r in range(pp):
                acts = schedule_actions(kind, pp, vpp, m, r)
                ops = "FBW" if split else "FB"
                assert sorted(acts) == sorted((op, v, i) for op in ops for v in range(vpp) for i in range(m))
                seen = set()
                for op, v, i in acts:  # B after its F, W after its B
                    assert op == "F" or ({"B": "F", "W": "B"}[op], v, i) in seen, (kind, pp, m, r, op, v, i)
                    seen.add((op, v, i))
            simulate(kind, pp, vpp, m, 1.0, 1.0, 1.0)  # raises on a deadlock


@pytest.mark.unit
def test_zero_bubble_makespans_match_theory():
    """Equal F, B and W times t: 1F1B idles (p-1)/(m+p-1) of a step, ZB-H1 (p-1)/(3m+p-1) (a third of 1F1B's idle
    time), ZB-V with two half-size chunks per rank (p-1)/(6m+p-1) once m >= 2p-1. With W free (its time folded
    into B) ZB-H1 is 1F1B again."""
    for p in (2, 4, 8):
        for m in (2 * p - 1, 2 * p, 4 * p):
            one = simulated_bubble("1f1b", p, 1, m, 1.0, 2.0)
            assert one == pytest.approx((p - 1) / (m + p - 1))
            h1 = simulated_bubble("zb-h1", p, 1, m, 1.0, 1.0, 1.0)
            assert h1 == pytest.approx((p - 1) / (3 * m + p - 1))
            idle_1f1b, idle_h1 = (p - 1) * 3.0, simulate("zb-h1", p, 1, m, 1.0, 1.0, 1.0) - 3.0 * m
            assert idle_h1 == pytest.approx(idle_1f1b / 3)
            assert simulated_bubble("zb-v", p, 2, m, 0.5, 0.5, 0.5) == pytest.approx((p - 1) / (6 * m + p - 1))
            assert simulate("zb-h1", p, 1, m, 1.0, 2.0, 0.0) == pytest.approx(simulate("1f1b", p, 1, m, 1.0, 2.0))
    # per-chunk times: a slow last chunk (the output projection) stretches every schedule, ZB-H1 least
    f = [1.0, 1.0, 1.0, 2.0]
    assert simulate("zb-h1", 4, 1, 8, f, f, f) < simulate("1f1b", 4, 1, 8, f, [2 * x for x in f])


@pytest.mark.unit
@pytest.mark.parametrize(
    "kind, pp, vpp, m, needle",
    [
        ("zb-h1", 2, 2, 4, "parallel.schedule=zb-h1 runs one chunk per rank: set parallel.vpp=1"),
        ("zb-v", 2, 1, 4, "parallel.schedule=zb-v runs exactly two chunks per rank in a V: set parallel.vpp=2"),
        ("zb-v", 2, 3, 4, "set parallel.vpp=2 (got 3)"),
        ("zb-x", 2, 1, 4, "parallel.schedule='zb-x' is invalid: must be one of gpipe, 1f1b, interleaved, zb-h1, zb-v"),
        ("zb-h1", 2, 1, 0, "optim.update_freq=0: a step needs at least one micro-batch"),
    ],
)
def test_schedule_errors_name_the_setting(kind, pp, vpp, m, needle):
    with pytest.raises(UserError) as e:
        check_schedule(kind, pp, vpp, m)
    assert needle in str(e.value) and "\n" not in str(e.value)


# --- the B/W split ---------------------------------------------------------------------------------------------


def _decoder_chunk(recompute: int) -> Transformer:
    """A middle decoder slice with the (tied) output projection: receives (memory, y), returns logits."""
    cfg = ModelConfig(
        encoder_layers=2,
        decoder_layers=3,
        d_model=32,
        n_heads=4,
        ffn_dim=64,
        dropout=0.1,
        max_positions=64,
        share_all_embeddings=False,
    )
    m = Transformer(cfg, VOCAB, span=Span.of_layers(3, 5, 2, 3), seed=3)
    m.decoder.recompute = recompute
    return m


def _chunk_backward(model, store=None, bf16=False, run_w=True):
    """Forward + backward of the chunk on fixed inputs (with `store`: B, then W unless run_w=False)
    -> (memory grad, y grad, FLOPs of the backward or B, FLOPs of W)."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(5)
    src = torch.randint(4, VOCAB, (3, 6), generator=g)
    prev = torch.randint(4, VOCAB, (3, 5), generator=g)
    memory = torch.randn(3, 6, 32, generator=g).requires_grad_()
    y = torch.randn(3, 5, 32, generator=g).requires_grad_()
    torch.manual_seed(11)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(src, prev, memory, y).float().logsumexp(-1).sum()
    with FlopCounterMode(display=False) as b_flops:
        with store.collect("k") if store is not None else contextlib.nullcontext():
            loss.backward()
    with FlopCounterMode(display=False) as w_flops:
        if store is not None and run_w:
            store.run("k")
    return memory.grad, y.grad, b_flops.get_total_flops(), w_flops.get_total_flops()


@pytest.mark.unit
@pytest.mark.parametrize("recompute, bf16", [(0, False), (1, False), (1, True)])
def test_split_backward_is_the_full_backward_in_two_parts(recompute, bf16):
    """B + W give exactly the gradients of one backward; B leaves every linear weight and bias (the tied output
    table's product too) to W, W does only those products: B's and W's FLOPs add up to the plain backward's (so
    nothing is computed twice, and the recomputed segment runs once)."""
    full = _decoder_chunk(recompute)
    split = copy.deepcopy(full)
    store = WeightGradStore()
    assert defer_weight_grads(split, store) == 2 * (4 + 4 + 2) + 1  # q k v out (self, cross), fc1 fc2; output
    gm, gy, flops_full, _ = _chunk_backward(full, bf16=bf16)
    sm, sy, flops_b, flops_w = _chunk_backward(split, store, bf16=bf16)
    assert torch.equal(gm, sm) and torch.equal(gy, sy)  # the input gradients, the encoder output's included
    for (name, p), q in zip(full.named_parameters(), split.parameters()):
        assert q.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7), name
    assert flops_w > 0.25 * flops_full and flops_b + flops_w == flops_full, (flops_b, flops_w, flops_full)
    assert store.pending() == []
    # B alone: the linear weights and biases wait for W, the LayerNorms are done
    for p in split.parameters():
        p.grad = None
    _chunk_backward(split, store, bf16=bf16, run_w=False)
    for name, p in split.named_parameters():
        deferred = "proj" in name or ".fc" in name or name == "decoder.embed.table.weight"
        assert (p.grad is None) == deferred, name
    assert store.pending() == ["k"] and store.param_ids("k") == {id(p) for p in split.parameters() if p.grad is None}


@pytest.mark.unit
def test_weight_pass_adds_in_place_and_fires_post_accumulate_hooks():
    """W goes through AccumulateGrad: a .grad that is a bucket view is added to in place (data_parallel.py) and
    the post-accumulate-grad hooks (the data-parallel reducer's) fire for exactly the parameters W completes."""
    model = _decoder_chunk(0)
    store = WeightGradStore()
    defer_weight_grads(model, store)
    views, fired = {}, []
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
        views[id(p)] = p.grad
        p.register_post_accumulate_grad_hook(lambda q: fired.append(id(q)))
    ref = _decoder_chunk(0)
    _chunk_backward(ref)
    _chunk_backward(model, store, run_w=False)
    deferred = store.param_ids("k")
    fired.clear()
    store.run("k")
    assert set(fired) == deferred and len(fired) == len(deferred) == 2 * 2 * 10 + 1  # weight + bias; the table
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is views[id(p)], f"{name}: .grad replaced"
        assert torch.allclose(p.grad, q.grad + 0.5, rtol=1e-6, atol=1e-6), name


# --- 20 steps against one process ------------------------------------------------------------------------------

STEPS = 20

TWO = {  # name -> (micro-batches per replica, parallel settings)
    "pp2-zb-h1-recompute": (4, dict(pp=2, schedule="zb-h1", recompute=1, layout="E0-3,D0|D1-3")),
    "pp2-zb-v": (4, dict(pp=2, vpp=2, schedule="zb-v", layout="E0-2|E3,D0|D1-2|D3")),
}
FOUR = {
    "pp4-zb-h1": (4, dict(pp=4, schedule="zb-h1", layout="E0-2|E3,D0|D1-2|D3")),
    "pp4-zb-v-recompute": (4, dict(pp=4, vpp=2, schedule="zb-v", recompute=1, layout="E0|E1|E2|E3|D0|D1|D2|D3")),
    "tp2-pp2-zb-h1": (4, dict(tp=2, pp=2, schedule="zb-h1", layout="E0-3,D0|D1-3")),
    "tp2-pp2-zb-v": (4, dict(tp=2, pp=2, vpp=2, schedule="zb-v", layout="E0-2|E3,D0|D1-2|D3")),
    "dp2-pp2-zb-h1-zero1": (2, dict(pp=2, schedule="zb-h1", zero=True, layout="E0-3,D0|D1-3")),
    "dp2-pp2-zb-v": (3, dict(pp=2, vpp=2, schedule="zb-v", layout="E0-2|E3,D0|D1-2|D3")),
    # interleaved 1F1B with m % pp != 0: one round of 6 over pp 4, rounds of 3 and 2 (torch refuses 5 over pp 2)
    "pp4-interleaved-m6": (6, dict(pp=4, vpp=2, schedule="interleaved", layout="E0|E1|E2|E3|D0|D1|D2|D3")),
    "tp2-pp2-interleaved-m5": (5, dict(tp=2, pp=2, vpp=2, schedule="interleaved", layout="E0-2|E3,D0|D1-2|D3")),
}


def _dp(name: str) -> int:
    return 2 if name.startswith("dp2") else 1


def _train_and_compare(name: str, m: int, parallel: dict, ref) -> None:
    from megabranch.training.engine import Trainer

    tr = Trainer(make_cfg(4, 4, m=m, **dict(parallel)), VOCAB)
    launched = []  # per step: buckets whose all-reduce was launched before finish() (overlapped with W)
    for reducer in tr.reducers:
        finish = reducer.finish

        def counting(finish=finish, reducer=reducer):
            launched.append((sum(b.launched for b in reducer.buckets), len(reducer.buckets)))
            finish()

        reducer.finish = counting
    audit = AlphaAudit(tr)
    losses = []
    for step in range(STEPS):
        audit.records.clear()
        losses += parallel_losses(tr, step + 1, step)
        errors = audit.errors(step)
        assert not errors, f"{name}: {errors[:2]}"
    assert_matches(tr, losses, ref, name)
    if tr.grid.dp > 1:  # armed for the last micro-batch's W: every bucket went out before the step ended
        assert launched and all(n == total for n, total in launched), (name, launched[:4])
    return tr


def _body_two(rank, world, refs):
    for name, (m, parallel) in TWO.items():
        tr = _train_and_compare(name, m, parallel, refs[(m, 1)])
        if parallel["schedule"] == "zb-v":  # the loss comes from rank 0 (it holds the output chunk)
            single = single_trainer(make_cfg(4, 4, m=m), params=refs[(m, 1)][1])
            single.step = tr.step
            batches = synthetic_batches(99, 3)
            got, want = tr.valid_loss(batches), single.valid_loss(batches)
            assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"], (got, want)


def _body_four(rank, world, refs):
    for name, (m, parallel) in FOUR.items():
        _train_and_compare(name, m, parallel, refs[(m, _dp(name))])


@pytest.mark.distributed
@pytest.mark.slow
def test_zero_bubble_two_stages_match_single_process():
    """zb-h1 (with recompute) and zb-v over 2 pipeline ranks, 20 steps; zb-v validation too. Slow: ~20 s."""
    refs = {(m, 1): reference_run(make_cfg(4, 4, m=m), STEPS) for m in {m for m, _ in TWO.values()}}
    run_workers(_body_two, 2, refs)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero_bubble_four_processes_match_single_process():
    """zb-h1 and zb-v over pp 4, tp 2 x pp 2 and dp 2 x pp 2 (ZeRO-1 on one), and interleaved 1F1B with
    m % pp != 0, each 20 steps against the single-process Trainer, in one 4-process launch. Slow: ~1 min."""
    keys = {(m, _dp(name)) for name, (m, _) in FOUR.items()}
    refs = {(m, dp): reference_run(make_cfg(4, 4, m=m), STEPS, dp=dp) for m, dp in keys}
    run_workers(_body_four, 4, refs)
