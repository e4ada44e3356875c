"""Data parallelism (GradReducer) and ZeRO-1 (ShardedAdamW) against single-process references."""

import copy

import pytest
import torch
import torch.distributed as dist

from megabranch.errors import UserError
from megabranch.model import build_model, label_smoothed_nll_loss
from megabranch.parallel.data_parallel import GradReducer
from megabranch.parallel.grid import build_grid
from megabranch.parallel.zero import ShardedAdamW
from tests.helpers.configs import VOCAB as PIPE_VOCAB
from tests.helpers.configs import make_cfg, tiny_model_cfg
from tests.helpers.dist import run_workers
from tests.helpers.reference import assert_matches, assert_rel, parallel_losses, reference_run
from tools.bench import grad_reducer

VOCAB = 24


def _cfg():
    return tiny_model_cfg(d_model=16, n_heads=2, ffn_dim=32, encoder_layers=1, decoder_layers=1, residual="pre_ln")


def _micro_batch(dp_rank, micro, step):
    g = torch.Generator().manual_seed(1000 * step + 10 * dp_rank + micro)
    src = torch.randint(4, VOCAB, (2, 5), generator=g)
    tgt = torch.randint(4, VOCAB, (2, 4), generator=g)
    tgt[0, 3:] = 0
    prev = torch.roll(tgt, 1, 1)
    prev[:, 0] = 2
    return src, prev, tgt


def _loss(model, batch):
    src, prev, tgt = batch
    return label_smoothed_nll_loss(model(src, prev), tgt, 0.1)[0]


def assert_grads_are_bucket_views(reducer, what):
    """Every reduced .grad lies in its bucket's buffer at its slot: the same storage and address."""
    assert reducer.buckets, what
    for b in reducer.buckets:
        base, size = b.buffer.untyped_storage().data_ptr(), b.buffer.element_size()
        for p, off in zip(b.params, b.offsets):
            assert p.grad is not None and p.grad.untyped_storage().data_ptr() == base, f"{what}: not in the bucket"
            assert p.grad.data_ptr() == b.buffer.data_ptr() + off * size, f"{what}: not at its slot"


