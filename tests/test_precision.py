"""Mixed precision on the CPU: bf16 autocast training (single process, and the parallel engine over pp2, tp2 and
dp2) against fp32 and against each other, bf16 activations across pipeline stages, and fp16's dynamic loss
scaling in the parallel engine (the scaling and the global overflow skip, with an injected overflow).

Tolerances, all on per-step losses of the tiny 2L-2L BranchNorm harness model (make_cfg) over 20 steps:
  * bf16 vs fp32: 5e-3 relative (bf16 keeps 8 significand bits, a unit roundoff of 3.9e-3; measured 7e-4);
  * the parallel engine's bf16 vs the single-process bf16: 5e-3 relative (the same mixed-precision maths; a
    tensor-parallel split sums its bf16 partial products in another order, and with pp the activation crosses the
    stage boundary as bf16, which is what the single-process model holds there too, since CPU autocast runs
    LayerNorm in bf16), and the first step, from identical weights, 2e-3;
  * bf16 must differ from fp32 at all (> 1e-6 somewhere), so a run that silently stayed fp32 fails.
What only a GPU shows (tools/gpu_check.py): fp16 autocast itself (its range overflows for real), the CUDA autocast
policy (LayerNorm in fp32 there, so the boundary cast to bf16 is a real rounding), and NCCL's p2p in bf16.
"""

from __future__ import annotations

import os

import pytest
import torch

from megabranch.model import draw_init_seed
from megabranch.training.loss_scaler import DynamicLossScaler
from tests.helpers.configs import VOCAB, make_cfg
from tests.helpers.dist import run_workers
from tests.helpers.reference import assert_matches, parallel_losses, reference_run, single_trainer, synthetic_batches

STEPS = 20
BF16_VS_FP32 = 5e-3
PARALLEL_VS_SINGLE = 5e-3
FIRST_STEP = 2e-3

# name -> parallel settings over 2 processes
LAYOUTS = {"pp2": dict(pp=2, layout="E0-1|D0-1", schedule="1f1b"), "tp2": dict(tp=2), "dp2": dict()}


def _cfg(precision: str, **parallel):
    cfg = make_cfg(2, 2, m=2, **parallel)
    cfg.optim.precision = precision
    return cfg


