"""Step directories of tiny runs: the 2L-2L harness config in any layout, a run's metadata, saving a trainer's
step as train.py does, and a single-process run saved at chosen steps."""

from __future__ import annotations

from megabranch import checkpoint

from .configs import VOCAB, make_cfg
from .env import one_thread
from .reference import single_trainer, synthetic_batches

SAVED_AT = 3  # the data position a saved shard records (test_checkpoint saves after 3 steps)


class Position:
    """Stands in for the data iterator: what a shard records as the data position."""

    def state_dict(self):
        return {"epoch": 1, "iterations_in_epoch": SAVED_AT}


def ckpt_cfg(tp=1, pp=1, vpp=1, layout="", zero=False):
    """make_cfg(2, 2, m=2) in a (tp, pp, vpp) layout; a plain pipeline runs 1F1B."""
    kw = dict(tp=tp, pp=pp, vpp=vpp, layout=layout, zero=zero)
    if pp > 1 and vpp == 1:
        kw["schedule"] = "1f1b"
    return make_cfg(2, 2, m=2, **kw)


def step_meta(cfg, tr) -> dict:
    pos = tr.position()
    return {
        "layout": {k: pos[k] for k in ("tp", "pp", "vpp", "dp", "layout", "zero")},
        "config": cfg.to_dict(),
        "vocab_size": VOCAB,
        "tgt_vocab_size": VOCAB,
        "vocab_sha256": "test",
    }


def save_trainer(tr, cfg, save_dir: str, keep_last: int = 0) -> str:
    return checkpoint.save_step(
        save_dir,
        tr.step,
        tr.checkpoints.files(tr.step, tr.alpha(), Position().state_dict()),
        step_meta(cfg, tr),
        keep_last=keep_last,
    )


def tiny_single(tmp_path, steps=(2, 4, 6), keep_last=0) -> str:
    """A single-process run of ckpt_cfg() saved at `steps` into tmp_path/run, whose path is returned."""
    cfg = ckpt_cfg()
    tr = single_trainer(cfg, seed=1)
    save_dir = str(tmp_path / "run")
    with one_thread():
        for s in range(max(steps)):
            tr.train_step(synthetic_batches(s, 2))
            if tr.step in steps:
                save_trainer(tr, cfg, save_dir, keep_last=keep_last)
    return save_dir