def _check_reducer(group, dp, dp_rank):
    from megabranch.parallel.clip import clip_grad_norm_

    model = build_model(_cfg(), VOCAB, seed=3)
    ref = copy.deepcopy(model)
    # `extra` is used by even data-parallel ranks only: no gradient on the others, and no deadlock
    extra = torch.nn.Parameter(torch.ones(3))
    # `tied` gets two backward calls per micro-batch (a table used by two pipeline chunks): it accumulates twice
    # into its view; like the engine's shared_reducer it is reduced after the backward (overlap=False)
    tied = torch.nn.Parameter(torch.ones(2))
    for bucket_mb, overlap, micros in [(0.002, True, 1), (0.002, True, 2), (0.002, False, 2), (25.0, True, 2)]:
        for p in list(model.parameters()) + [extra, tied]:
            p.grad = None
        # `extra` first: buckets run in reverse order, so it lands in the last one and cannot hold the others back
        reducer = GradReducer([extra] + list(model.parameters()), group, bucket_mb=bucket_mb, overlap=overlap)
        shared = GradReducer([tied], group, overlap=False)
        if bucket_mb < 1:
            assert len(reducer.buckets) > 3
        # the buckets are the gradients: allocated once, .grad views of them before the first backward
        assert reducer.allocated_bytes() == 4 * (3 + sum(p.numel() for p in model.parameters()))
        where = {id(p): p.grad.data_ptr() for p in list(model.parameters()) + [extra, tied]}
        for step in range(2):  # twice, so a second step reuses the buckets after finish()
            reducer.zero_grad()
            shared.zero_grad()
            for p in ref.parameters():
                p.grad = None
            for m in range(micros):
                if m == micros - 1:
                    reducer.arm()
                loss = _loss(model, _micro_batch(dp_rank, m, step))
                if dp_rank % 2 == 0:
                    loss = loss + (extra * (dp_rank + 1)).sum()
                loss.backward()
                (tied * (m + 1)).sum().backward()
                (tied * (dp_rank + 1)).sum().backward()
                assert_grads_are_bucket_views(reducer, f"micro-batch {m}")  # accumulated in place
            launched = sum(b.launched for b in reducer.buckets)
            if overlap:  # every bucket without `extra` was launched during the backward
                assert launched >= len(reducer.buckets) - 1, (launched, len(reducer.buckets))
            else:
                assert launched == 0
            reducer.finish()
            shared.finish()
            tag = f"dp={dp} bucket={bucket_mb} overlap={overlap} micro={micros} step={step}"
            assert_grads_are_bucket_views(reducer, tag)
            assert_grads_are_bucket_views(shared, tag)
            assert all(p.grad.data_ptr() == where[id(p)] for p in list(model.parameters()) + [extra, tied]), tag
            # reference: one process, the SUM over every rank's micro-batches
            for r in range(dp):
                for m in range(micros):
                    _loss(ref, _micro_batch(r, m, step)).backward()
            ref_grads = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                assert_rel(p.grad, ref_grads[name].grad, f"{tag}: {name}")
            expect = micros * sum(r + 1 for r in range(0, dp, 2))
            assert torch.equal(extra.grad, torch.full((3,), float(expect)))
            expect = dp * micros * (micros + 1) / 2 + micros * dp * (dp + 1) / 2
            assert torch.equal(tied.grad, torch.full((2,), float(expect)))
        # clipping scales the views in place, so the buckets themselves
        before = [b.buffer.clone() for b in reducer.buckets]
        params = list(model.parameters()) + [extra]
        norm = clip_grad_norm_(params, 0.5)
        assert norm > 0.5
        for b, old in zip(reducer.buckets, before):
            torch.testing.assert_close(b.buffer, old * (0.5 / (norm + 1e-6)), rtol=1e-6, atol=0)
        assert_grads_are_bucket_views(reducer, "after clipping")
        # ZeRO-1 reads the views: exactly AdamW's step on the same gradients
        hp = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
        clones = [p.detach().clone().requires_grad_() for p in params]
        for c, p in zip(clones, params):
            c.grad = p.grad.clone()
        torch.optim.AdamW(clones, **hp).step()
        ShardedAdamW(params, group, **hp).step()
        for c, p, r in zip(clones, params, list(ref.parameters()) + [None]):
            torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-6, atol=1e-7, msg=f"ZeRO-1 on views {tag}")
            with torch.no_grad():  # back to the reference's weights for the next setting
                p.copy_(r if r is not None else torch.ones(3))
        reducer.zero_grad()
        assert all(b.buffer.abs().max() == 0 for b in reducer.buckets)
        assert_grads_are_bucket_views(reducer, "after zero_grad")
        reducer.remove_hooks()


def _zero_params(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    shapes = [(7, 5), (13,), (3, 3, 2), (1,)]  # 67 elements: no data-parallel size divides it
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _set_grads(params, step):
    g = torch.Generator().manual_seed(50 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _check_zero(group, tag):
    hp = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    params, ref_params = _zero_params(), _zero_params()
    opt, ref = ShardedAdamW(params, group, **hp), torch.optim.AdamW(ref_params, **hp)
    assert opt.exp_avg.numel() <= -(-67 // opt.dp_size)
    for step in range(6):
        if step == 3:  # the engine sets the learning rate like this every step
            opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 3e-3
        if step == 2:  # resume from this rank's shard into a fresh optimizer
            sd = opt.state_dict()
            opt = ShardedAdamW(params, group, **hp)
            opt.load_state_dict(sd)
        _set_grads(params, step)
        _set_grads(ref_params, step)
        opt.step()
        ref.step()
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7, msg=f"{tag} step {step}")
    return opt, params, ref_params, ref


def _check_zero_low_precision(group):
    hp = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    params = _zero_params(torch.bfloat16)
    ref_params = [p.detach().float().requires_grad_() for p in _zero_params(torch.bfloat16)]
    opt, ref = ShardedAdamW(params, group, **hp), torch.optim.AdamW(ref_params, **hp)
    assert opt.master is not None
    for step in range(4):
        _set_grads(params, step)
        for p, r in zip(params, ref_params):
            r.grad = p.grad.float()
        opt.step()
        ref.step()
        flat = torch.cat([r.detach().reshape(-1) for r in ref_params])
        torch.testing.assert_close(opt.master, flat[opt.start : opt.end], rtol=1e-6, atol=1e-7)
        for p, r in zip(params, ref_params):
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), r.detach().bfloat16())


