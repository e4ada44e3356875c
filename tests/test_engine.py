"""The parallel engine against the single-process Trainer: 20 steps of per-step losses (relative 1e-5, float32,
dropout off) and the parameters after the last step, on 4 processes with (tp, pp) = (2, 2) vpp 2, (1, 4) vpp 2
and (4, 1), and on 8 processes with (dp, tp, pp) = (2, 2, 2) vpp 2 (ZeRO-1 optimizer); and a 1000-layer
(500L-500L) d=32 model trained for 3 steps over 4 pipeline stages with activation recomputation."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.configs import VOCAB, make_cfg
from tests.helpers.dist import run_workers
from tests.helpers.reference import AlphaAudit, assert_matches, parallel_losses, reference_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 20
DEEP_STEPS = 3  # the 1000-layer model: ~3 s per single-process step on one core

# name -> (world, micro-batches per replica, parallel settings); every micro-batch has its own shapes
CONFIGS_4 = {
    "tp2-pp2-vpp2": (2, dict(tp=2, pp=2, vpp=2, schedule="interleaved", layout="E0-2|E3,D0|D1-2|D3")),
    "tp1-pp4-vpp2": (4, dict(pp=4, vpp=2, schedule="interleaved", layout="E0|E1|E2|E3|D0|D1|D2|D3")),
    "tp4-pp1": (2, dict(tp=4)),
}
CONFIG_8 = (2, dict(tp=2, pp=2, vpp=2, schedule="interleaved", layout="E0-2|E3,D0|D1-2|D3", zero=True))


def _check(name: str, m: int, parallel: dict, ref_path: str) -> None:
    from megabranch.training.engine import Trainer

    cfg = make_cfg(4, 4, m=m, **dict(parallel))
    tr = Trainer(cfg, VOCAB)
    audit = AlphaAudit(tr)
    losses = []
    for step in range(STEPS):
        audit.records.clear()
        losses += parallel_losses(tr, step + 1, step)
        errors = audit.errors(step)  # every stage, every micro-batch, forward and backward: alpha_t
        assert not errors, f"{name}: {errors[:2]}"
    assert_matches(tr, losses, torch.load(ref_path), name)


def _body_4(rank, world, refs):
    for name, (m, parallel) in CONFIGS_4.items():
        _check(name, m, parallel, refs[m])


def _body_8(rank, world, ref):
    m, parallel = CONFIG_8
    _check("dp2-tp2-pp2-vpp2-zero1", m, parallel, ref)


def _save_reference(tmp_path, m: int, dp: int = 1, steps: int = STEPS, enc: int = 4, dec: int = 4) -> str:
    path = os.path.join(tmp_path, f"ref-{enc}-{dec}-m{m}-dp{dp}.pt")
    # a file, not an argument: 20k tensors do not pickle through the spawn pipes
    torch.save(reference_run(make_cfg(enc, dec, m=m), steps, dp=dp), path)
    return path


def test_four_processes_match_single_process(tmp_path):
    refs = {m: _save_reference(tmp_path, m) for m in {m for m, _ in CONFIGS_4.values()}}
    run_workers(_body_4, 4, refs)


def test_eight_processes_dp_tp_pp_match_single_process(tmp_path):
    m, _ = CONFIG_8
    run_workers(_body_8, 8, _save_reference(tmp_path, m, dp=2))


def _deep_body(rank, world, ref_path):
    from megabranch.training.engine import Trainer

    cfg = make_cfg(500, 500, m=2, pp=4, recompute=1)
    tr = Trainer(cfg, VOCAB)
    (chunk,) = tr.model  # this rank's slice only: 4 stages, each well under the 1000 layers
    held = [len(getattr(s, "layers", ())) for s in (chunk.encoder, chunk.decoder)]
    assert 100 < sum(held) < 500, (str(tr.layout), held)
    losses = parallel_losses(tr, DEEP_STEPS)
    assert_matches(tr, losses, torch.load(ref_path), "500L-500L over 4 stages")
    assert losses[-1] < losses[0]


def test_thousand_layer_model_trains_over_four_stages(tmp_path):
    """500 encoder + 500 decoder layers, d=32, BranchNorm, recompute every layer, 1F1B over 4 stages, 3 steps (each
    after an update: the optimizer step crossed every stage)."""
    run_workers(_deep_body, 4, _save_reference(tmp_path, 2, steps=DEEP_STEPS, enc=500, dec=500))
