"""Pipeline parallelism: layout strings, the cost model and balanced split, the schedules, and a 2-process
pipeline checked step by step against the single-process Trainer (plus the alpha-lag check, and stages that
start a step with different local step counters: all must use rank 0's)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from megabranch import memory_plan
from megabranch.config import Config
from megabranch.errors import UserError
from megabranch.model.span import Carried
from megabranch.parallel.layout import Layout, parse_layout
from megabranch.parallel.schedules import check_schedule, schedule_actions, simulate
from megabranch.planning.cost_model import CostModel
from megabranch.planning.partition import balanced_bounds, imbalance, plan_layout
from tests.helpers.configs import VOCAB, make_cfg, tiny_model_cfg
from tests.helpers.dist import run_workers
from tests.helpers.reference import (
    AlphaAudit,
    assert_matches,
    parallel_losses,
    reference_run,
    single_trainer,
    synthetic_batches,
)

# --- layout strings --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_layout_string_round_trip_and_placement():
    lay = parse_layout("E0-3 | E4-5,D0 | D1-3|D4-5", 6, 6, pp=2, vpp=2)
    assert str(lay) == "E0-3|E4-5,D0|D1-3|D4-5"
    assert [c.rank for c in lay.chunks] == [0, 1, 0, 1] and [c.virtual for c in lay.chunks] == [0, 0, 1, 1]
    c0, c1, c2, c3 = lay.chunks
    hidden, memory, y = Carried.ENCODER_HIDDEN, Carried.MEMORY, Carried.DECODER_HIDDEN
    assert c0.src_embed and not c0.tgt_embed and c0.sends == (hidden,)
    assert c1.ends_encoder and c1.tgt_embed and c1.receives == (hidden,) and c1.sends == (memory, y)
    assert c2.receives == (memory, y) and c3.output and c3.sends == ()
    assert lay.ranks_holding("src_embed") == [0] and lay.ranks_holding("output") == [1]
    edge = parse_layout("E0-1|D0-1", 2, 2, pp=2, vpp=1)  # the cut exactly at the encoder's end
    assert edge.chunks[0].sends == (memory,) and edge.chunks[1].receives == (memory,)
    assert Layout.from_bounds(lay.bounds(), 2, 2, 6, 6) == lay


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, needle",
    [
        ("E0-3|E4-5,D0-5", "has 2 stages but parallel.pp * parallel.vpp = 2 * 2 = 4"),
        ("E0-3||E4-5,D0|D1-5", "stage 1 is empty"),
        ("E0-3|E4-5,D0|X1|D2-5", "cannot read 'X1'"),
        ("E0-3|E4-6,D0|D1|D2-5", "past the model's last E layer"),
        ("E0-2|E4-5,D0|D1|D2-5", "has E4-5 where E3 comes next"),
        ("E0-3|D0,E4-5|D1|D2-5", "where E4 comes next"),
        ("E0-3|E4-5,D0|D1|D2-4", "stops before D5"),
        ("E0-3|E5-4,D0|D1|D2-5", "runs backwards"),
    ],
)
def test_layout_string_errors_are_one_line(text, needle):
    with pytest.raises(UserError) as e:
        parse_layout(text, 6, 6, pp=2, vpp=2)
    msg = str(e.value)
    assert needle in msg and "parallel.layout" in msg and "\n" not in msg


# --- cost model and split --------------------------------------------------------------------------------


def _brute_force(costs, k):
    """(min over splits of the heaviest chunk, then max of the lightest) by enumerating every split."""
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), k - 1):
        b = [0, *cuts, len(costs)]
        sums = [sum(costs[b[i] : b[i + 1]]) for i in range(k)]
        key = (max(sums), -min(sums))
        best = key if best is None or key < best else best
    return best


@pytest.mark.unit
def test_balanced_split_is_optimal_on_small_cases():
    rng = random.Random(3)
    for _ in range(60):
        n = rng.randint(2, 9)
        k = rng.randint(1, n)
        costs = [rng.choice([1.0, 1.5, 2.0, 3.0, 0.25]) for _ in range(n)]
        b = balanced_bounds(costs, k)
        assert b[0] == 0 and b[-1] == n and all(x < y for x, y in zip(b, b[1:])) and len(b) == k + 1
        sums = [sum(costs[b[i] : b[i + 1]]) for i in range(k)]
        hi, neg_lo = _brute_force(costs, k)
        assert max(sums) == pytest.approx(hi) and min(sums) == pytest.approx(-neg_lo), (costs, k, b)


@pytest.mark.unit
def test_cost_model_counts_cross_attention_embeddings_and_output():
    cfg = tiny_model_cfg(encoder_layers=6, decoder_layers=6, d_model=64, n_heads=4, ffn_dim=256)
    cm = CostModel(cfg, vocab=8000, tp=1, tokens=1024, src_len=32, tgt_len=32)
    enc, dec = cm.encoder_layer(), cm.decoder_layer()
    assert dec.flops > enc.flops and dec.params > enc.params and dec.act_bytes > enc.act_bytes
    d, f = 64, 256
    assert enc.params == 4 * d * d + 4 * d + 2 * d + 2 * d * f + f + d + 2 * d  # attn + LN, ffn + LN: nn.Module counts
    from megabranch.model.layers import EncoderLayer

    assert enc.params == sum(p.numel() for p in EncoderLayer(cfg).parameters())
    units = cm.units()
    assert units[0].params == enc.params + 8000 * d  # the source embedding rides with E0
    assert units[6].params == dec.params + 8000 * d  # the target embedding (tied copy) with D0
    assert units[-1].flops > dec.flops + 3 * 2 * 1024 * d * 8000 * 0.99  # output projection + loss with D5
    assert CostModel(cfg, vocab=64000).units()[-1].time > CostModel(cfg, vocab=8000).units()[-1].time
    # a heavy output projection (+ loss) takes layers away from the last stage
    wide = tiny_model_cfg(encoder_layers=12, decoder_layers=12, d_model=256, n_heads=4, ffn_dim=1024)
    small, big = (CostModel(wide, vocab=v, tokens=1024, src_len=32, tgt_len=32) for v in (1000, 8000))
    assert str(plan_layout(wide, pp=3, cost_model=small)) == "E0-9|E10-11,D0-5|D6-11"
    assert str(plan_layout(wide, pp=3, cost_model=big)) == "E0-11|D0-8|D9-11"
    # tensor parallelism divides the sharded work
    half = CostModel(cfg, vocab=8000, tp=2, tokens=1024, src_len=32, tgt_len=32)
    assert half.encoder_layer().flops == pytest.approx(enc.flops / 2)


@pytest.mark.unit
def test_auto_layout_balances_or_refuses_loudly():
    cfg = tiny_model_cfg(encoder_layers=24, decoder_layers=24, d_model=256, n_heads=4, ffn_dim=1024)
    lay = plan_layout(cfg, pp=4, vpp=2, vocab=1000)
    cm = CostModel(cfg, 1000)
    times = [c.time for c in cm.chunk_costs(lay)]
    assert imbalance(times) < 1.2, str(lay)
    with pytest.raises(UserError, match=r"parallel.pp \* parallel.vpp = 4 \* 2 = 8 stages but the model has only 3\+3"):
        plan_layout(tiny_model_cfg(encoder_layers=3, decoder_layers=3), pp=4, vpp=2, vocab=40)
    with pytest.raises(UserError, match="is uneven .* set parallel.layout to it"):
        plan_layout(tiny_model_cfg(encoder_layers=4, decoder_layers=4), pp=4, vpp=2, vocab=40)
    # the same split, given explicitly, is accepted (the user asked for it)
    explicit = plan_layout(
        tiny_model_cfg(encoder_layers=4, decoder_layers=4), pp=4, vpp=2, vocab=40, layout="E0|E1|E2|E3|D0|D1|D2|D3"
    )
    assert explicit.num_chunks == 8


# --- schedules -------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["gpipe", "1f1b", "interleaved"])
def test_schedules_are_complete_and_deadlock_free(kind):
    for pp in (1, 2, 3, 4, 5):
        for vpp in ((1,) if kind == "1f1b" else (1, 2, 3)) if kind != "interleaved" else (2, 3):
            for m in range(1, 13):
                try:
                    check_schedule(kind, pp, vpp, m)
                except UserError:
                    continue
                for r in range(pp):
                    acts = schedule_actions(kind, pp, vpp, m, r)
                    want = {(op, v, i) for op in "FB" for v in range(vpp) for i in range(m)}
                    assert sorted(acts) == sorted(want) and len(acts) == len(want)
                    seen_f = set()
                    for op, v, i in acts:  # a backward never precedes its own forward
                        if op == "F":
                            seen_f.add((v, i))
                        else:
                            assert (v, i) in seen_f
                simulate(kind, pp, vpp, m)  # raises on a deadlock


@pytest.mark.unit
def test_schedule_makespans_match_theory():
    f, b = 1.0, 2.0
    for pp in (2, 4):
        for m in (4, 8, 16):
            ideal = m * (f + b)
            t = simulate("1f1b", pp, 1, m, f, b)
            assert t == pytest.approx((m + pp - 1) * (f + b))  # bubble (p-1)/(m+p-1)
            assert simulate("gpipe", pp, 1, m, f, b) == pytest.approx(t)
            # interleaving with v chunks per rank: each chunk is 1/v of the work, bubble shrinks ~v times
            ti = simulate("interleaved", pp, 2, m, f / 2, b / 2)
            assert ti < t and (ti - ideal) == pytest.approx((pp - 1) * (f + b) / 2)


@pytest.mark.unit
def test_interleaved_order_is_torch_pipelinings():
    """Our interleaved 1F1B action lists are the ones torch.distributed.pipelining computes for
    ScheduleInterleaved1F1B (m a multiple of pp), taken from its per-rank order calculation."""
    sched = pytest.importorskip("torch.distributed.pipelining.schedules")
    calc = getattr(sched.ScheduleInterleaved1F1B, "_calculate_single_rank_operations", None)
    if calc is None:
        pytest.skip("this torch computes the interleaved order elsewhere")
    from types import SimpleNamespace

    for pp, vpp, m in ((2, 2, 4), (4, 2, 8), (4, 3, 4), (2, 2, 2), (3, 2, 6)):
        ns = SimpleNamespace(n_local_stages=vpp, microbatches_per_round=pp, pp_group_size=pp, _n_microbatches=m)
        for r in range(pp):
            theirs = [
                ("F" if "FORWARD" in str(a.computation_type) else "B", a.stage_index // pp, a.microbatch_index)
                for a in calc(ns, r)
                if a is not None
            ]
            assert theirs == schedule_actions("interleaved", pp, vpp, m, r), (pp, vpp, m, r)


@pytest.mark.unit
def test_schedule_config_errors():
    with pytest.raises(UserError, match="interleaved needs parallel.vpp >= 2"):
        check_schedule("interleaved", 2, 1, 4)
    with pytest.raises(UserError, match="needs parallel.schedule=interleaved"):
        check_schedule("1f1b", 2, 2, 4)
    check_schedule("interleaved", 2, 2, 3)  # any micro-batch count since issue 12 (rounds, tests/test_zero_bubble.py)
    with pytest.raises(UserError, match=r"optim.update_freq=0: a step needs at least one micro-batch"):
        check_schedule("interleaved", 2, 2, 0)


# --- two processes: a real pipeline against the single process ------------------------------------------

CASES = {  # schedule -> (residual, recompute); untied source / target tables: the target one spans both stages
    "gpipe": ("pre_ln", 0),
    "1f1b": ("branchnorm", 1),
}


def _case_cfg(kind: str, **parallel) -> Config:
    residual, recompute = CASES[kind]
    return make_cfg(
        4, 4, m=3, residual=residual, model={"share_all_embeddings": False}, recompute=recompute, **parallel
    )


def _two_stage_body(rank, world, refs, lag_refs):
    import copy

    from megabranch.training.engine import Trainer

    for kind in CASES:
        cfg = _case_cfg(kind, pp=2, schedule=kind, layout="E0-3,D0|D1-3")
        tr = Trainer(cfg, VOCAB)
        audit = AlphaAudit(tr)
        losses = []
        for step in range(6):
            audit.records.clear()
            losses += parallel_losses(tr, step + 1, step)
            errors = audit.errors(step)
            assert not errors, errors[:3]
            assert any(r[0] == "B" for r in audit.records)  # backward was audited too
        assert_matches(tr, losses, refs[kind], kind)
        if not tr.grid.is_last_stage:  # sent decoder hidden states are released once received, during the step
            st = tr.executor.stats
            assert 0 < st["freed_early_bytes"] <= st["freed_bytes"] < st["sent_bytes"], st
        # validation (forward only, shapes varying) equals the single-process model's at the same weights
        single = single_trainer(cfg, params=refs[kind][1])
        single.step = tr.step  # both evaluate at the alpha of the step the next update would take
        batches = synthetic_batches(99, 3)
        got, want = tr.valid_loss(batches), single.valid_loss(batches)
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"], (got, want)
        if kind == "1f1b":  # this rank's shard (parameters + canonical optimizer state) resumes bit for bit
            from megabranch import checkpoint

            params = tr.named_params()
            state = copy.deepcopy(
                {
                    "model": params,
                    "step": tr.step,
                    "zero": None,
                    "optimizer": checkpoint.optimizer_to_canonical(tr.optimizer, list(params)),
                }
            )
            more = parallel_losses(tr, 8, 6)
            tr2 = Trainer(cfg, VOCAB, init_seed=123)
            tr2.load_checkpoint_state(state)
            assert tr2.step == 6
            assert parallel_losses(tr2, 8, 6) == more

    # a stage that lags one step behind must be caught by the audit, and it changes the losses
    cfg = make_cfg(4, 4, m=3, pp=2, schedule="1f1b", layout="E0-3,D0|D1-3")
    tr = Trainer(cfg, VOCAB)
    if tr.grid.pp_rank == 1:
        _lag_one_step(tr)
    audit = AlphaAudit(tr)
    caught, losses = [], []
    for step in range(3):
        audit.records.clear()
        losses += parallel_losses(tr, step + 1, step)
        caught += audit.errors(step)
    if tr.grid.pp_rank == 1:
        assert caught and "at step 1" in caught[0], caught[:1]
    else:
        assert not caught
    # alpha_0 = alpha_{-1} = 0, so step 0 agrees; from step 1 on the lagging stage breaks the equivalence
    assert losses[0] == pytest.approx(lag_refs[0], rel=1e-5)
    assert any(abs(a - b) > 1e-5 * abs(b) for a, b in zip(losses[1:], lag_refs[1:]))

    # an inf gradient on one stage skips the step on every stage (the owner's decision), weights untouched
    before = [p.detach().clone() for p in tr.params]
    hook = tr.params[-1].register_hook(lambda g: g * float("inf")) if tr.grid.pp_rank == 1 else None
    stats = tr.train_step(synthetic_batches(3, 3))
    assert stats["skipped"] == 1 and not math.isfinite(stats["gnorm"]) and tr.step == 4
    assert all(torch.equal(a, p) for a, p in zip(before, tr.params))
    if hook is not None:
        hook.remove()
    assert tr.train_step(synthetic_batches(4, 3))["skipped"] == 0
    tr.__dict__.pop("sync_step", None)  # the lagging stage catches up
    _check_every_stage_uses_rank_0s_step(tr, audit)


def _lag_one_step(tr) -> None:
    """Make this rank's chunks run one step behind the broadcast step, as a stage that missed it would."""
    from megabranch.residual import set_step

    sync = tr.sync_step

    def lagging():
        step = sync()
        for chunk in tr.model:
            set_step(chunk, step - 1)
        return step

    tr.sync_step = lagging


