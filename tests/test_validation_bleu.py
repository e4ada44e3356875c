"""Validation BLEU during parallel training: the parallel engine gathers the whole model on rank 0 (when it fits)
and the run loop logs its BLEU, equal to the BLEU of the same step's checkpoint consolidated from its shards by
the independent file path (checkpoint.load_checkpoint); a model that does not fit logs no BLEU, on every rank."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers.configs import make_cfg
from tests.helpers.dist import run_workers

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _body(rank, world, data_dir, save_dir):
    from megabranch import checkpoint
    from megabranch.config import Config
    from megabranch.data import load_split
    from megabranch.decoding import quick_bleu
    from megabranch.model import build_model_from
    from megabranch.training import engine as engine_module
    from megabranch.training.engine import Trainer
    from megabranch.training.loop import RunData, train

    cfg = make_cfg(2, 2, m=1, tp=2, pp=2, layout="E0-1|D0-1", schedule="1f1b")
    cfg.data.data_dir, cfg.data.max_tokens = data_dir, 200
    o, lg = cfg.optim, cfg.log
    o.max_updates, lg.valid_interval, lg.bleu_sentences, lg.bleu_beam = 3, 3, 6, 2
    lg.save_dir, lg.tensorboard, lg.progress = save_dir, False, "none"
    data = load_split(data_dir, "train")
    train_set, tok = data.dataset, data.tgt_tok
    valid_set = load_split(data_dir, "valid").dataset
    tr = Trainer(cfg, tok.vocab_size)
    stats = train(tr, cfg, RunData(train_set, valid_set, tok))
    assert ("bleu" in stats) == (rank == 0), stats  # decoded on rank 0 only

    # the gathered model is the one the checkpoint of the same step consolidates to, tensor for tensor
    gathered = tr.whole_model()
    assert (gathered is None) == (rank != 0)
    if rank == 0:
        state = checkpoint.load_checkpoint(save_dir)
        assert state["step"] == tr.step == 3
        ref = build_model_from(
            Config.from_dict(state["config"]).model, state["vocab_size"], None, state["model"], state["step"], save_dir
        )
        ours = dict(gathered.named_parameters())
        for name, p in ref.named_parameters():
            assert torch.equal(ours[name], p), name
        bleu = quick_bleu(ref, valid_set, tok, 2, 6)
        assert stats["bleu"] == bleu
        with open(os.path.join(save_dir, "log.jsonl")) as fh:
            valid = [r for r in map(json.loads, fh) if r["tag"] == "valid"]
        assert [r["bleu"] for r in valid] == [bleu]

    # a model that does not fit twice into rank 0's memory is not gathered: no BLEU, on every rank
    engine_module.free_memory_bytes = lambda device: 1
    assert tr.whole_model() is None


def test_parallel_training_logs_the_bleu_of_the_gathered_model(tiny_corpus, tmp_path):
    """tp2 x pp2 on 4 processes, 3 steps, validation with beam-2 BLEU of 6 sentences."""
    run_workers(_body, 4, tiny_corpus, str(tmp_path / "run"))
