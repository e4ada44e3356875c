"""The eight baseline schemes (ds_init, admin, rezero, r_fixup, t_fixup, dlcl, normformer, subln) in the parallel
layouts, each against the single-process Trainer over 20 steps on the harness's varying micro-batches: per-step
losses within 1e-5 relative and the parameters after the last step (tests/helpers/reference.py). One launch per
layout family loops over the schemes:

  4 processes   tp 2 x pp 2 zb-v (the V's local hand-over, the B/W split, across tensor-parallel stages)
  2 processes   pp 2, vpp 2 interleaved 1F1B with recompute every layer; dp 2 with ZeRO-1 (Admin: replica 0's
                profiled omegas on both); pp 2 zb-h1; dp 2 in bf16
                (against the single-process bf16 run within test_precision's parallel-vs-single tolerance: bf16
                rounding turns the summation-order noise of fp32 gradients into 1e-4 .. 1e-3 per-step loss
                differences even for post_ln over dp 2)

The model is the harness's 2L-2L; every pipeline cuts both stacks (E0|E1|D0|D1, E0-1,D0|D1), so DLCL's histories
cross stage boundaries inside the encoder and the decoder and Admin's profiling runs stage by stage. Each pair of
features meets for every scheme: tensor x pipeline parallelism here (zb-v), the interleaved pipeline x recompute
here, tensor parallelism x recompute in test_sequence_parallel.py (tp 2, recompute every layer, all twelve). Four
processes share 2 cores at about 7x the cost of two for the same steps, so only the first runs on four. The four
older schemes have their own layout tests (test_engine.py, test_pipeline.py, test_zero_bubble.py,
test_precision.py)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.configs import VOCAB, make_cfg
from tests.helpers.dist import run_workers
from tests.helpers.reference import assert_matches, parallel_losses, reference_run
from tests.test_precision import PARALLEL_VS_SINGLE

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 20
SCHEMES = ("ds_init", "admin", "rezero", "r_fixup", "t_fixup", "dlcl", "normformer", "subln")
SPLIT = "E0|E1|D0|D1"
FOUR = {  # name -> (micro-batches per replica, data-parallel size, parallel settings)
    "tp2-pp2-zb-v": (3, 1, dict(tp=2, pp=2, vpp=2, schedule="zb-v", layout=SPLIT)),
}
TWO = {
    "pp2-vpp2-interleaved-recompute": (2, 1, dict(pp=2, vpp=2, schedule="interleaved", recompute=1, layout=SPLIT)),
    "dp2-zero1": (2, 2, dict(zero=True)),
    "pp2-zb-h1": (3, 1, dict(pp=2, schedule="zb-h1", layout="E0-1,D0|D1")),
    "dp2-bf16": (2, 2, dict(precision="bf16")),
}


def _cfg(residual: str, m: int, parallel: dict):
    parallel = dict(parallel)
    precision = parallel.pop("precision", "fp32")
    cfg = make_cfg(2, 2, m=m, residual=residual, **parallel)
    cfg.optim.precision = precision
    return cfg


def _references(tmp_path, layouts: dict) -> dict:
    """(scheme, layout name) -> a file with the single-process run on the same global batches (a file: the
    parameters do not pickle through the spawn pipes)."""
    refs = {}
    for residual in SCHEMES:
        for name, (m, dp, parallel) in layouts.items():
            single = {"precision": parallel["precision"]} if "precision" in parallel else {}
            path = os.path.join(tmp_path, f"{residual}-{name}.pt")
            torch.save(reference_run(_cfg(residual, m, single), STEPS, dp=dp), path)
            refs[(residual, name)] = path
    return refs


def _body(rank, world, layouts, refs):
    from megabranch.training.engine import Trainer

    for residual in SCHEMES:
        for name, (m, dp, parallel) in layouts.items():
            tr = Trainer(_cfg(residual, m, parallel), VOCAB)
            assert tr.grid.dp == dp
            losses = parallel_losses(tr, STEPS)
            ref = torch.load(refs[(residual, name)])
            what = f"{residual} {name}"
            if "precision" in parallel:  # bf16 compute: the losses (weights and gradients stay fp32)
                err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref[0]))
                assert err <= PARALLEL_VS_SINGLE, f"{what}: bf16 losses differ from one process's by {err:.3g}"
            else:
                assert_matches(tr, losses, ref, what)
            assert losses[-1] < losses[0], what


def test_schemes_tp_x_pp_zero_bubble_v_match_single_process(tmp_path):
    run_workers(_body, 4, FOUR, _references(tmp_path, FOUR))


def test_schemes_interleaved_recompute_dp_zero1_zero_bubble_h1_and_bf16_match_single_process(tmp_path):
    run_workers(_body, 2, TWO, _references(tmp_path, TWO))