def _dp_worker(rank, world):
    grid4, grid2 = build_grid(tp=1), build_grid(tp=2)  # dp=4; dp=2 (two groups of ranks {0,2} and {1,3})
    group3 = dist.new_group([0, 1, 2])  # collective: every rank creates it
    _check_reducer(grid4.dp_group, 4, grid4.dp_rank)
    _check_reducer(grid2.dp_group, 2, grid2.dp_rank)

    opt4, params, ref_params, ref = _check_zero(grid4.dp_group, "dp=4")
    opt2, *_ = _check_zero(grid2.dp_group, "dp=2")
    if rank < 3:
        _check_zero(group3, "dp=3")
    _check_zero(None, "dp=1")
    _check_zero_low_precision(grid4.dp_group)
    # a shard of one layout is refused by another; the gathered full state moves between sizes
    with pytest.raises(UserError, match="shard layout differs"):
        opt2.load_state_dict(opt4.state_dict())
    full = opt4.gather_full_state()
    moved = ShardedAdamW(params, grid2.dp_group, lr=1.0)
    moved.load_full_state(full)
    assert moved.param_groups[0]["lr"] == opt4.param_groups[0]["lr"]
    _set_grads(params, 9)
    _set_grads(ref_params, 9)
    moved.step()
    ref.step()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.distributed
def test_grad_reducer_and_sharded_adamw():
    run_workers(_dp_worker, 4)


@pytest.mark.unit
def test_single_process_fallbacks():
    """group=None: no buckets, no views; the reducer leaves autograd's gradients alone and zero_grad() drops them;
    ShardedAdamW is AdamW."""
    model = build_model(_cfg(), VOCAB, seed=3)
    reducer = GradReducer(model.parameters(), None)
    assert reducer.buckets == [] and reducer.allocated_bytes() == 0
    assert all(p.grad is None for p in model.parameters())
    reducer.arm()
    _loss(model, _micro_batch(0, 0, 0)).backward()
    before = [p.grad.clone() for p in model.parameters()]
    reducer.finish()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    reducer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# --- the engine: views through the pipeline executor, and the memory plan's gradient bytes ------------------


def _grad_bytes_held(tr) -> int:
    """Bytes of every distinct storage holding a gradient now: .grad storages and bucket buffers, each once."""
    storages = {}
    for p in tr.params:
        if p.grad is not None:
            s = p.grad.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    for reducer in tr.reducers + [tr.shared_reducer]:
        for b in reducer.buckets:
            s = b.buffer.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _trainer_with_grad_probe(cfg):
    """A Trainer whose optimizer records _grad_bytes_held when it steps (all gradients complete)."""
    from megabranch.training.engine import Trainer

    tr = Trainer(cfg, PIPE_VOCAB)
    held, step = [], tr.optimizer.step

    def probed_step(*args, **kw):
        held.append(_grad_bytes_held(tr))
        return step(*args, **kw)

    tr.optimizer.step = probed_step
    return tr, held


def _planned_grads(tr) -> float:
    """The memory plan's "grads" bytes for this rank's stage (tp = 1)."""
    from megabranch.planning.memory import plan

    cfg, g = tr.cfg, tr.grid
    _, rows, _ = plan(cfg, PIPE_VOCAB, 64, 8, 8, cfg.parallel.balance, g.dp, cfg.parallel.zero, cfg.optim.update_freq)
    return rows[g.pp_rank].grads