def _check_every_stage_uses_rank_0s_step(tr, audit):
    """The ranks start the step with different local counters (rank 1 seven steps ahead): the step broadcast
    from rank 0, before any micro-batch, must make every stage use rank 0's counter (its alpha in every forward
    and backward, its learning rate) and leave them all one step further. Without the broadcast rank 1 would use
    alpha and lr of its own counter."""
    from megabranch.training.lr_schedule import inverse_sqrt_lr

    own = tr.step  # 5: alpha_5 = 0.5 (warmup 10); rank 1's counter 12 would give alpha 1
    tr.step = own + 7 * tr.grid.pp_rank
    audit.records.clear()
    stats = tr.train_step(synthetic_batches(own, 3))
    errors = audit.errors(own)
    assert not errors, errors[:2]
    assert stats["lr"] == inverse_sqrt_lr(own, tr.cfg.optim) and tr.step == own + 1, (stats["lr"], tr.step)


@pytest.mark.distributed
def test_two_stage_pipeline_matches_single_process():
    refs = {kind: reference_run(_case_cfg(kind), 6) for kind in CASES}
    lag_refs = reference_run(make_cfg(4, 4, m=3), 3)[0]
    run_workers(_two_stage_body, 2, refs, lag_refs)


# --- megabranch.memory_plan -------------------------------------------------------------------------------


