"""The DeepSpeed pipeline backend (2 stages, gloo, CPU) against the native pipeline engine (pp=2) and the
single-process Trainer: 10 steps of per-step losses (relative 1e-5, float32, dropout off, AdamW with the same
inverse-sqrt schedule, weight decay and clipping), the BranchNorm alpha of every step, and the parameters after the
last step. Plus the checkpoint round trip: export_deepspeed -> import_deepspeed is the identity, and a DeepSpeed
engine loading the exported folder (load_module_only) reproduces the single-process loss.

Skips only when `import deepspeed` fails (requirements-dev.txt pins it; `make test` installs it). Nothing is
JIT-built: megabranch's init_distributed skips DeepSpeed's CPU shared-memory all-reduce (deepspeed_shm_comm, a
CPU minute of C++), which only DeepSpeed's inference calls, and the optimizer is torch's AdamW."""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch

from tests.helpers.env import ROOT, subprocess_env

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
try:
    import deepspeed
except Exception as e:  # any import failure means: no DeepSpeed here
    pytest.skip(
        f"deepspeed is not importable ({type(e).__name__}: {e}); pip install -r requirements-dev.txt",
        allow_module_level=True,
    )

from tests.helpers.configs import VOCAB, make_cfg, tiny_model_cfg, tiny_pp2_yaml  # noqa: E402
from tests.helpers.dist import free_port, run_workers  # noqa: E402
from tests.helpers.logs import read_log  # noqa: E402
from tests.helpers.reference import reference_run, synthetic_batches  # noqa: E402

STEPS = 10


def _ds_trainer(cfg, **kw):
    from megabranch.backends.deepspeed import DeepSpeedTrainer, init_distributed

    init_distributed(cfg.parallel.timeout_s)
    return DeepSpeedTrainer(cfg, VOCAB, **kw)


def _group_timeouts() -> dict:
    c10d = torch.distributed.distributed_c10d
    return {pg: pg._get_backend(torch.device("cpu")).options._timeout for pg in c10d._world.pg_map}


