"""Sharded checkpoints: layout round trips (2,2) -> (1,1) -> (4,1) -> (1,4) -> (2,2) with identical weights and
identical continued training, resharding on load, ZeRO-1 shards, atomic publication and keep-last-K, and refusal
of corrupt shards and of pickles that carry code."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megabranch import checkpoint
from megabranch.errors import UserError
from megabranch.training.loss_scaler import DynamicLossScaler
from tests.helpers.checkpoints import SAVED_AT, ckpt_cfg, save_trainer, tiny_single
from tests.helpers.configs import VOCAB
from tests.helpers.dist import run_workers
from tests.helpers.env import one_thread
from tests.helpers.reference import parallel_losses, single_trainer, synthetic_batches

MORE = 3  # train SAVED_AT (3) steps, save, train 3 more
OLD_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "old_main")  # format-2 step directories


def _parallel_from(step_dir: str, cfg):
    from megabranch.training.engine import Trainer

    tr = Trainer(cfg, VOCAB, init_seed=99)  # other initial weights: the checkpoint must overwrite them all
    meta = checkpoint.read_meta(step_dir)
    state = checkpoint.load_for_rank(step_dir, meta, tr.position(), tr.named_params())
    tr.load_checkpoint_state(state)
    return tr, state


def _single_losses(step_dir: str, steps: int, dp: int = 1) -> list[float]:
    meta = checkpoint.read_meta(step_dir)
    cfg = ckpt_cfg()
    tr = single_trainer(cfg, seed=5)
    tr.load_checkpoint_state(checkpoint.load_for_rank(step_dir, meta, tr.position(), tr.named_params()))
    assert tr.step == int(meta["step"])
    m = cfg.optim.update_freq
    with one_thread():
        return [tr.train_step(synthetic_batches(s, m * dp))["loss"] for s in range(tr.step, tr.step + steps)]


def _close(got, want, what, rel=1e-5):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= rel * abs(b), f"{what}: step {i} loss {a} vs {b}"


CHAIN = [(1, 1, ""), (4, 1, ""), (1, 4, "E0|E1|D0|D1"), (2, 2, "E0-1|D0-1")]


def _round_trip_body(rank, world, root):
    import torch.distributed as dist

    from megabranch.convert import main as convert_main
    from megabranch.training.engine import Trainer

    cfg = ckpt_cfg(2, 2, layout="E0-1|D0-1")
    tr = Trainer(cfg, VOCAB)
    parallel_losses(tr, SAVED_AT)
    first = save_trainer(tr, cfg, os.path.join(root, "run"))
    ref = parallel_losses(tr, SAVED_AT + MORE, SAVED_AT)  # the uninterrupted continuation

    # rank 0 converts along the chain with megabranch-convert (each hop checks its own outputs)
    dirs, src = [], first
    for i, (tp, pp, layout) in enumerate(CHAIN):
        out = os.path.join(root, f"hop{i}-tp{tp}-pp{pp}")
        if rank == 0:
            args = [src, out, "--tp", str(tp), "--pp", str(pp)] + (["--layout", layout] if layout else [])
            assert convert_main(args) == 0
        dirs.append(out)
        src = out
    dist.barrier()

    if rank == 0:  # identical weights and optimizer state after every hop
        model0, opt0 = checkpoint.consolidate(first)
        for d in dirs:
            model, opt = checkpoint.consolidate(d)
            assert set(model) == set(model0) and all(torch.equal(model[k], model0[k]) for k in model0), d
            assert all(torch.equal(opt[k][n], opt0[k][n]) for k in ("exp_avg", "exp_avg_sq") for n in opt0[k]), d
        # (1, 1): the single-process trainer continues like the (2, 2) run (other arithmetic order: 1e-5)
        _close(_single_losses(dirs[0], MORE), ref, "(1,1) continued")

    # every multi-process layout of the chain continues training identically
    for (tp, pp, layout), d in zip(CHAIN[1:], dirs[1:]):
        tr2, state = _parallel_from(d, ckpt_cfg(tp, pp, layout=layout))
        assert tr2.step == SAVED_AT and not state["resharded"]
        got = parallel_losses(tr2, SAVED_AT + MORE, SAVED_AT)
        if (tp, pp) == (2, 2):
            assert got == ref, "back at (2,2): bit for bit"
        else:
            _close(got, ref, f"({tp},{pp}) continued")

    # resharding on load: the (2, 2) checkpoint read straight into a (1, 4) grid
    tr3, state = _parallel_from(first, ckpt_cfg(1, 4, layout="E0|E1|D0|D1"))
    assert state["resharded"]
    _close(parallel_losses(tr3, SAVED_AT + MORE, SAVED_AT), ref, "(2,2) resharded on load into (1,4)")

    # ZeRO-1 over dp=2 (pp=2): per-replica optimizer shards; same layout resumes bit for bit, and the shards
    # unflatten by name for the single-process trainer
    cfgz = ckpt_cfg(1, 2, layout="E0-1|D0-1", zero=True)
    trz = Trainer(cfgz, VOCAB)
    parallel_losses(trz, SAVED_AT)
    zdir = save_trainer(trz, cfgz, os.path.join(root, "zero"))
    refz = parallel_losses(trz, SAVED_AT + MORE, SAVED_AT)
    if rank == 0:
        names = sorted(checkpoint.read_meta(zdir)["files"])
        assert names == sorted(
            f
            for s in ("shard_tp0_pp0", "shard_tp0_pp0_dp1", "shard_tp0_pp1", "shard_tp0_pp1_dp1")
            for f in checkpoint.shard_files(s)
        ), names
    trz2, state = _parallel_from(zdir, cfgz)
    assert not state["resharded"] and state["zero"] is not None
    assert parallel_losses(trz2, SAVED_AT + MORE, SAVED_AT) == refz
    if rank == 0:
        _close(_single_losses(zdir, MORE, dp=2), refz, "ZeRO-1 (dp 2, pp 2) -> single process")


@pytest.mark.unit
def test_load_model_is_the_single_process_model_at_its_step(tmp_path):
    """checkpoint.load_model (megabranch-generate, the analysis) and model_from_weights (the conversions' check):
    the saved weights at the saved step's alpha, in eval mode, the kernel override in model and config alike, and
    weights that do not fit the config refused in one line naming the step directory."""
    from megabranch.config import load_config
    from megabranch.model import build_model
    from megabranch.residual import current_alpha

    cfg = load_config(
        None,
        [
            "model.residual=branchnorm",
            "model.d_model=16",
            "model.n_heads=2",
            "model.ffn_dim=32",
            "model.encoder_layers=2",
            "model.decoder_layers=2",
            "model.alpha_warmup_steps=10",
            "model.fused_kernels=true",
        ],
    )
    model = build_model(cfg.model, 50, seed=3)
    meta = {
        "layout": checkpoint.single_layout(),
        "config": cfg.to_dict(),
        "vocab_size": 50,
        "tgt_vocab_size": 50,
        "vocab_sha256": "abc",
    }
    checkpoint.save_step(str(tmp_path / "ck"), 5, checkpoint.single_process_files(model.state_dict(), 5), meta)
    loaded = checkpoint.load_model(str(tmp_path / "ck"), fused_kernels=False)
    assert (loaded.step, loaded.vocab_sha256, os.path.basename(loaded.step_dir)) == (5, "abc", "step_5")
    assert current_alpha(loaded.model) == pytest.approx(0.5) and not loaded.model.training
    assert loaded.config.model.residual == "branchnorm" and loaded.config.model.fused_kernels is False
    assert loaded.model.cfg.fused_kernels is False
    assert checkpoint.load_model(str(tmp_path / "ck")).config.model.fused_kernels is True
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    cfg.model.d_model = 32
    checkpoint.save_step(
        str(tmp_path / "bad"),
        1,
        checkpoint.single_process_files(model.state_dict(), 1),
        {**meta, "config": cfg.to_dict()},
    )
    with pytest.raises(UserError, match="step_1 does not match its model config"):
        checkpoint.load_model(str(tmp_path / "bad"))


@pytest.mark.distributed
def test_layout_round_trip_identical_outputs_and_training(tmp_path):
    run_workers(_round_trip_body, 4, str(tmp_path))


# --- slice reads: what a rank reads ------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_rank_reads_only_its_own_slices(tmp_path, monkeypatch):
    """Every rank of a new layout (meta-device parameters: what that rank would hold) gets exactly the slices of
    the full tensors and Adam moments that cut() gives, and reads no more data than it owns, give or take one
    block per tensor. Reading every shard (the full merge) would be several times over the bound."""
    from megabranch.checkpoint import shard_format
    from megabranch.config import Config
    from megabranch.convert import rank_params, write_layout

    monkeypatch.setattr(shard_format, "BLOCK_BYTES", 128)  # one row per block at d=32: a tiny model shows it
    src = os.path.join(tiny_single(tmp_path, steps=(2,)), "step_2")
    full, opt = checkpoint.consolidate(src)  # the reference: whole tensors
    meta = checkpoint.read_meta(src)
    d22 = write_layout(
        str(tmp_path / "tp2pp2"), Config.from_dict(meta["config"]), meta, full, opt, 2, 2, 1, "E0-1|D0-1"
    )
    cfg = ckpt_cfg()
    for source, (tp, pp, layout) in [(src, (2, 2, "E0-1|D0-1")), (d22, (1, 4, "E0|E1|D0|D1")), (d22, (4, 1, ""))]:
        lay, ranks, _ = rank_params(cfg, VOCAB, VOCAB, tp, pp, 1, layout)
        meta = checkpoint.read_meta(source)
        everything = sum(os.path.getsize(os.path.join(source, f)) for f in meta["files"] if f.endswith(".safetensors"))
        for (t, p), params in ranks.items():
            position = dict(tp=tp, pp=pp, vpp=1, dp=1, layout=str(lay), zero=False, tp_rank=t, pp_rank=p, dp_rank=0)
            reader = checkpoint.StepReader(source, meta)
            state = checkpoint.load_for_rank(source, meta, position, params, reader)
            assert state["resharded"] and state["step"] == 2
            want, want_opt = checkpoint.cut(full, params), checkpoint.cut_optimizer(opt, params)
            for n in params:
                assert torch.equal(state["model"][n], want[n]), (tp, pp, t, p, n)
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(state["optimizer"][k][n], want_opt[k][n]), (tp, pp, t, p, k, n)
            own = sum(3 * 4 * q.numel() + 4 for q in params.values())  # fp32 parameter, two moments, Adam's step
            bound = own + 3 * 128 * len(params)  # at most one partly used block per tensor read
            data = reader.bytes_read - reader.metadata_bytes
            assert data <= bound, (tp, pp, t, p, data, own)
            assert everything > 2 * bound, (tp, pp, everything, bound)  # so the full merge would fail the bound


@pytest.mark.unit
def test_tensors_are_stored_with_the_dim_tensor_parallelism_splits_leading():
    """natural_split_dims (what the writer stores leading, also at tp = 1) is the dim apply_tensor_parallel
    really splits each parameter along."""
    from megabranch.convert import rank_params

    cfg = ckpt_cfg()
    _, tp1, leads = rank_params(cfg, VOCAB, VOCAB, 1, 1, 1)
    _, tp2, _ = rank_params(cfg, VOCAB, VOCAB, 2, 1, 1)
    split = {n: getattr(p, "tp_split_dim", None) for n, p in tp2[(0, 0)].items()}
    assert set(split) == set(tp1[(0, 0)])
    assert {n: d for n, d in split.items() if d is not None} == {
        n: leads[(0, 0)][n] for n, d in split.items() if d is not None
    }
    assert leads[(0, 0)]["encoder.layers.0.ffn.block.fc2.weight"] == 1  # row-parallel: input columns
    assert sum(d is not None for d in split.values()) > len(split) // 3


@pytest.mark.unit
def test_a_zero_rank_reads_only_the_parameters_its_flat_slice_overlaps(tmp_path):
    """A ZeRO-1 rank resuming from per-parameter Adam state reads the moments of only the parameters its flat
    slice overlaps, and its optimizer takes exactly its flat slice of them."""
    from megabranch.parallel.zero import ShardedAdamW

    src = os.path.join(tiny_single(tmp_path, steps=(2,)), "step_2")
    _, opt = checkpoint.consolidate(src)
    tr = single_trainer(ckpt_cfg(), seed=9)
    params = tr.named_params()
    zero = ShardedAdamW(list(params.values()), lr=1.0)
    position = dict(tr.position(), zero=True, dp=3, dp_rank=1)  # as if the middle of three replicas
    state = checkpoint.load_for_rank(src, checkpoint.read_meta(src), position, params)
    names = list(params)
    flat = torch.cat([opt["exp_avg"][n].reshape(-1) for n in names])
    numel = flat.numel()
    lo, hi = -(-numel // 3), min(2 * -(-numel // 3), numel)
    read = set(state["optimizer"]["exp_avg"])
    offsets = [0]
    for n in names:
        offsets.append(offsets[-1] + params[n].numel())
    assert read == {n for n, a, b in zip(names, offsets, offsets[1:]) if a < hi and b > lo} and len(read) < len(names)
    for n in read:
        assert torch.equal(state["optimizer"]["exp_avg_sq"][n], opt["exp_avg_sq"][n]), n
    # one replica (its slice is everything): the optimizer holds exactly the flat moments
    state = checkpoint.load_for_rank(src, checkpoint.read_meta(src), dict(tr.position(), zero=True), params)
    assert checkpoint.load_optimizer(zero, names, state)
    assert torch.equal(zero.exp_avg, flat) and zero.step_count == 2
    assert torch.equal(zero.exp_avg_sq, torch.cat([opt["exp_avg_sq"][n].reshape(-1) for n in names]))


# --- single-process: publication, pruning, refusal -----------------------------------------------------------


@pytest.mark.unit
def test_publication_pointers_and_keep_last(tmp_path):
    save_dir = tiny_single(tmp_path, steps=(2, 4, 6), keep_last=2)
    assert sorted(os.listdir(save_dir)) == ["latest", "step_4", "step_6"]
    assert open(os.path.join(save_dir, "latest")).read().strip() == "step_6"
    meta = checkpoint.verify(os.path.join(save_dir, "step_6"))
    assert meta["step"] == 6 and meta["layout"]["layout"] == "single"
    assert sorted(meta["files"]) == ["shard_tp0_pp0.json", "shard_tp0_pp0.safetensors"]
    assert meta["versions"]["torch"] == torch.__version__
    # best is never pruned, whatever its age
    with open(os.path.join(save_dir, "best"), "w") as fh:
        fh.write("step_4\n")
    os.makedirs(os.path.join(save_dir, "step_8"))
    shutil.copy(os.path.join(save_dir, "step_6", "meta.json"), os.path.join(save_dir, "step_8"))
    checkpoint.prune(save_dir, 1)
    assert sorted(d for d in os.listdir(save_dir) if d.startswith("step_")) == ["step_4", "step_6", "step_8"]
    # a stale temporary directory (a killed save) is cleaned by the next save and never resolved
    os.makedirs(os.path.join(save_dir, "step_10.tmp-123"))
    assert checkpoint.resolve(save_dir) == os.path.join(save_dir, "step_6")
    assert checkpoint.resolve(save_dir, prefer="best") == os.path.join(save_dir, "step_4")


@pytest.mark.unit
def test_corrupt_shard_and_code_carrying_pickle_are_refused(tmp_path):
    save_dir = tiny_single(tmp_path, steps=(2,))
    step_dir = os.path.join(save_dir, "step_2")
    data, index = (os.path.join(step_dir, "shard_tp0_pp0" + e) for e in (".safetensors", ".json"))
    good = open(data, "rb").read()

    with open(data, "wb") as fh:  # truncated (a reader checks what it reads: cut into the parameters)
        fh.write(good[: len(good) // 8])
    with pytest.raises(UserError, match="shard_tp0_pp0.safetensors is (corrupt|truncated)") as e:
        checkpoint.load_checkpoint(save_dir)
    assert "\n" not in str(e.value)
    flipped = bytearray(good)
    where = json.load(open(index))["tensors"]["model/encoder.layers.0.ffn.block.fc1.weight"]["bytes"][0]
    flipped[where + 5] ^= 1  # one bit of a parameter: its block's sha256 no longer matches
    open(data, "wb").write(bytes(flipped))
    with pytest.raises(UserError, match="shard_tp0_pp0.safetensors is corrupt: block"):
        checkpoint.load_checkpoint(save_dir)
    with pytest.raises(UserError, match="shard_tp0_pp0.safetensors is corrupt"):
        checkpoint.verify(step_dir)
    open(data, "wb").write(good)
    text = open(index).read()
    open(index, "w").write(text.replace('"step": 2', '"step": 3'))  # the index: checked against meta.json
    with pytest.raises(UserError, match="shard_tp0_pp0.json is corrupt"):
        checkpoint.load_checkpoint(save_dir)
    open(index, "w").write(text)
    assert checkpoint.verify(step_dir)["step"] == 2

    # format 2 (.pt): a pickle that runs code on load, with meta.json's checksum updated to match: weights_only
    # refuses it
    old = str(tmp_path / "old")
    shutil.copytree(os.path.join(OLD_FIXTURE, "single", "step_4"), old)
    shard = os.path.join(old, "shard_tp0_pp0.pt")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil()}, shard)
    meta_path = os.path.join(old, "meta.json")
    meta = json.load(open(meta_path))
    meta["files"]["shard_tp0_pp0.pt"] = checkpoint.sha256_file(shard)
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match="code could run on loading") as e:
        checkpoint.load_checkpoint(old)
    assert "shard_tp0_pp0.pt" in str(e.value) and "\n" not in str(e.value)
    assert "weights_only" not in str(e.value)  # torch's own text advises weights_only=False: never pass that on
    assert not marker.exists()

    os.remove(data)
    with pytest.raises(UserError, match="shard missing"):
        checkpoint.load_checkpoint(step_dir)
    os.remove(os.path.join(step_dir, "meta.json"))
    with pytest.raises(UserError, match="meta.json missing"):
        checkpoint.read_meta(step_dir)
    with open(os.path.join(save_dir, "latest"), "w") as fh:
        fh.write("step_2\n")
    with pytest.raises(UserError, match="missing or incomplete"):
        checkpoint.resolve(save_dir)


@pytest.mark.unit
def test_saving_a_step_again_replaces_it_without_a_dangling_pointer(tmp_path):
    save_dir = str(tmp_path / "run")
    meta = {"layout": checkpoint.single_layout(), "config": {}, "vocab_size": VOCAB}
    checkpoint.save_step(save_dir, 6, {"shard_tp0_pp0": {"x": torch.zeros(2)}}, meta, is_best=True)
    # a run resumed from an older step reaches step 6 again: same name, new content
    checkpoint.save_step(save_dir, 6, {"shard_tp0_pp0": {"x": torch.ones(2)}}, meta, is_best=False)
    assert sorted(os.listdir(save_dir)) == ["best", "latest", "step_6"]
    for prefer in ("latest", "best"):
        step_dir = checkpoint.resolve(save_dir, prefer)
        assert torch.equal(checkpoint.load_shard(step_dir, "shard_tp0_pp0")["x"], torch.ones(2))


def _scaler(scale: float, growth_tracker: int) -> DynamicLossScaler:
    scaler = DynamicLossScaler(init_scale=scale)
    scaler.growth_tracker = growth_tracker
    return scaler


@pytest.mark.unit
def test_fp16_loss_scaler_state_survives_save_and_resume(tmp_path):
    """fp16 needs CUDA, so the fp32 trainers get a loss scaler put in: only its state travels."""
    cfg = ckpt_cfg()
    tr = single_trainer(cfg, seed=1)
    tr.precision.scaler = _scaler(1024.0, 7)
    step_dir = save_trainer(tr, cfg, str(tmp_path / "run"))
    fresh = single_trainer(cfg, seed=2)
    fresh.precision.scaler = _scaler(65536.0, 0)
    meta = checkpoint.read_meta(step_dir)
    fresh.load_checkpoint_state(checkpoint.load_for_rank(step_dir, meta, fresh.position(), fresh.named_params()))
    assert (fresh.precision.scaler.scale, fresh.precision.scaler.growth_tracker) == (1024.0, 7)
