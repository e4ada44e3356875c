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
from tests.helpers.configs import tiny_model_cfg
from tests.helpers.dist import run_workers
from tests.helpers.reference import assert_rel

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


def _check_reducer(group, dp, dp_rank):
    model = build_model(_cfg(), VOCAB, seed=3)
    ref = copy.deepcopy(model)
    # `extra` is used by even data-parallel ranks only: no gradient on the others, and no deadlock
    extra = torch.nn.Parameter(torch.ones(3))
    for bucket_mb, overlap, micros in [(0.002, True, 1), (0.002, True, 2), (0.002, False, 2), (25.0, True, 2)]:
        for p in list(model.parameters()) + [extra]:
            p.grad = None
        # `extra` first: buckets run in reverse order, so it lands in the last one and cannot hold the others back
        reducer = GradReducer([extra] + list(model.parameters()), group, bucket_mb=bucket_mb, overlap=overlap)
        if bucket_mb < 1:
            assert len(reducer.buckets) > 3
        for step in range(2):  # twice, so a second step reuses the buckets after finish()
            for p in list(model.parameters()) + [extra] + list(ref.parameters()):
                p.grad = None
            for m in range(micros):
                if m == micros - 1:
                    reducer.arm()
                loss = _loss(model, _micro_batch(dp_rank, m, step))
                if dp_rank % 2 == 0:
                    loss = loss + (extra * (dp_rank + 1)).sum()
                loss.backward()
            launched = sum(b.launched for b in reducer.buckets)
            if overlap:  # every bucket without `extra` was launched during the backward
                assert launched >= len(reducer.buckets) - 1, (launched, len(reducer.buckets))
            else:
                assert launched == 0
            reducer.finish()
            # reference: one process, the SUM over every rank's micro-batches
            for r in range(dp):
                for m in range(micros):
                    _loss(ref, _micro_batch(r, m, step)).backward()
            ref_grads = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                assert_rel(p.grad, ref_grads[name].grad, f"dp={dp} bucket={bucket_mb} overlap={overlap} "
                                                         f"micro={micros} step={step}: {name}")
            expect = micros * sum(r + 1 for r in range(0, dp, 2))
            assert torch.equal(extra.grad, torch.full((3,), float(expect)))
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
    """group=None: the reducer leaves gradients alone; ShardedAdamW is AdamW."""
    model = build_model(_cfg(), VOCAB, seed=3)
    reducer = GradReducer(model.parameters(), None)
    reducer.arm()
    _loss(model, _micro_batch(0, 0, 0)).backward()
    before = [p.grad.clone() for p in model.parameters()]
    reducer.finish()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
