"""Regional compile (model.compile): each layer kind compiles once, a changing alpha recompiles nothing, compiled
training equals eager training (with and without the fused residual LayerNorm), and the parallel engine compiles
its chunks' layers too.

Dynamo's graph counter (model.regional_compile.compiled_graphs) is how "compiled at all" and "recompiled" are
seen: a compile that silently did nothing counts 0 graphs and fails these tests. The batch and sequence dimensions
are symbolic from the first step (model.compile_dynamic), so every test counts exactly one graph per layer kind
however the harness's micro-batch shapes vary, and none after the first step. The no-recompile tests use the
aot_eager backend (Dynamo + AOTAutograd, what decides recompiles; seconds); the equivalence tests use inductor,
the default, whose C++ compile on 2 cores takes about 30 s cold: they are marked slow.
"""

from __future__ import annotations

import os

import pytest
import torch

from megabranch.model import draw_init_seed
from megabranch.model.regional_compile import compile_layers, compiled_graphs
from megabranch.residual import alpha_at
from tests.helpers.configs import VOCAB, make_cfg
from tests.helpers.dist import run_workers
from tests.helpers.env import one_thread
from tests.helpers.reference import assert_matches, parallel_losses, reference_run, single_trainer, synthetic_batches

WARMUP = 6  # alpha_t = t / 6 for BranchNorm: the ramp crosses 1 inside the test's steps


def _cfg(compile_: bool, backend: str = "aot_eager", fused: bool = False, **parallel):
    cfg = make_cfg(2, 2, m=2, model=dict(compile=compile_, compile_backend=backend, fused_kernels=fused), **parallel)
    cfg.model.alpha_warmup_steps = WARMUP
    return cfg


@pytest.mark.unit
def test_each_layer_kind_compiles_once_and_the_alpha_ramp_recompiles_nothing():
    torch._dynamo.reset()
    cfg = _cfg(True)
    cfg.model.encoder_layers = cfg.model.decoder_layers = 3
    tr = single_trainer(cfg, seed=1)
    with one_thread():
        first = tr.train_step(synthetic_batches(0, 1))
        after_first = compiled_graphs()
        alphas = []
        for step in range(1, WARMUP + 3):
            # the same shapes every step: a new graph could only come from the new alpha (or from the health
            # monitor, which measures every step's update here)
            tr.health.measure_next = True
            alphas.append(tr.train_step(synthetic_batches(0, 1))["alpha"])
            assert tr.health.take_interval(step)["update_ratio"]
    assert first["graphs"] == 2 and first["compile_s"] > 0, first  # one per layer kind, for 6 layers
    assert alphas == pytest.approx([alpha_at(t, WARMUP) for t in range(1, WARMUP + 3)], rel=1e-7)
    assert len(set(alphas)) == WARMUP
    assert compiled_graphs() == after_first, "a changing alpha recompiled a layer"
    assert "compile_s" not in tr.train_step(synthetic_batches(0, 1))  # reported once


@pytest.mark.unit
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "torch-default"])
def test_new_batch_shapes_reuse_the_first_graphs(dynamic):
    """Micro-batches of varying batch size and lengths: one graph per layer kind from the first step when
    model.compile_dynamic is on; torch's default compiles each kind once more at the second shape."""
    torch._dynamo.reset()
    cfg = _cfg(True)
    cfg.model.compile_dynamic = dynamic
    tr = single_trainer(cfg, seed=1)
    with one_thread():
        first = tr.train_step(synthetic_batches(0, 1))
        after_first = compiled_graphs()
        for step in range(1, 4):
            tr.train_step(synthetic_batches(step, 2))
    assert first["graphs"] == 2, first
    assert compiled_graphs() - after_first == (0 if dynamic else 2), "recompiled for new shapes"


@pytest.mark.unit
def test_compile_off_compiles_nothing_and_a_bad_backend_is_a_user_error():
    from megabranch.errors import UserError

    torch._dynamo.reset()
    tr = single_trainer(_cfg(False), seed=1)
    before = compiled_graphs()
    with one_thread():
        stats = tr.train_step(synthetic_batches(0, 1))
    assert "compile_s" not in stats and compiled_graphs() == before
    with pytest.raises(UserError, match="model.compile_backend='nope' is invalid"):
        compile_layers(tr.model, "nope")