def _equivalence_body(rank, world, ref_losses, tmp, exported_loss):
    from megabranch.backends.deepspeed import canonical_state
    from megabranch.model import canonical_parameters
    from megabranch.residual import alpha_at
    from megabranch.training.engine import Trainer

    cfg = make_cfg(2, 2, m=2, pp=2, layout="E0-1|D0-1")
    native = Trainer(cfg, VOCAB)
    nat = [native.train_step(synthetic_batches(s, 2)) for s in range(STEPS)]
    before = _group_timeouts()
    cfg.parallel.timeout_s = 77.0
    ds = _ds_trainer(cfg)
    # init_distributed left DeepSpeed's CPU shared-memory all-reduce unbuilt (training never calls it)
    assert deepspeed.comm.comm.cdb.shm_comm_op is None
    # every group DeepSpeed made (it passes new_group no timeout) waits parallel.timeout_s, not torch's 30 minutes
    made = {pg: t for pg, t in _group_timeouts().items() if pg not in before}
    assert made and set(made.values()) == {datetime.timedelta(seconds=77)}, made
    # the same stage split as the native engine: E0-1 | D0-1 (embeddings and output ride along)
    assert ds.parts == [0, 3, 7], ds.parts
    # the run loop's stop decision: a reason on one rank reaches every rank (the largest wins)
    assert [ds.max_over_ranks(3 if rank == 1 else 0), ds.max_over_ranks(0)] == [3, 0]
    got = [ds.train_step(synthetic_batches(s, 2)) for s in range(STEPS)]
    assert ds.step == STEPS
    for s, (a, b, ref) in enumerate(zip(got, nat, ref_losses)):
        want_alpha = alpha_at(s, 10, "linear")  # alpha_t = t / T, T = 10: a new value every step
        assert a["alpha"] == b["alpha"] and abs(a["alpha"] - want_alpha) < 1e-7, (s, a["alpha"], b["alpha"])
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (
            f"step {s}: deepspeed {a['loss']} native {b['loss']}"
        )
        assert abs(a["loss"] - ref) <= 1e-5 * abs(ref), f"step {s}: deepspeed {a['loss']} single-process {ref}"
        assert abs(a["nll_loss"] - b["nll_loss"]) <= 1e-5 * abs(b["nll_loss"])
        assert a["lr"] == b["lr"]
        assert abs(a["gnorm"] - b["gnorm"]) <= 1e-5 * b["gnorm"], (
            f"step {s}: deepspeed gnorm {a['gnorm']} native {b['gnorm']}"
        )
    # the alpha buffers every layer of this stage holds now: the last step's
    for m in ds.module.modules():
        if hasattr(m, "coeffs"):
            assert float(m.coeffs.branch_scale) == nat[-1]["alpha"]
    assert got[-1]["loss"] < got[0]["loss"]
    # parameters after the last step (relative L2; key biases have a zero gradient and only rounding noise)
    mine = canonical_state(ds.module)
    theirs = {k: v.detach() for k, v in canonical_parameters(native.model, cfg.model).items()}
    assert set(mine) == set(theirs), sorted(set(mine) ^ set(theirs))
    diff2 = norm2 = 0.0
    for k, v in theirs.items():
        if not k.endswith("k_proj.bias"):
            diff2 += float((mine[k] - v).double().square().sum())
            norm2 += float(v.double().square().sum())
    assert math.sqrt(diff2 / norm2) < 1e-5, math.sqrt(diff2 / norm2)
    # clipping was active (otherwise the comparison would not cover DeepSpeed's clipping over the stages)
    assert max(b["gnorm"] for b in nat) > cfg.optim.clip_norm

    # DeepSpeed's own checkpoint: import_deepspeed reads it back as this stage's weights, by canonical name
    import torch.distributed as dist

    from megabranch.backends.deepspeed import import_deepspeed

    ds.engine.save_checkpoint(os.path.join(tmp, "ds_real"), tag="step10")
    dist.barrier()
    real = sorted(f for f in os.listdir(os.path.join(tmp, "ds_real", "step10")) if f.startswith("layer_"))
    exported = sorted(f for f in os.listdir(os.path.join(tmp, "exported", "megabranch")) if f.startswith("layer_"))
    assert real == exported == [f"layer_{i:02d}-model_states.pt" for i in range(7)], (real, exported)
    full = import_deepspeed(os.path.join(tmp, "ds_real"), cfg)
    for k, v in mine.items():
        assert torch.equal(full[k], v), k
    # a folder exported from a single-process state dict loads into the running engine (module only) and gives
    # the single-process loss of the exported weights
    path, _ = ds.engine.load_checkpoint(os.path.join(tmp, "exported"), load_module_only=True)
    assert path is not None
    loaded = canonical_state(ds.module)
    ref_state = torch.load(os.path.join(tmp, "exported_state.pt"))
    for k, v in loaded.items():
        assert torch.equal(v, ref_state[k]), k
    got = ds.valid_loss(synthetic_batches(99, 2))["loss"]
    assert abs(got - exported_loss) <= 1e-5 * abs(exported_loss), (got, exported_loss)

    # other stage boundaries: after D0 (memory and y cross), DeepSpeed's own partition by parameters; and
    # DeepSpeed's activation checkpointing of every layer
    from megabranch.backends.deepspeed import load_ds_config

    for layout, partition, parts, recompute in (
        ("E0-1,D0|D1", None, [0, 5, 7], 0),
        ("", "parameters", None, 0),
        ("E0-1|D0-1", None, [0, 3, 7], 1),
    ):
        other = make_cfg(2, 2, m=2, pp=2, layout=layout or "E0-1|D0-1")
        ds_config = load_ds_config(None, other)
        ds_config["pipeline"]["activation_checkpoint_interval"] = recompute
        tr = _ds_trainer(other, partition=partition, ds_config=ds_config)
        assert parts is None or tr.parts == parts, tr.parts
        for s in range(3):
            loss = tr.train_step(synthetic_batches(s, 2))["loss"]
            assert abs(loss - ref_losses[s]) <= 1e-5 * abs(ref_losses[s]), (layout, partition, tr.parts, s, loss)


def _single_process_loss(model, batches, step: int) -> float:
    from megabranch.model import label_smoothed_nll_loss
    from megabranch.residual import set_step

    set_step(model, step)
    model.eval()
    with torch.no_grad():
        total = sum(
            float(label_smoothed_nll_loss(model(b["src_tokens"], b["prev_output_tokens"]), b["target"], 0.1)[0])
            for b in batches
        )
    return total / sum(b["ntokens"] for b in batches)


