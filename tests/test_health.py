"""The training health monitor (megabranch/training/health.py): per-layer gradient norms and update ratios equal a
direct per-parameter computation, on one process and over tp2 x pp2; the warning fires when a stack's bottom stops
learning (a run made to collapse) and not on a healthy one; log.jsonl and the heatmap carry the records."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

from megabranch.metrics import heatmap, heatmap_image
from megabranch.model import canonical_parameters, draw_init_seed, label_smoothed_nll_loss
from megabranch.residual import set_step
from megabranch.training.health import HealthMonitor, group_name, group_names
from tests.helpers.configs import VOCAB, make_cfg
from tests.helpers.dist import run_workers
from tests.helpers.env import one_thread
from tests.helpers.reference import single_trainer, synthetic_batches

REL = 1e-3  # the records keep 4 significant digits


def _direct(named_before: dict, named_grads: dict, named_after: dict) -> tuple[dict, dict]:
    """Per group: the gradient norm and ||after - before|| / ||before||, summed parameter by parameter."""
    g2, u2, w2 = {}, {}, {}
    for name, grad in named_grads.items():
        g = group_name(name)
        g2[g] = g2.get(g, 0.0) + float(grad.double().square().sum())
        u2[g] = u2.get(g, 0.0) + float((named_after[name] - named_before[name]).double().square().sum())
        w2[g] = w2.get(g, 0.0) + float(named_before[name].double().square().sum())
    return ({g: math.sqrt(v) for g, v in g2.items()}, {g: math.sqrt(u2[g] / w2[g]) for g in u2})


def _flat(record_part: dict) -> dict:
    """{"encoder": [a, b], "encoder.embed": c} -> {"encoder.0": a, "encoder.1": b, "encoder.embed": c}."""
    out = {}
    for k, v in record_part.items():
        if isinstance(v, list):
            out.update({f"{k}.{i}": x for i, x in enumerate(v)})
        else:
            out[k] = v
    return out


def _one_step_record(tr, step: int, batches: list[dict]) -> dict:
    tr.health.measure_next = True
    tr.train_step(batches)
    return tr.health.take_interval(step + 1)


@pytest.mark.unit
def test_per_layer_norms_and_update_ratios_equal_a_direct_computation():
    cfg = make_cfg(3, 2, m=2, model={"share_all_embeddings": False, "share_decoder_input_output_embed": False})
    tr = single_trainer(cfg, seed=3)
    with one_thread():
        for step in range(3):
            batches = synthetic_batches(step, 2)
            before = {k: v.detach().clone() for k, v in tr.named_params().items()}
            twin = copy.deepcopy(tr.model[0])  # the same step by hand: the gradient the engine clips
            set_step(twin, step)
            ntokens = sum(b["ntokens"] for b in batches)
            for b in batches:
                loss, _ = label_smoothed_nll_loss(
                    twin(b["src_tokens"], b["prev_output_tokens"]), b["target"], cfg.optim.label_smoothing
                )
                (loss / ntokens).backward()
            grads = {k: p.grad for k, p in canonical_parameters(twin, cfg.model).items()}
            record = _one_step_record(tr, step, batches)
            after = {k: v.detach() for k, v in tr.named_params().items()}
            want_grad, want_ratio = _direct(before, grads, after)
            got_grad, got_ratio = _flat(record["grad_norm"]), _flat(record["update_ratio"])
            assert (
                set(got_grad)
                == set(want_grad)
                == {
                    "encoder.embed",
                    "encoder.0",
                    "encoder.1",
                    "encoder.2",
                    "decoder.embed",
                    "decoder.0",
                    "decoder.1",
                    "decoder.output",
                }
            )
            for g, v in want_grad.items():
                assert got_grad[g] == pytest.approx(v, rel=REL), (step, g)
                assert got_ratio[g] == pytest.approx(want_ratio[g], rel=REL), (step, g)


@pytest.mark.unit
def test_groups_come_from_the_config_alone():
    assert group_names(2, 1) == [
        "encoder.embed",
        "encoder.0",
        "encoder.1",
        "encoder.final_norm",
        "encoder.other",
        "decoder.embed",
        "decoder.0",
        "decoder.final_norm",
        "decoder.output",
        "decoder.other",
    ]
    assert group_name("encoder.layers.7.ffn.block.fc1.weight") == "encoder.7"
    assert group_name("decoder.embed.learned_positions.weight") == "decoder.embed"
    assert group_name("decoder.final_norm.weight") == "decoder.final_norm"
    assert group_name("encoder.something_new") == "encoder.other"


@pytest.mark.unit
def test_the_warning_says_once_names_the_layers_and_comes_back_only_after_recovery():
    said: list[str] = []
    mon = HealthMonitor(["encoder.layers.0.w", "encoder.layers.1.w", "encoder.layers.2.w"], 3, 0)
    mon.warn = said.append
    healthy, starved = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1e-9, 1e-4, 1e-2])

    def interval(norms, step):
        sums = torch.zeros(len(mon.groups))
        sums[[mon.groups.index(f"encoder.{i}") for i in range(3)]] = norms.square()
        mon.observe_gradients(sums)
        return mon.take_interval(step)

    for step in (10, 20):
        interval(starved, step)
    assert not said  # two intervals are not yet "for several intervals"
    record = interval(starved, 30)
    assert record["grad_norm"]["encoder"] == pytest.approx([1e-9, 1e-4, 1e-2], rel=REL)
    assert len(said) == 1 and said[0].startswith("warning: step 30: encoder layer 0 gets 1e+07x less gradient")
    assert "encoder layer 2" in said[0] and "optim.warmup_updates" in said[0] and "optim.clip_norm" in said[0]
    interval(starved, 40)
    assert len(said) == 1  # said once
    interval(healthy, 50)
    for step in (60, 70, 80):
        interval(starved, step)
    assert len(said) == 2 and said[1].startswith("warning: step 80:")


def _train_run(tmp_path, data_dir: str, residual: str, lr: float, warmup: int, clip: float, steps: int) -> list[dict]:
    from megabranch.data import load_split
    from megabranch.training.loop import RunData, train

    cfg = make_cfg(4, 4, m=1, residual=residual)
    o, lg = cfg.optim, cfg.log
    o.lr, o.warmup_updates, o.clip_norm, o.max_updates = lr, warmup, clip, steps
    cfg.data.data_dir, cfg.data.max_tokens = data_dir, 200
    lg.save_dir, lg.log_interval, lg.valid_interval = str(tmp_path / residual), 5, steps
    lg.bleu_sentences, lg.tensorboard, lg.progress, lg.async_save = 0, False, "none", False
    data = load_split(data_dir, "train")
    valid_set = load_split(data_dir, "valid").dataset
    tr = single_trainer(cfg, seed=1)
    with one_thread():
        train(tr, cfg, RunData(data.dataset, valid_set, data.tgt_tok))
    with open(os.path.join(lg.save_dir, "log.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["tag"] == "health"]


@pytest.mark.unit
def test_a_collapsing_run_is_warned_about_and_a_healthy_one_is_not(tiny_corpus, tmp_path, capfd):
    """Post-LN at lr 0.03 after 5 warmup steps without clipping: within 40 steps the bottom of a stack gets over
    1e4 less gradient than its top (measured: the decoder's ratio passes 1e9). The same model at lr 1e-3 with
    clipping trains without a warning. log.jsonl holds a health record per log interval."""
    records = _train_run(tmp_path, tiny_corpus, "post_ln", 0.03, 5, 0.0, 40)
    err = capfd.readouterr().err
    assert "layer 0 gets" in err and "has stopped learning" in err, err[-2000:]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(len(r["grad_norm"]["encoder"]) == 4 and "update_ratio" in r for r in records)
    labels, steps, rows = heatmap(records)
    assert labels[0] == "encoder.0" and labels[-1] == "decoder.3" and steps == [r["step"] for r in records]
    assert len(rows) == 8 and all(len(row) == len(records) for row in rows)
    image = heatmap_image(records)
    assert image.shape == (8, len(records), 3) and image.dtype.name == "uint8"

    _train_run(tmp_path, tiny_corpus, "branchnorm", 1e-3, 5, 1.0, 40)
    assert "stopped learning" not in capfd.readouterr().err


def _tp_pp_body(rank, world, refs):
    from megabranch.training.engine import Trainer

    cfg = make_cfg(2, 2, m=2, tp=2, pp=2, layout="E0-1|D0-1", schedule="1f1b")
    tr = Trainer(cfg, VOCAB)
    for step, want in enumerate(refs):
        got = _one_step_record(tr, step, synthetic_batches(step, 2))
        for key in ("grad_norm", "update_ratio"):
            g, w = _flat(got[key]), _flat(want[key])
            assert set(g) == set(w), (key, sorted(g), sorted(w))
            for name, v in w.items():
                assert g[name] == pytest.approx(v, rel=2 * REL), (rank, step, key, name)


@pytest.mark.distributed
def test_tensor_and_pipeline_parallel_records_equal_the_single_process_ones():
    """tp2 x pp2 (4 processes): every rank's records equal the one-process run's (which the unit test above holds
    to a direct computation); each group's norm lives on one stage and its shards on two tp ranks."""
    cfg = make_cfg(2, 2, m=2)
    tr = single_trainer(cfg, seed=draw_init_seed(cfg.seed))
    with one_thread():
        refs = [_one_step_record(tr, step, synthetic_batches(step, 2)) for step in range(2)]
    run_workers(_tp_pp_body, 4, refs)