def _max_rel(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.unit
def test_single_process_bf16_tracks_fp32():
    fp32, _ = reference_run(_cfg("fp32"), STEPS)
    bf16, _ = reference_run(_cfg("bf16"), STEPS)
    err = _max_rel(bf16, fp32)
    assert 1e-6 < err <= BF16_VS_FP32, f"bf16 vs fp32: max relative loss difference {err:.3g}"
    assert bf16[-1] < bf16[0]


def _precision_body(rank, world, refs):
    from megabranch.training.engine import Trainer

    for name, parallel in LAYOUTS.items():
        dp = 2 if name == "dp2" else 1
        ref_bf16, ref_fp32 = torch.load(refs[dp]["bf16"]), torch.load(refs[dp]["fp32"])
        tr = Trainer(_cfg("bf16", **parallel), VOCAB)
        losses = parallel_losses(tr, STEPS)
        first = abs(losses[0] - ref_bf16[0][0]) / ref_bf16[0][0]
        assert first <= FIRST_STEP, f"{name}: first bf16 step {losses[0]} vs single-process {ref_bf16[0][0]}"
        err = _max_rel(losses, ref_bf16[0])
        assert err <= PARALLEL_VS_SINGLE, f"{name}: bf16 vs single-process bf16 differ by {err:.3g}"
        err = _max_rel(losses, ref_fp32[0])
        assert 1e-6 < err <= BF16_VS_FP32, f"{name}: bf16 vs single-process fp32 differ by {err:.3g}"
        assert all(p.dtype == torch.float32 for p in tr.params)  # autocast: fp32 weights, bf16 compute

    # the bytes that cross the stage boundary: bf16 sends half of what fp32 sends, forward and backward
    sent = {}
    for precision in ("fp32", "bf16"):
        tr = Trainer(_cfg(precision, **LAYOUTS["pp2"]), VOCAB)
        parallel_losses(tr, 2)
        sent[precision] = tr.executor.stats["sent_bytes"]
    assert sent["fp32"] > 0 and sent["bf16"] * 2 == sent["fp32"], sent


def _save_refs(tmp_path) -> dict:
    refs = {}
    for dp in (1, 2):
        for precision in ("fp32", "bf16"):
            path = os.path.join(tmp_path, f"ref-{precision}-dp{dp}.pt")
            torch.save(reference_run(_cfg(precision), STEPS, dp=dp), path)
            refs.setdefault(dp, {})[precision] = path
    return refs


@pytest.mark.distributed
@pytest.mark.slow
def test_parallel_bf16_matches_single_process_bf16(tmp_path):
    """pp2, tp2 and dp2 in bf16 for 20 steps: against the single-process bf16 and fp32 runs; pp2's sent bytes."""
    run_workers(_precision_body, 2, _save_refs(tmp_path))


# --- fp16 dynamic loss scaling --------------------------------------------------------------------------------

OVERFLOW_AT = 4  # the step whose gradient gets an inf (on one rank only, in the parallel run)
SCALER = dict(init_scale=2.0**10, growth_interval=3)
SCALER_STEPS = 8


def _expected_scales() -> list[float]:
    """The scale each step runs with, by GradScaler's rule: x2 after 3 clean steps in a row, x0.5 on overflow."""
    scale, clean, out = SCALER["init_scale"], 0, []
    for step in range(SCALER_STEPS):
        out.append(scale)
        if step == OVERFLOW_AT:
            scale, clean = scale / 2, 0
        else:
            clean += 1
            if clean == SCALER["growth_interval"]:
                scale, clean = scale * 2, 0
    return out


def _inject_overflow(param, trainer) -> None:
    """An inf in `param`'s gradient during step OVERFLOW_AT."""
    param.register_hook(lambda g: torch.full_like(g, float("inf")) if trainer.step == OVERFLOW_AT else g)


def _scaler_reference(path: str) -> None:
    """The single-process fp32 Trainer on the global batches, the same inf injected at OVERFLOW_AT (it skips that
    step on its non-finite norm)."""
    cfg = _cfg("fp32")
    tr = single_trainer(cfg, seed=draw_init_seed(cfg.seed))
    _inject_overflow(tr.model[0].decoder.layers[1].ffn.block.fc2.weight, tr)
    stats = [tr.train_step(synthetic_batches(s, 4)) for s in range(SCALER_STEPS)]
    torch.save(
        (
            [s["loss"] for s in stats],
            {k: v.detach().clone() for k, v in tr.named_params().items()},
            [s["skipped"] for s in stats],
            [s["gnorm"] for s in stats],
        ),
        path,
    )


def _scaler_body(rank, world, ref_path, save_dir):
    from megabranch.training.engine import Trainer

    cfg = _cfg("fp32", pp=2, layout="E0-1|D0-1", schedule="1f1b")
    tr = Trainer(cfg, VOCAB)
    tr.precision.scaler = DynamicLossScaler(**SCALER)  # fp16's machinery over fp32 compute: scaling by 2^k is exact
    if rank == 3:  # stage 1, replica 1 only: every other rank must learn of it and skip too
        _inject_overflow(tr.named_params()["decoder.layers.1.ffn.block.fc2.weight"], tr)
    losses, skipped, scales, gnorms = [], [], [], []
    for s in range(SCALER_STEPS):
        scales.append(tr.precision.loss_scale)
        stats = tr.train_step(synthetic_batches(s, 4)[tr.grid.dp_rank :: 2])
        losses.append(stats["loss"])
        skipped.append(stats["skipped"])
        gnorms.append(stats["gnorm"])
    ref_losses, ref_params, ref_skipped, ref_gnorms = torch.load(ref_path)
    assert skipped == ref_skipped == [int(s == OVERFLOW_AT) for s in range(SCALER_STEPS)], (skipped, ref_skipped)
    assert scales == _expected_scales(), scales
    for step, (a, b) in enumerate(zip(gnorms, ref_gnorms)):  # the unscaled gradient's norm
        assert step == OVERFLOW_AT and a == b == float("inf") or abs(a - b) <= 1e-5 * b, (step, a, b)
    assert_matches(tr, losses, (ref_losses, ref_params), "pp2 x dp2 with loss scaling and an injected overflow")

    # the scaler state travels in the checkpoint and comes back on every rank
    tr.save(save_dir, {"epoch": 1}, 1.0, 1.0, True)
    tr.finish_saves()  # log.async_save: published in the background
    fresh = Trainer(cfg, VOCAB)
    fresh.precision.scaler = DynamicLossScaler()
    fresh.resume(save_dir)
    assert fresh.precision.state_dict() == tr.precision.state_dict()


@pytest.mark.distributed
@pytest.mark.slow
def test_parallel_loss_scaling_skips_an_overflow_on_every_rank(tmp_path):
    """pp2 x dp2 (4 processes), fp32 compute under fp16's dynamic loss scaling: equal to the unscaled
    single-process run, an inf on one rank's gradient skips the step on all four, the scale follows
    GradScaler's rule, and resuming restores it."""
    ref = str(tmp_path / "ref.pt")
    _scaler_reference(ref)
    run_workers(_scaler_body, 4, ref, str(tmp_path / "run"))


@pytest.mark.unit
def test_loss_scaler_follows_grad_scaler_and_shares_its_checkpoint_format():
    """Step by step against torch.amp.GradScaler itself (on the CPU), fed the same overflows."""
    ours, theirs = DynamicLossScaler(**SCALER), torch.amp.GradScaler("cpu", **SCALER)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.0)
    for overflow in (False, False, False, True, False, False, False, False, True):
        theirs.scale(p.sum()).backward()
        p.grad.fill_(float("inf") if overflow else 1.0)
        theirs.step(opt)
        theirs.update()
        ours.update(overflow)
        assert ours.scale == theirs.get_scale() and ours.state_dict() == theirs.state_dict()
    assert ours.scale == 2.0**10  # grown twice, backed off twice
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(ours.state_dict())  # our checkpoint in torch's scaler, and back
    again = DynamicLossScaler()
    again.load_state_dict(back.state_dict())
    assert again.state_dict() == ours.state_dict()
    g = torch.nn.Parameter(torch.ones(3))
    g.grad = torch.full((3,), 2.0**11)
    ours.unscale_([g, g])  # a parameter listed twice is unscaled once
    assert g.grad.tolist() == [2.0, 2.0, 2.0]


@pytest.mark.unit
def test_fp16_needs_cuda():
    from megabranch.errors import UserError
    from megabranch.training.engine import Trainer

    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        Trainer(_cfg("fp16"), VOCAB)
