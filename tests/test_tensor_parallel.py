"""Tensor parallelism against the single-process model: logits, loss, every gradient, dropout RNG, clipping.

Each worker builds the single-process model with the same seed on every rank, keeps a copy as the reference,
shards the other with apply_tensor_parallel and compares (float32, max error <= 1e-5 x the reference's max).
"""

import copy
import math

import pytest
import torch
import torch.distributed as dist

from megabranch.errors import UserError
from megabranch.model import build_model, count_parameters, label_smoothed_nll_loss
from megabranch.model.attention import MultiheadAttention
from megabranch.parallel.grid import Grid, build_grid
from megabranch.parallel.parallelize import apply_tensor_parallel, full_numel, shard_of, sharded_numel
from megabranch.residual import set_step
from tests.helpers.configs import tiny_model_cfg
from tests.helpers.dist import run_workers
from tests.helpers.reference import assert_rel

REL = 1e-5  # assert_rel's default


def make_batch(vocab, tgt_vocab, seed=0, bsz=3, src_len=7, tgt_len=6):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (bsz, src_len), generator=g)
    src[0, 5:] = 0  # padding in the source (key mask) ...
    tgt = torch.randint(4, tgt_vocab, (bsz, tgt_len), generator=g)
    tgt[1, 3:] = 0  # ... and in the target (ignored by the loss)
    prev = torch.roll(tgt, 1, 1)
    prev[:, 0] = 2
    return src, prev, tgt


# (residual, share_all, share_decoder_input_output, src vocab, tgt vocab, branchnorm step)
CASES = [
    ("post_ln", True, True, 48, 48, None),
    ("branchnorm", False, False, 48, 40, 3),  # untied, separate vocabularies, alpha = 0.3
    ("pre_ln", True, False, 48, 48, None),  # one shared table, output untied
    ("deepnorm", False, True, 40, 48, None),  # separate tables, output tied to the decoder's
]