@pytest.mark.unit
@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["eager-op", "fused-op"])
def test_compiled_training_equals_eager(fused):
    """4 steps with inductor against the same steps uncompiled: losses within 1e-5 relative, the weights as the
    parallel-engine tests hold them (assert_matches). Dropout off: inductor draws its own random numbers."""
    torch._dynamo.reset()
    steps = 4
    ref = reference_run(_cfg(False, fused=fused), steps)
    cfg = _cfg(True, "inductor", fused=fused)
    tr = single_trainer(cfg, seed=draw_init_seed(cfg.seed))
    with one_thread():
        stats = [tr.train_step(synthetic_batches(s, cfg.optim.update_freq)) for s in range(steps)]
    assert stats[0]["graphs"] == 2 and all("graphs" not in s for s in stats[1:]), stats  # one per kind, shapes vary
    assert_matches(tr, [s["loss"] for s in stats], ref, f"inductor-compiled, fused={fused}")


def _pipeline_body(rank, world, ref_path):
    from megabranch.training.engine import Trainer

    torch._dynamo.reset()
    cfg = _cfg(True, "inductor", pp=2, layout="E0-1|D0-1", schedule="1f1b")
    tr = Trainer(cfg, VOCAB)
    first = tr.train_step(synthetic_batches(0, 2))
    assert first["graphs"] == 1, first  # this stage's one layer kind (encoder on rank 0, decoder on rank 1)
    losses = [first["loss"]] + parallel_losses(tr, 4, start=1)
    assert_matches(tr, losses, torch.load(ref_path), "pp2, inductor-compiled layers")
    if rank == 0:  # the activations it sent are still freed early under compile
        assert tr.executor.stats["freed_early_bytes"] > 0

    # tensor parallelism: the compiled layers hold the column/row-parallel linears and their collectives
    tr = Trainer(_cfg(True, "inductor", tp=2), VOCAB)
    first = tr.train_step(synthetic_batches(0, 2))
    assert first["graphs"] == 2, first
    losses = [first["loss"]] + parallel_losses(tr, 4, start=1)
    assert_matches(tr, losses, torch.load(ref_path), "tp2, inductor-compiled layers")


@pytest.mark.distributed
@pytest.mark.slow
def test_parallel_engine_compiles_its_layers(tmp_path):
    """pp2 with inductor-compiled layers (the partitioner decides what a compiled layer saves for backward, and the
    executor frees every sent activation), then tp2: each equal to the single-process eager run."""
    path = os.path.join(tmp_path, "ref.pt")
    torch.save(reference_run(_cfg(False), 4), path)
    run_workers(_pipeline_body, 2, path)


@pytest.mark.unit
@pytest.mark.parametrize("disabled", [False, True], ids=["compiled", "compile-disabled"])
def test_the_run_loop_logs_the_compile_and_warns_when_nothing_compiled(tiny_corpus, tmp_path, capsys, disabled):
    """The first step's compile time and graph count land in log.jsonl (tag compile); with torch.compile told to run
    everything eagerly (a global stance: Dynamo's own switch, torch._dynamo.config.disable, makes a fullgraph
    compile raise instead) the layers run eagerly and the run says so instead of passing silently."""
    import json

    from megabranch.data import load_split
    from megabranch.training.loop import RunData, train

    torch._dynamo.reset()
    if disabled:
        torch.compiler.set_stance("force_eager")
    cfg = _cfg(True)
    cfg.data.data_dir, cfg.data.max_tokens = tiny_corpus, 200
    cfg.optim.max_updates, cfg.optim.update_freq = 2, 1
    lg = cfg.log
    lg.save_dir, lg.tensorboard, lg.progress, lg.bleu_sentences, lg.valid_interval = str(tmp_path), False, "none", 4, 2
    data = load_split(tiny_corpus, "train")
    train_set, tok = data.dataset, data.tgt_tok
    valid_set = load_split(tiny_corpus, "valid").dataset
    tr = single_trainer(cfg, seed=1)
    try:
        with one_thread():
            stats = train(tr, cfg, RunData(train_set, valid_set, tok), save=False)
    finally:
        torch.compiler.set_stance("default")
    assert "bleu" in stats  # decoded (eagerly) with the compiled layers
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    (compiled,) = [r for r in records if r["tag"] == "compile"]
    assert compiled["step"] == 1 and compiled["compile_s"] > 0
    assert compiled["graphs"] == (0 if disabled else 2)
    warned = "compiled no graph" in capsys.readouterr().err
    assert warned == disabled