# not marked slow: 5-8 s once DeepSpeed's CPU communication op is built (about 30 s, the first run only)
@pytest.mark.distributed
def test_deepspeed_pipeline_matches_native_engine_and_single_process(tmp_path):
    """One pair of processes for everything that needs DeepSpeed running (its start-up is the cost)."""
    from megabranch.backends.deepspeed import export_deepspeed
    from megabranch.model import build_model

    cfg = make_cfg(2, 2, m=2, pp=2, layout="E0-1|D0-1")
    ref_losses, _ = reference_run(cfg, STEPS)
    other = build_model(cfg.model, VOCAB, seed=4321)  # weights the engine has never seen
    torch.save(other.state_dict(), tmp_path / "exported_state.pt")
    export_deepspeed(other.state_dict(), cfg, str(tmp_path / "exported"))
    loss = _single_process_loss(other, synthetic_batches(99, 2), STEPS)  # the engine is at step 10: alpha = 1
    run_workers(_equivalence_body, 2, ref_losses, str(tmp_path), loss)


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["shared", "tgt-shared", "untied-pre_ln"])
def test_export_import_round_trip(tmp_path, variant):
    """export -> import gives back build_model's state dict exactly (every key, in order), for each tying."""
    from megabranch.backends.deepspeed import export_deepspeed, import_deepspeed, layer_plan
    from megabranch.model import build_model

    kw = {
        "shared": {},
        "tgt-shared": dict(share_all_embeddings=False),
        "untied-pre_ln": dict(share_all_embeddings=False, share_decoder_input_output_embed=False, residual="pre_ln"),
    }
    mc = tiny_model_cfg(encoder_layers=3, decoder_layers=2, d_model=16, n_heads=2, ffn_dim=32, **kw[variant])
    vocab, tgt_vocab = 30, (30 if variant == "shared" else 24)
    sd = build_model(mc, vocab, tgt_vocab, seed=5).state_dict()
    files = export_deepspeed(sd, mc, str(tmp_path))
    n_layers = len(layer_plan(mc))
    assert n_layers == 3 + 2 + 3
    names = sorted(os.listdir(tmp_path / "megabranch"))
    assert names == sorted([f"layer_{i:02d}-model_states.pt" for i in range(n_layers)] + ["mp_rank_00_model_states.pt"])
    assert (tmp_path / "latest").read_text() == "megabranch" and len(files) == n_layers + 2
    back = import_deepspeed(str(tmp_path), mc)
    assert list(back) == list(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    if variant == "untied-pre_ln":  # the final norms ride in the last layer of each stack
        last_enc = torch.load(tmp_path / "megabranch" / "layer_03-model_states.pt")
        assert torch.equal(last_enc["encoder.final_norm.weight"], sd["encoder.final_norm.weight"])
        last_dec = torch.load(tmp_path / "megabranch" / "layer_06-model_states.pt")  # D1, before the output
        assert torch.equal(last_dec["decoder.final_norm.weight"], sd["decoder.final_norm.weight"])


@pytest.mark.unit
def test_import_refuses_a_mismatched_config(tmp_path):
    from megabranch.backends.deepspeed import export_deepspeed, import_deepspeed
    from megabranch.errors import UserError
    from megabranch.model import build_model

    mc = tiny_model_cfg(d_model=16, n_heads=2, ffn_dim=32)
    export_deepspeed(build_model(mc, 30, seed=1).state_dict(), mc, str(tmp_path))
    with pytest.raises(UserError, match="does not match|not found"):
        import_deepspeed(str(tmp_path), tiny_model_cfg(d_model=16, n_heads=2, ffn_dim=32, encoder_layers=3))
    with pytest.raises(UserError, match="does not match"):
        import_deepspeed(str(tmp_path), tiny_model_cfg(d_model=16, n_heads=2, ffn_dim=32, residual="pre_ln"))


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_launcher_script_trains_with_the_deepspeed_backend(tiny_corpus, tmp_path):
    """launch/deepspeed_launcher.sh for real: the deepspeed launcher, 2 CPU processes, megabranch-train --backend
    deepspeed for 4 steps; its DeepSpeed checkpoint reads back through import_deepspeed, and a second launch with
    --resume global_step2 repeats steps 3 and 4 with the same losses (weights, Adam state, step and data order
    from the checkpoint)."""
    import subprocess

    from megabranch.backends.deepspeed import import_deepspeed
    from megabranch.config import load_config

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(tiny_pp2_yaml(tiny_corpus, tmp_path / "run", max_updates=4, update_freq=4, warmup_updates=2))
    env = subprocess_env(
        NUM_GPUS=2, DS_CONFIG=os.path.join(ROOT, "launch", "configs", "ds_fp32.json"), MASTER_PORT=free_port()
    )

    def launch(*extra):
        r = subprocess.run(
            ["bash", os.path.join(ROOT, "launch", "deepspeed_launcher.sh"), "--config", str(cfg_path), *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    r = launch()
    assert "deepspeed layer parts: [0, 3, 7]" in r.stdout
    records = read_log(tmp_path / "run" / "log.jsonl")
    train = [x for x in records if x["tag"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3, 4] and [x["alpha"] for x in train] == [0.0, 0.25, 0.5, 0.75]
    assert all(0 < x["gnorm"] <= x["gnorm_max"] and math.isfinite(x["gnorm"]) for x in train)  # fp32 too
    valid = [x for x in records if x["tag"] == "valid"]
    assert [x["step"] for x in valid] == [2, 4] and all(0 < x["loss"] < 10 for x in valid)
    state = import_deepspeed(str(tmp_path / "run"), load_config(str(cfg_path)))
    assert state["encoder.embed.table.weight"].shape == (40, 16)

    launch("--resume", "global_step2")
    resumed = read_log(tmp_path / "run" / "log.jsonl")[len(records) :]
    again = [x for x in resumed if x["tag"] == "train"]
    assert [x["step"] for x in again] == [3, 4]
    for a, b in zip(again, train[2:]):
        assert (a["loss"], a["alpha"], a["lr"]) == (b["loss"], b["alpha"], b["lr"]), (a, b)


# --- the other residual schemes on the DeepSpeed pipeline ----------------------------------------------------------

SCHEMES = ("ds_init", "rezero", "r_fixup", "t_fixup", "normformer", "subln")  # dlcl and admin are refused, in one line


def _scheme_cfg(residual: str, **parallel):
    return make_cfg(2, 2, m=2, residual=residual, **parallel)


def _schemes_body(rank, world, refs):
    for residual in SCHEMES:
        tr = _ds_trainer(_scheme_cfg(residual, pp=2, layout="E0-1,D0|D1"))
        for s in range(20):
            loss, ref = tr.train_step(synthetic_batches(s, 2))["loss"], refs[residual][s]
            assert abs(loss - ref) <= 1e-5 * abs(ref), f"{residual}: step {s} deepspeed {loss} single-process {ref}"


@pytest.mark.distributed
@pytest.mark.slow
def test_the_other_schemes_on_the_deepspeed_pipeline_match_single_process():
    """Every scheme DeepSpeed's layer list can run, 2 stages cut after D0 (memory and the decoder hidden cross),
    20 steps each against the single-process Trainer."""
    run_workers(_schemes_body, 2, {r: reference_run(_scheme_cfg(r), 20)[0] for r in SCHEMES})


# --- three dimensions: tp x pp x dp ---------------------------------------------------------------------------------

STEPS_3D = 20
BF16_STEPS = 5


def _three_d_cfg():
    return make_cfg(2, 2, m=2, tp=2, pp=2, layout="E0-1|D0-1")


def _shards_match(tr, full: dict, what: str) -> None:
    """This rank's parameters (tensor-parallel shards, single-process names) equal the slices of `full`."""
    from megabranch.backends.deepspeed import local_layers
    from megabranch.model import canonical_parameters
    from megabranch.parallel.parallelize import shard_of

    params = canonical_parameters([f for _, f in local_layers(tr.module)], tr.cfg.model)
    assert params
    for name, p in params.items():
        assert torch.equal(p.detach(), shard_of(full[name], p)), f"{what}: {name}"


def _three_d_body(rank, world, ref, tmp, exported_loss, bf16_ref):
    import torch.distributed as dist

    from megabranch.backends.deepspeed import import_deepspeed
    from megabranch.backends.deepspeed.layers import check_layout
    from megabranch.errors import UserError
    from tests.helpers.reference import assert_matches

    cfg = _three_d_cfg()
    tr = _ds_trainer(cfg)
    g, ds_grid = tr.grid, tr.engine.grid
    # DeepSpeed's topology and megabranch's grid number the ranks the same way
    assert (tr.dp, g.dp) == (2, 2)
    assert (ds_grid.get_slice_parallel_rank(), ds_grid.get_data_parallel_rank(), ds_grid.get_stage_id()) == (
        g.tp_rank,
        g.dp_rank,
        g.pp_rank,
    ), (rank, g)
    assert tr.module.loss_fn.tp_group is g.tp_group is not None
    losses, gnorms = [], []
    for s in range(STEPS_3D):
        st = tr.train_step(synthetic_batches(s, 2 * tr.dp)[tr.dp_rank :: tr.dp])
        losses.append(st["loss"])
        gnorms.append(st["gnorm"])
    ref_losses, ref_params, ref_gnorms = ref
    # the gradient norm counts every element once (tp shards, replicated tensors, the tied table over pp) and
    # clipping was on in the comparison
    for s, (a, b) in enumerate(zip(gnorms, ref_gnorms)):
        assert abs(a - b) <= 1e-5 * b, f"step {s}: deepspeed tp2 x pp2 x dp2 gnorm {a} single-process {b}"
    assert max(ref_gnorms) > cfg.optim.clip_norm
    from types import SimpleNamespace

    from megabranch.backends.deepspeed import local_layers

    shards = SimpleNamespace(cfg=cfg, model=[f for _, f in local_layers(tr.module)])  # what assert_matches reads
    assert_matches(shards, losses, (ref_losses, ref_params), "deepspeed tp2 x pp2 x dp2")

    # DeepSpeed's own checkpoint (a file per layer index and tensor-parallel rank) imports as the whole model
    tr.engine.save_checkpoint(os.path.join(tmp, "ds3d"), tag="s3")
    dist.barrier()
    files = sorted(f for f in os.listdir(os.path.join(tmp, "ds3d", "s3")) if f.startswith("layer_"))
    assert files == [f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in range(7) for r in range(2)], files
    _shards_match(tr, import_deepspeed(os.path.join(tmp, "ds3d"), cfg), "saved by DeepSpeed, imported")
    # a single-process state dict exported for tp 2 loads into the running engine, and gives its loss
    path, _ = tr.engine.load_checkpoint(os.path.join(tmp, "exported3d"), load_module_only=True)
    assert path is not None
    _shards_match(tr, torch.load(os.path.join(tmp, "exported3d_state.pt")), "exported for tp 2, loaded")
    got = tr.valid_loss(synthetic_batches(99, 2))["loss"]
    assert abs(got - exported_loss) <= 1e-5 * abs(exported_loss), (got, exported_loss)
    with pytest.raises(UserError, match="world size 6 is not a multiple of parallel.tp . parallel.pp = 2 . 2 = 4"):
        check_layout(cfg, 6)
    # then a fresh engine under launch/configs/ds_bf16.json, in the same 8 processes (a launch of its own was
    # about 20 CPU-s of start-up on 2 cores)
    _three_d_bf16_body(rank, world, bf16_ref)


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_tensor_x_pipeline_x_data_parallel_in_fp32_and_bf16_matches_single_process(tmp_path):
    """tp 2 x pp 2 x dp 2 (8 processes), 20 steps: DeepSpeed's PipelineModule of tensor-parallel units over a
    three-dimensional topology, against the single-process Trainer (losses, gradient norms, parameters); its
    checkpoints convert both ways (import_deepspeed of its own save, export_deepspeed(tp=2) loaded by it). Then
    launch/configs/ds_bf16.json over the same topology: losses and gradient norms within bf16's tolerance of the
    fp32 single process over 5 steps."""
    from megabranch.backends.deepspeed import export_deepspeed
    from megabranch.model import build_model, draw_init_seed
    from tests.helpers.reference import single_trainer

    cfg = _three_d_cfg()
    single = single_trainer(cfg, seed=draw_init_seed(cfg.seed))
    stats = [single.train_step(synthetic_batches(s, 4)) for s in range(STEPS_3D)]
    ref = (
        [s["loss"] for s in stats],
        {k: v.detach().clone() for k, v in single.named_params().items()},
        [s["gnorm"] for s in stats],
    )
    other = build_model(cfg.model, VOCAB, seed=4321)
    torch.save(other.state_dict(), tmp_path / "exported3d_state.pt")
    export_deepspeed(other.state_dict(), cfg, str(tmp_path / "exported3d"), tp=2)
    loss = _single_process_loss(other, synthetic_batches(99, 2), STEPS_3D)
    bf16_ref = [(s["loss"], s["gnorm"]) for s in stats[:BF16_STEPS]]
    run_workers(_three_d_body, 8, ref, str(tmp_path), loss, bf16_ref)


@pytest.mark.unit
def test_export_for_tensor_parallelism_round_trips(tmp_path):
    """export_deepspeed(tp=2) writes each layer index's two shards (the heads, FFN columns and vocabulary rows of
    one rank each; a replicated norm in both); import_deepspeed joins them back into the same state dict."""
    from megabranch.backends.deepspeed import export_deepspeed, import_deepspeed, layer_plan
    from megabranch.model import build_model

    mc = tiny_model_cfg(encoder_layers=2, decoder_layers=1, share_all_embeddings=False, residual="pre_ln")
    sd = build_model(mc, 40, 32, seed=5).state_dict()
    export_deepspeed(sd, mc, str(tmp_path), tp=2)
    n = len(layer_plan(mc))
    names = sorted(os.listdir(tmp_path / "megabranch"))
    assert names == sorted(
        [f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in range(n) for r in range(2)]
        + ["mp_rank_00_model_states.pt"]
    )
    enc0 = [torch.load(tmp_path / "megabranch" / f"layer_01-model_{r:02d}-model_states.pt") for r in range(2)]
    q = "encoder.layers.0.self_attn.block.q_proj.weight"
    assert torch.equal(torch.cat([enc0[0][q], enc0[1][q]]), sd[q]) and enc0[0][q].shape[0] == mc.d_model // 2
    norm = "encoder.layers.0.ffn.norm.weight"
    assert torch.equal(enc0[0][norm], sd[norm]) and torch.equal(enc0[1][norm], sd[norm])
    back = import_deepspeed(str(tmp_path), mc)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # a replicated tensor that differs between the ranks' files is not silently taken from one of them
    enc0[1][norm] = enc0[1][norm] + 1
    torch.save(enc0[1], tmp_path / "megabranch" / "layer_01-model_01-model_states.pt")
    from megabranch.errors import UserError

    with pytest.raises(UserError, match="differs between the tensor-parallel files of layer 1"):
        import_deepspeed(str(tmp_path), mc)


def _three_d_bf16_body(rank, world, ref):
    from megabranch.backends.deepspeed.config import load_ds_config
    from tests.test_precision import BF16_VS_FP32

    cfg = _three_d_cfg()
    tr = _ds_trainer(cfg, ds_config=load_ds_config(os.path.join(ROOT, "launch", "configs", "ds_bf16.json"), cfg))
    for s, (ref_loss, ref_gnorm) in enumerate(ref):
        st = tr.train_step(synthetic_batches(s, 2 * tr.dp)[tr.dp_rank :: tr.dp])
        # DeepSpeed's BF16_Optimizer measures the norm: each tensor-parallel shard on every tp rank, a replicated
        # parameter on tp rank 0 only (the `model_parallel` marks)
        assert abs(st["gnorm"] - ref_gnorm) <= BF16_VS_FP32 * ref_gnorm, (s, st["gnorm"], ref_gnorm)
        assert abs(st["loss"] - ref_loss) <= BF16_VS_FP32 * ref_loss, (s, st["loss"], ref_loss)


@pytest.mark.unit
@pytest.mark.parametrize("tp", [1, 2])
def test_import_refuses_tied_copies_that_differ(tmp_path, tp):
    """share_all_embeddings: every layer index that uses the table holds a copy; copies that differ are one line
    naming the table and the layer index, never silently one of them."""
    from megabranch.backends.deepspeed import export_deepspeed, import_deepspeed, layer_plan
    from megabranch.errors import UserError
    from megabranch.model import build_model

    mc = tiny_model_cfg(encoder_layers=1, decoder_layers=1, share_all_embeddings=True)
    export_deepspeed(build_model(mc, 40, seed=5).state_dict(), mc, str(tmp_path), tp=tp)
    last = len(layer_plan(mc)) - 1  # the output projection's copy
    path = (
        tmp_path
        / "megabranch"
        / (f"layer_{last:02d}-model_00-model_states.pt" if tp > 1 else f"layer_{last:02d}-model_states.pt")
    )
    layer = torch.load(path)
    layer["encoder.embed.table.weight"] += 1
    torch.save(layer, path)
    with pytest.raises(
        UserError, match=f"the tied encoder.embed.table.weight differs between layer files .at layer {last}."
    ):
        import_deepspeed(str(tmp_path), mc)