def _engine_views_worker(rank, world, ref):
    # dp 2 x pp 2, two chunks per rank: the shared table is used by both local chunks of rank 0 (two backward
    # calls per micro-batch into one view); several buckets per chunk, launched during the last backward
    cfg = make_cfg(4, 4, m=2, **VIEWS_DP2)
    tr, held = _trainer_with_grad_probe(cfg)
    assert tr.grid.dp == 2 and tr.grid.pp_rank == rank // 2
    assert sum(len(r.buckets) for r in tr.reducers) > 2
    where = {id(p): p.grad.data_ptr() for p in tr.params}  # views, before the first backward
    losses = parallel_losses(tr, VIEWS_STEPS)
    assert_matches(tr, losses, ref, "dp2-pp2-vpp2 with bucket views")
    # after every step's backward (torch.autograd.backward(outputs, grads) included), finish, clip, ZeRO-1 step
    # and zero_grad, every .grad is still the view it got before the first backward, and holds zeros
    assert all(p.grad.data_ptr() == where[id(p)] for p in tr.params)
    for reducer in tr.reducers + [tr.shared_reducer]:
        assert_grads_are_bucket_views(reducer, "engine")
    assert all(p.grad.abs().max() == 0 for p in tr.params)
    # the plan's "grads" bytes are what was allocated: the bucket buffers, each gradient once, no copy
    assert held == [_planned_grads(tr)] * VIEWS_STEPS, (held, _planned_grads(tr))
    assert held[0] == sum(r.allocated_bytes() for r in tr.reducers + [tr.shared_reducer])

    # dp 1 x pp 4: no buckets; autograd's own .grad tensors, as the plan says, dropped by zero_grad
    cfg = make_cfg(4, 4, m=4, pp=4, layout="E0-1|E2-3|D0-1|D2-3")
    tr, held = _trainer_with_grad_probe(cfg)
    assert tr.grid.dp == 1 and not any(r.buckets for r in tr.reducers + [tr.shared_reducer])
    parallel_losses(tr, 1)
    assert held == [_planned_grads(tr)], (held, _planned_grads(tr))
    assert all(p.grad is None for p in tr.params)


VIEWS_DP2 = dict(pp=2, vpp=2, schedule="interleaved", layout="E0-1|E2-3|D0-1|D2-3", zero=True, bucket_mb=0.01)
VIEWS_STEPS = 3


@pytest.mark.distributed
def test_engine_gradients_are_bucket_views_and_the_plan_counts_them():
    """4 processes: the engine's .grad stay views into the all-reduce buckets across steps and micro-batches,
    training equals one process (dp 2 x pp 2 vpp 2, ZeRO-1), and the memory plan's gradient bytes equal the
    bytes really held (dp 2: the buckets; dp 1 x pp 4: autograd's .grad)."""
    run_workers(_engine_views_worker, 4, reference_run(make_cfg(4, 4, m=2), VIEWS_STEPS, dp=2))


@pytest.mark.distributed
def test_bench_baseline_is_the_copy_reducer():
    """tools.bench.grad_reducer at toy size: its copy baseline trains exactly like GradReducer and holds two
    gradient buffers where the views hold one (4 bytes per parameter)."""
    parse_args, run_variant = grad_reducer.parse_args, grad_reducer.run_variant

    args = parse_args(
        ["--d-model", "16", "--layers", "1", "--vocab", "64", "--steps", "2", "--warmup", "0", "--bucket-mb", "0.01"]
    )
    copy_run, view_run = run_variant("copy", args), run_variant("view", args)
    assert copy_run["loss"] == view_run["loss"]
    assert view_run["grad_mb"] * 2**20 == 4 * view_run["params"]
    assert copy_run["grad_mb"] == 2 * view_run["grad_mb"]