@pytest.mark.unit
def test_memory_plan_default_example_is_balanced(capsys):
    """500L-500L d=512 on pp=64 x tp=8, built on the meta device: heaviest stage within 10% of the lightest."""
    assert memory_plan.main([]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 64
    totals = [float(r[9].replace(",", "")) for r in rows]
    assert max(totals) <= 1.10 * min(totals)
    assert "layout: E0-" in out


@pytest.mark.unit
def test_memory_plan_counts_match_the_model_and_flags_imbalance(capsys):
    from megabranch.config import load_config
    from megabranch.model import build_model, count_parameters

    sets = [
        "model.encoder_layers=3",
        "model.decoder_layers=3",
        "model.d_model=32",
        "model.n_heads=4",
        "model.ffn_dim=64",
        "parallel.pp=2",
        "parallel.layout=E0-2|D0-2",
    ]
    cfg = load_config(None, sets)
    layout, rows, _ = memory_plan.plan(cfg, 40, 64, 8, 8, "memory", 1, False, 4)
    full = count_parameters(build_model(cfg.model, 40, seed=0))
    assert sum(r.params for r in rows) == full + 40 * 32  # + the tied table's copy on the last stage
    assert memory_plan.main(sum([["--set", s] for s in sets[:-1] + ["parallel.layout=E0-2,D0-1|D2"]], [])) == 1
    assert "pass --allow-imbalance" in capsys.readouterr().err