@torch.no_grad()
def _perturb(model):
    """Biases start at zero and LayerNorms at one: move them, so a bias added tp times cannot hide."""
    g = torch.Generator().manual_seed(8)
    for name, p in model.named_parameters():
        if name.endswith("bias") or "norm." in name:
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _gather(x, group):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _check_model_equivalence(grid, case):
    from megabranch.parallel.tensor_parallel import vocab_parallel_label_smoothed_nll_loss

    residual, share_all, tie_out, vocab, tgt_vocab, step = case
    cfg = tiny_model_cfg(
        residual=residual,
        share_all_embeddings=share_all,
        share_decoder_input_output_embed=tie_out,
        alpha_warmup_steps=10,
    )
    model = build_model(cfg, vocab, tgt_vocab, seed=5)
    if step is not None:
        set_step(model, step)
    _perturb(model)
    ref = copy.deepcopy(model)
    tp_model = apply_tensor_parallel(model, grid)
    tp, what = grid.tp, f"tp={grid.tp} {residual}"
    # structure: heads split, ties and shared tables preserved, names unchanged
    attn = tp_model.encoder.layers[0].self_attn.block
    assert attn.q_proj.weight.shape == (cfg.d_model // tp, cfg.d_model)
    assert attn.out_proj.weight.shape == (cfg.d_model, cfg.d_model // tp)
    assert (tp_model.encoder.embed.table is tp_model.decoder.embed.table) == share_all
    out = tp_model.decoder.output
    assert (out.tied_to is tp_model.decoder.embed.table) == tie_out
    assert [n for n, _ in tp_model.named_parameters()] == [n for n, _ in ref.named_parameters()]

    src, prev, tgt = make_batch(vocab, tgt_vocab)
    ref_logits = ref(src, prev)
    ref_loss, ref_nll = label_smoothed_nll_loss(ref_logits, tgt, 0.1, ignore_index=0)
    (ref_loss + 0.25 * ref_nll).backward()

    logits = tp_model(src, prev)
    assert logits.shape[-1] == tgt_vocab // tp
    assert_rel(_gather(logits, grid.tp_group), ref_logits, f"{what}: logits")
    loss, nll = vocab_parallel_label_smoothed_nll_loss(logits, tgt, 0.1, 0, grid.tp_group)
    assert_rel(loss, ref_loss, f"{what}: loss")
    assert_rel(nll, ref_nll, f"{what}: nll")
    (loss + 0.25 * nll).backward()
    ref_params = dict(ref.named_parameters())
    floor = 0.01 * max(p.grad.abs().max().item() for p in ref_params.values())
    for name, p in tp_model.named_parameters():
        r = ref_params[name]
        assert p.grad is not None, f"{what}: {name} has no gradient"
        assert torch.equal(p.detach(), shard_of(r.detach(), p)), f"{what}: {name} is not the slice of the full weight"
        assert_rel(p.grad, shard_of(r.grad, p), f"{what}: grad of {name}", floor=floor)
        split = getattr(p, "tp_split_dim", None) is not None
        assert split != bool(getattr(p, "tp_replicated", False)), f"{what}: {name} neither split nor replicated"


def _check_vocab_parallel_loss(grid):
    from megabranch.parallel.tensor_parallel import vocab_parallel_label_smoothed_nll_loss

    tp, rank = grid.tp, grid.tp_rank
    vocab = 12 * tp
    g = torch.Generator().manual_seed(3)
    full = (3 * torch.randn(4, 5, vocab, generator=g, dtype=torch.float64)).float()
    target = torch.randint(0, vocab, (4, 5), generator=g)
    target[0, :3] = 0  # padding targets (ignore_index 0)
    target[1, 0] = vocab - 1  # owned by the last rank
    for eps in (0.0, 0.1):
        ref_in = full.clone().requires_grad_()
        ref_loss, ref_nll = label_smoothed_nll_loss(ref_in, target, eps, ignore_index=0)
        (2.0 * ref_loss + 0.5 * ref_nll).backward()
        shard = full.chunk(tp, -1)[rank].clone().requires_grad_()
        loss, nll = vocab_parallel_label_smoothed_nll_loss(shard, target, eps, 0, grid.tp_group)
        (2.0 * loss + 0.5 * nll).backward()
        assert_rel(loss, ref_loss, f"vp loss eps={eps}")
        assert_rel(nll, ref_nll, f"vp nll eps={eps}")
        assert_rel(shard.grad, ref_in.grad.chunk(tp, -1)[rank], f"vp loss grad eps={eps}")
        assert shard.grad[0, :3].abs().max() == 0  # padding positions get no gradient
    # low-precision logits: fp32 math inside, like the reference
    loss, _ = vocab_parallel_label_smoothed_nll_loss(full.bfloat16().chunk(tp, -1)[rank], target, 0.1, 0, grid.tp_group)
    ref_loss, _ = label_smoothed_nll_loss(full.bfloat16(), target, 0.1, ignore_index=0)
    assert loss.dtype == torch.float32
    assert_rel(loss, ref_loss, "vp loss bf16")


def _check_mappings(grid):
    from megabranch.parallel.tensor_parallel import mappings as M

    group, tp, rank = grid.tp_group, grid.tp, grid.tp_rank
    k = tp * (tp + 1) / 2  # sum over ranks of (rank + 1)
    x = torch.arange(2 * 3 * 4 * tp * tp, dtype=torch.float32).view(2, 3 * tp, 4 * tp).requires_grad_()
    y = M.copy_to_tp(x, group)
    assert torch.equal(y, x)
    ((rank + 1) * y).sum().backward()
    assert torch.all(x.grad == k), "copy_to_tp must all-reduce the gradient"
    x.grad = None
    y = M.reduce_from_tp((rank + 1) * x, group)
    assert torch.allclose(y, k * x)
    y.sum().backward()
    assert torch.all(x.grad == rank + 1), "reduce_from_tp's backward is the identity"
    x.grad = None
    part = M.scatter_to_tp(x, group)
    assert torch.equal(part, x.chunk(tp, -1)[rank])
    whole = M.gather_from_tp(part, group)
    assert torch.equal(whole, x)
    (whole * (rank + 1)).sum().backward()  # gather keeps my slice of the gradient, scatter all-gathers them
    expect = torch.cat([torch.full_like(c, j + 1) for j, c in enumerate(x.detach().chunk(tp, -1))], -1)
    assert torch.equal(x.grad, expect)
    # sequence-parallel variants along dim 1
    x.grad = None
    mine = M.scatter_to_sequence(x, group, dim=1)
    assert torch.equal(mine, x.chunk(tp, 1)[rank])
    full = M.gather_from_sequence(mine, group, dim=1)
    assert torch.equal(full, x)
    ((rank + 1) * full).sum().backward()
    assert torch.all(x.grad == k), "gather_from_sequence must reduce-scatter the gradient"
    x.grad = None
    rs = M.reduce_scatter_to_sequence((rank + 1) * x, group, dim=1)
    assert torch.allclose(rs, k * x.chunk(tp, 1)[rank])
    (rs * (rank + 1)).sum().backward()  # backward all-gathers each rank's chunk gradient (j + 1)
    seq_expect = torch.cat([torch.full_like(c, j + 1) for j, c in enumerate(x.detach().chunk(tp, 1))], 1)
    assert torch.equal(x.grad, (rank + 1) * seq_expect)


def _check_dropout(grid):
    from megabranch.parallel.tensor_parallel import checkpoint, get_rng_tracker, model_parallel_seed

    tracker, group = get_rng_tracker(), grid.tp_group
    model_parallel_seed(11, grid)
    same = _gather(torch.rand(6), group).view(grid.tp, 6)
    assert all(torch.equal(same[0], row) for row in same), "the default generator must agree across tp ranks"
    before = torch.get_rng_state()
    with tracker.fork():
        forked = _gather(torch.rand(6), group).view(grid.tp, 6)
    assert torch.equal(torch.get_rng_state(), before), "a fork must not advance the default generator"
    assert len({tuple(row.tolist()) for row in forked}) == grid.tp, "forked streams must differ across tp ranks"

    # Embedding + residual dropout only: the masks equal the single-process model's.
    cfg = tiny_model_cfg(residual="post_ln", dropout=0.1)
    model = build_model(cfg, 48, seed=5)
    ref = copy.deepcopy(model).train()
    tp_model = apply_tensor_parallel(model, grid).train()
    src, prev, _ = make_batch(48, 48)
    torch.manual_seed(11)
    ref_logits = ref(src, prev)
    ref_state = torch.get_rng_state()
    model_parallel_seed(11, grid)
    assert_rel(_gather(tp_model(src, prev), group), ref_logits, "training logits with residual dropout")

    # Attention / activation dropout draw from the tracker, leaving the default stream as without them.
    for m in tp_model.modules():
        if isinstance(m, MultiheadAttention):
            m.dropout = 0.3
        elif hasattr(m, "activation_dropout"):
            m.activation_dropout.p = 0.3
    model_parallel_seed(11, grid)
    tp_before = tracker.get_states()["tp"]["cpu"]
    logits = tp_model(src, prev)
    assert torch.equal(torch.get_rng_state(), ref_state), "split-region dropout must not use the default generator"
    assert not torch.equal(tracker.get_states()["tp"]["cpu"], tp_before), "split-region dropout must use the tracker"
    assert not torch.allclose(_gather(logits, group), ref_logits)

    # Recomputation replays the tracker: checkpointed layer == plain layer, with attention dropout on.
    layer = tp_model.encoder.layers[0]
    coeffs = tp_model.encoder.coeffs
    x0 = torch.randn(2, 5, cfg.d_model, generator=torch.Generator().manual_seed(2))
    results = []
    for use_ckpt in (False, True):
        model_parallel_seed(11, grid)
        x = x0.clone().requires_grad_()
        r, s = coeffs.shortcut_scale, coeffs.branch_scale
        y = checkpoint(layer, x, r, s) if use_ckpt else layer(x, r, s)
        layer.zero_grad()
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        results.append((y.detach(), x.grad, [p.grad.clone() for p in layer.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    assert torch.equal(y0, y1)
    assert_rel(gx1, gx0, "recomputed input grad")
    for a, b in zip(gp1, gp0):
        assert_rel(a, b, "recomputed param grad")


def _check_clip(grid):
    """tp=2 x pp=2: each stage clips its own parameters; the norm is the single-process model's."""
    from megabranch.parallel.clip import clip_grad_norm_, global_grad_norm

    cfg = tiny_model_cfg(residual="branchnorm", alpha_warmup_steps=10)
    model = build_model(cfg, 48, seed=9)
    set_step(model, 4)
    _perturb(model)
    ref = copy.deepcopy(model)
    tp_model = apply_tensor_parallel(model, grid)
    src, prev, tgt = make_batch(48, 48, seed=4)
    label_smoothed_nll_loss(ref(src, prev), tgt, 0.1)[0].backward()
    from megabranch.parallel.tensor_parallel import vocab_parallel_label_smoothed_nll_loss

    vocab_parallel_label_smoothed_nll_loss(tp_model(src, prev), tgt, 0.1, 0, grid.tp_group)[0].backward()
    # a hand-made 2-stage split: stage 0 = encoder (owns the shared table), stage 1 = decoder (+ output)
    stage = tp_model.encoder if grid.pp_rank == 0 else tp_model.decoder
    params = list(stage.parameters())
    table = tp_model.encoder.embed.table.weight
    if grid.pp_rank == 1:
        assert any(p is table for p in params)
        table.pp_duplicate = True
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
    norm = global_grad_norm(params, grid)
    assert math.isclose(norm, ref_norm, rel_tol=REL), (norm, ref_norm)
    max_norm = ref_norm / 3
    assert math.isclose(clip_grad_norm_(params, max_norm, grid), ref_norm, rel_tol=REL)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    floor = 0.01 * max(p.grad.abs().max().item() for p in ref_params.values())
    prefix = "encoder." if grid.pp_rank == 0 else "decoder."
    for name, p in stage.named_parameters():
        assert_rel(p.grad, shard_of(ref_params[prefix + name].grad, p), f"clipped grad of {prefix + name}", floor=floor)
    assert math.isclose(global_grad_norm(params, grid), max_norm, rel_tol=1e-4)
    # a non-finite gradient anywhere makes the norm non-finite everywhere (and nothing is scaled)
    victim = stage.layers[0].ffn.block.fc1.weight
    for bad, check in ((float("inf"), math.isinf), (float("nan"), math.isnan)):
        saved = victim.grad.clone()
        if grid.rank == 3:
            victim.grad[0, 0] = bad
        before = [p.grad.clone() for p in params]
        assert check(clip_grad_norm_(params, 1e-3, grid))
        assert all(torch.equal(a, p.grad) or not torch.isfinite(a).all() for a, p in zip(before, params))
        victim.grad.copy_(saved)


def _tp_worker(rank, world):
    grid = build_grid(tp=world)
    for case in CASES:
        _check_model_equivalence(grid, case)
    _check_vocab_parallel_loss(grid)
    _check_mappings(grid)
    _check_dropout(grid)
    if world == 4:
        _check_clip(build_grid(tp=2, pp=2))


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_single_process(tp):
    run_workers(_tp_worker, tp)


# --- in-process: size checks, meta-device apply, partial (pipeline-stage) apply ---------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "kw, vocab, tp, message",
    [
        (dict(d_model=30, n_heads=2, ffn_dim=64), 48, 4, "model.d_model=30 is not divisible by parallel.tp=4"),
        (dict(d_model=36, n_heads=6, ffn_dim=64), 48, 4, "model.n_heads=6 is not divisible by parallel.tp=4"),
        (dict(ffn_dim=66), 48, 4, "model.ffn_dim=66 is not divisible by parallel.tp=4: use a multiple of 4, e.g. 68"),
        (dict(), 50, 4, "vocabulary size 50 is not divisible by parallel.tp=4: preprocess with --vocab-size 52"),
    ],
)
def test_size_checks_raise_user_error(kw, vocab, tp, message):
    model = build_model(tiny_model_cfg(**kw), vocab, seed=1)
    with pytest.raises(UserError) as e:
        apply_tensor_parallel(model, Grid(tp=tp))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(model.encoder.layers[0].self_attn.block.q_proj, torch.nn.Linear)  # nothing changed


@pytest.mark.unit
def test_meta_device_apply_allocates_nothing():
    cfg = tiny_model_cfg(d_model=512, n_heads=8, ffn_dim=2048, encoder_layers=4, decoder_layers=4)
    with torch.device("meta"):
        model = build_model(cfg, 32000, seed=1)
    total = count_parameters(model)
    model = apply_tensor_parallel(model, Grid(tp=8, tp_rank=3))
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)
    attn, ffn = model.decoder.layers[3].cross_attn.block, model.encoder.layers[0].ffn.block
    assert attn.k_proj.weight.shape == (64, 512) and attn.k_proj.bias.shape == (64,)
    assert attn.out_proj.weight.shape == (512, 64) and attn.out_proj.bias.shape == (512,)
    assert ffn.fc1.weight.shape == (256, 512) and ffn.fc2.weight.shape == (512, 256)
    table = model.encoder.embed.table
    assert table.weight.shape == (4000, 512) and (table.vocab_start, table.vocab_end) == (12000, 16000)
    assert model.decoder.embed.table is table and model.decoder.output.tied_to is table
    assert full_numel(model) == total
    assert sharded_numel(model) < total / 4


@pytest.mark.unit
def test_partial_apply_keeps_the_tie_across_calls():
    """A pipeline-like split: the output stage is converted before the stage holding the shared table."""
    cfg = tiny_model_cfg()
    model = build_model(cfg, 48, seed=2)
    ref = copy.deepcopy(model)
    grid = Grid(tp=2, tp_rank=1)
    last = torch.nn.ModuleDict(dict(layers=model.decoder.layers, output=model.decoder.output))
    last = apply_tensor_parallel(last, grid)
    first = apply_tensor_parallel(model.encoder, grid)
    assert last.output.tied_to is first.embed.table
    assert torch.equal(first.embed.table.weight, ref.encoder.embed.table.weight[24:])
    assert torch.equal(last.layers[1].ffn.block.fc2.weight, ref.decoder.layers[1].ffn.block.fc2.weight[:, 32:])
    # attributes set by the engine before sharding survive it
    model2 = build_model(cfg, 48, seed=2)
    model2.decoder.output.tied_to.weight.pp_duplicate = True
    out = apply_tensor_parallel(model2.decoder.output, grid)
    assert out.tied_to.weight.pp_duplicate is True
