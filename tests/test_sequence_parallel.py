"""Sequence parallelism (parallel.sequence_parallel) against the single-process Trainer, on the harness's varying
micro-batches (batch size, source and target lengths 3..9: odd lengths are padded to a multiple of tp):

  4 processes, one launch:
    tp 4                           20 steps, losses within 1e-5 relative and the parameters (assert_matches)
    tp 2 x pp 2, zb-v, vpp 2       20 steps, the same (the V's local hand-over, the B/W split whose W gathers the
                                   column-parallel inputs again)
    tp 2 x dp 2, bf16, ZeRO-1      20 steps against the single-process bf16 run (test_precision's tolerance)
    tp 2 x pp 2, 1f1b              the bytes the pipeline sends: exactly 1/2 of the same run without it
    tp 2 x dp 2                    the activation bytes each encoder layer saves for its backward, measured with
                                   saved-tensor hooks: the replicated regions' (the residual LayerNorm's input and
                                   statistics, the column-parallel linears' input) exactly 1/2, the rest unchanged
  2 processes: tp 2, what one step all-reduces: no hidden state with it (every embedding lookup, row-parallel
               output and column-parallel input gradient without it)
  2 processes: the twelve residual schemes at tp 2 (Admin refused in one line), 3 steps each with recompute,
               learned positions, and regional compile (aot_eager)
"""

from __future__ import annotations

import os

import pytest
import torch

from megabranch.config import RESIDUALS, load_config
from megabranch.errors import UserError
from megabranch.vocab import PAD
from tests.helpers.configs import VOCAB, make_cfg
from tests.helpers.dist import run_workers
from tests.helpers.reference import assert_matches, parallel_losses, reference_run, synthetic_batches
from tests.test_precision import PARALLEL_VS_SINGLE

STEPS = 20
MAIN = {  # name -> (micro-batches per replica, data-parallel size, parallel settings)
    "tp4": (2, 1, dict(tp=4)),
    "tp2-pp2-zb-v": (3, 1, dict(tp=2, pp=2, vpp=2, schedule="zb-v", layout="E0|E1|D0|D1")),
    "tp2-dp2-bf16-zero1": (2, 2, dict(tp=2, zero=True, precision="bf16")),
}


def _cfg(m: int, parallel: dict, residual: str = "branchnorm", sequence_parallel: bool = True):
    parallel = dict(parallel)
    precision = parallel.pop("precision", "fp32")
    cfg = make_cfg(2, 2, m=m, residual=residual, sequence_parallel=sequence_parallel, **parallel)
    cfg.optim.precision = precision
    return cfg


def _even(batches: list[dict]) -> list[dict]:
    """The batches padded to even lengths (what sequence parallelism over 2 does itself), so that the same run
    without it holds exactly twice the positions."""

    def pad(t):
        return torch.nn.functional.pad(t, (0, t.shape[1] % 2), value=PAD)

    return [{**b, **{k: pad(b[k]) for k in ("src_tokens", "prev_output_tokens", "target")}} for b in batches]


class SavedBytes:
    """Bytes of the tensors autograd saves during forwards (each storage once; parameters and buffers not
    counted), per encoder layer, split into what the attention / FFN blocks save (their tensor-parallel regions,
    where the column-parallel linears' input is the one replicated tensor) and what the rest of the layer saves
    (the residual LayerNorm's input and statistics: the replicated region)."""

    def __init__(self, model):
        from megabranch.model.attention import MultiheadAttention
        from megabranch.model.ffn import FeedForward
        from megabranch.model.layers import EncoderLayer

        tensors = list(model.parameters()) + list(model.buffers())
        self.excluded = {t.untyped_storage().data_ptr() for t in tensors}
        self.layer, self.in_block, self.seen = None, 0, set()
        self.bytes: dict = {}  # (layer index, "block" | "rest") -> bytes
        layers = [m for m in model.modules() if isinstance(m, EncoderLayer)]
        for i, layer in enumerate(layers):
            self.bytes[(i, "block")] = self.bytes[(i, "rest")] = 0
            layer.register_forward_pre_hook(lambda mod, args, i=i: setattr(self, "layer", i))
            layer.register_forward_hook(lambda mod, args, out: setattr(self, "layer", None))
        for m in model.modules():
            if isinstance(m, (MultiheadAttention, FeedForward)):
                m.register_forward_pre_hook(lambda mod, args: setattr(self, "in_block", self.in_block + 1))
                m.register_forward_hook(lambda mod, args, out: setattr(self, "in_block", self.in_block - 1))

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if self.layer is not None and ptr not in self.excluded and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes[(self.layer, "block" if self.in_block else "rest")] += t.untyped_storage().nbytes()
        return t

    def measure(self, forward) -> dict:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            out = forward()
        del out
        return dict(self.bytes)


def _layer_bytes(tr, batch) -> tuple[dict, int]:
    """SavedBytes of one training forward of `batch` on the trainer's (whole-model) chunk, and the bytes of one
    (B, L, d) float32 hidden of its source."""
    from megabranch.parallel.executor import MicroBatch

    mb = MicroBatch.from_batch(0, batch, "cpu", tr.seq_split)
    chunk = tr.model[0]
    chunk.train()
    counter = SavedBytes(chunk)
    measured = counter.measure(lambda: chunk(mb.src_tokens, mb.prev_tokens))
    return measured, mb.src_tokens.numel() * tr.cfg.model.d_model * 4


def _main_body(rank, world, refs):
    from megabranch.training.engine import Trainer

    for name, (m, dp, parallel) in MAIN.items():
        tr = Trainer(_cfg(m, parallel), VOCAB)
        assert tr.grid.dp == dp and tr.seq_split == tr.grid.tp
        losses = parallel_losses(tr, STEPS)
        ref = torch.load(refs[name])
        if "precision" in parallel:  # bf16 compute: the losses (weights and gradients stay fp32)
            err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref[0]))
            assert err <= PARALLEL_VS_SINGLE, f"{name}: bf16 losses differ from one process's by {err:.3g}"
        else:
            assert_matches(tr, losses, ref, f"sequence-parallel {name}")
        assert losses[-1] < losses[0], name

    # what crosses the pipeline: the encoder hidden, the encoder output and the decoder hidden at 1/tp
    sent = {}
    for sp in (False, True):
        tr = Trainer(_cfg(2, dict(tp=2, pp=2, layout="E0-1|D0-1"), sequence_parallel=sp), VOCAB)
        tr.train_step(_even(synthetic_batches(0, 2)))
        sent[sp] = tr.executor.stats["sent_bytes"]
    assert sent[True] > 0 and sent[True] * 2 == sent[False], sent

    # the activation bytes an encoder layer keeps for its backward (tp 2 x dp 2: each replica measures its own)
    batch = _even(synthetic_batches(1, 1))[0]
    measured = {}
    for sp in (False, True):
        tr = Trainer(_cfg(1, dict(tp=2), sequence_parallel=sp), VOCAB)
        measured[sp], hidden = _layer_bytes(tr, batch)
    for layer in (0, 1):
        plain, split = ({k: v[(layer, k)] for k in ("block", "rest")} for v in (measured[False], measured[True]))
        assert split["rest"] * 2 == plain["rest"] > 0, (layer, plain, split)  # LayerNorm inputs and statistics
        # the blocks: q/k/v's and fc1's inputs kept as this rank's half of the sequence, the rest as it was
        assert plain["block"] - split["block"] == 2 * hidden // 2, (layer, plain, split, hidden)


def _main_refs(tmp_path) -> dict:
    refs = {}
    for name, (m, dp, parallel) in MAIN.items():
        single = {"precision": parallel["precision"]} if "precision" in parallel else {}
        path = os.path.join(tmp_path, f"{name}.pt")
        torch.save(reference_run(_cfg(m, single, sequence_parallel=False), STEPS, dp=dp), path)
        refs[name] = path
    return refs


@pytest.mark.distributed
@pytest.mark.slow
def test_sequence_parallel_matches_single_process_and_splits_messages_and_activations(tmp_path):
    run_workers(_main_body, 4, _main_refs(tmp_path))


# --- what the tensor-parallel group sends ------------------------------------------------------------------------


def _activation_all_reduces(tr) -> tuple[list, int]:
    """The shapes of the (B, L, d) activations one training step all-reduces, and how many lookups the
    vocabulary-parallel embeddings made. Plain tensor parallelism all-reduces every embedding lookup, row-parallel
    output and column-parallel input gradient; sequence parallelism reduce-scatters and all-gathers them instead
    (half an all-reduce's bytes each)."""
    import torch.distributed as dist

    from megabranch.parallel.tensor_parallel import VocabParallelEmbedding

    shapes, lookups, original = [], [], dist.all_reduce

    def counting(t, *args, **kwargs):
        if t.dim() == 3 and t.shape[-1] == tr.cfg.model.d_model:
            shapes.append(tuple(t.shape))
        return original(t, *args, **kwargs)

    for chunk in tr.model:
        for m in chunk.modules():
            if isinstance(m, VocabParallelEmbedding):
                m.register_forward_hook(lambda mod, args, out: lookups.append(1))
    dist.all_reduce = counting
    try:
        tr.train_step(synthetic_batches(0, 2))
    finally:
        dist.all_reduce = original
    return shapes, len(lookups)


def _collectives_body(rank, world):
    from megabranch.training.engine import Trainer

    got = {
        sp: _activation_all_reduces(Trainer(_cfg(2, dict(tp=2), sequence_parallel=sp), VOCAB)) for sp in (False, True)
    }
    (plain, lookups), (split, split_lookups) = got[False], got[True]
    assert lookups == split_lookups == 4, got  # 2 micro-batches x (source, target)
    assert not split and len(plain) > 4 * lookups, got


@pytest.mark.distributed
@pytest.mark.slow
def test_sequence_parallelism_all_reduces_no_activation():
    """tp 2: no hidden state is all-reduced under sequence parallelism, so an all-reduce where it reduce-scatters
    (even one that keeps only this rank's slice afterwards, numerically the same) is caught by what the group is
    sent."""
    run_workers(_collectives_body, 2)


def _dropout_body(rank, world):
    from megabranch.parallel.tensor_parallel import get_rng_tracker
    from megabranch.training.engine import Trainer

    cfg = _cfg(2, dict(tp=2))
    cfg.model.dropout = cfg.model.attention_dropout = cfg.model.activation_dropout = 0.1
    tr = Trainer(cfg, VOCAB)
    before, tp_before = torch.get_rng_state(), get_rng_tracker().get_states()["tp"]["cpu"].clone()
    tr.train_step(synthetic_batches(0, 2))
    assert torch.equal(torch.get_rng_state(), before), "a split-region dropout drew from the default generator"
    assert not torch.equal(get_rng_tracker().get_states()["tp"]["cpu"], tp_before)


@pytest.mark.distributed
def test_every_dropout_of_a_split_sequence_draws_from_the_tracker():
    """tp 2 with sequence parallelism: every activation is split (heads, FFN columns, or the sequence), so the
    embedding, residual, attention and activation dropouts all draw this rank's masks from the tracker's tp stream
    and leave the default generator, shared by the tensor-parallel group, where it was."""
    run_workers(_dropout_body, 2)


# --- the twelve schemes, recomputation, regional compile --------------------------------------------------------

SCHEME_STEPS = 3
SUPPORTED = tuple(r for r in RESIDUALS if r != "admin")


def _scheme_cfg(residual: str, sequence_parallel: bool = True, **parallel):
    return _cfg(2, dict(tp=2, recompute=1, **parallel) if sequence_parallel else {}, residual, sequence_parallel)


def _schemes_body(rank, world, refs):
    from megabranch.training.engine import Trainer

    for residual in SUPPORTED:
        tr = Trainer(_scheme_cfg(residual), VOCAB)
        losses = parallel_losses(tr, SCHEME_STEPS)
        assert_matches(tr, losses, torch.load(refs[residual]), f"{residual} tp2 sequence-parallel, recompute 1")
    # learned positions: each rank adds (and takes the gradient of) the rows of its own slice of the sequence
    tr = Trainer(_scheme_cfg("branchnorm", model=dict(positions="learned")), VOCAB)
    assert_matches(
        tr, parallel_losses(tr, SCHEME_STEPS), torch.load(refs["learned"]), "learned positions, tp2 sequence-parallel"
    )
    # regional compile: the layers traced with their gathers and reduce-scatters (aot_eager: Dynamo and
    # AOTAutograd, what decides the graphs, in seconds)
    torch._dynamo.reset()
    cfg = _scheme_cfg("branchnorm", model=dict(compile=True, compile_backend="aot_eager"))
    tr = Trainer(cfg, VOCAB)
    first = tr.train_step(synthetic_batches(0, 2))
    # one symbolic graph per layer kind: step 0's first micro-batch has batch size = length (3), which duck sizing
    # would have guarded on, compiling each kind again at the second
    assert first["graphs"] == 2, first
    losses = [first["loss"]] + parallel_losses(tr, SCHEME_STEPS, start=1)
    assert_matches(tr, losses, torch.load(refs["branchnorm"]), "compiled, tp2 sequence-parallel")


@pytest.mark.distributed
@pytest.mark.slow
def test_every_scheme_with_sequence_parallelism_matches_single_process(tmp_path):
    refs = {}
    for residual in SUPPORTED:
        refs[residual] = os.path.join(tmp_path, f"{residual}.pt")
        torch.save(reference_run(_scheme_cfg(residual, sequence_parallel=False), SCHEME_STEPS), refs[residual])
    refs["learned"] = os.path.join(tmp_path, "learned.pt")
    learned = _cfg(2, dict(model=dict(positions="learned")), "branchnorm", sequence_parallel=False)
    torch.save(reference_run(learned, SCHEME_STEPS), refs["learned"])
    run_workers(_schemes_body, 2, refs)


# --- what is refused, in one line ----------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "sets, message",
    [
        (
            ["parallel.sequence_parallel=true"],
            "parallel.sequence_parallel=True is invalid: must be false with parallel.tp=1",
        ),
        (
            ["parallel.sequence_parallel=true", "parallel.tp=2", "model.residual=admin"],
            "must be false with model.residual=admin .Admin's profiling pass takes variances over whole sequences",
        ),
        (
            ["parallel.sequence_parallel=true", "parallel.tp=4", "model.max_positions=1026"],
            "model.max_positions=1026 is invalid: must be a multiple of parallel.tp=4",
        ),
    ],
)
def test_bad_combinations_are_one_line_errors(sets, message):
    with pytest.raises(UserError, match=message):
        load_config(None, sets)


@pytest.mark.unit
def test_micro_batches_are_padded_to_a_multiple_of_tp_and_their_messages_split():
    from megabranch.model.span import Span
    from megabranch.parallel.executor import MicroBatch

    batch = synthetic_batches(3, 1)[0]
    b, s = batch["src_tokens"].shape
    t = batch["target"].shape[1]
    mb = MicroBatch.from_batch(0, batch, "cpu", seq_split=4)
    for key, got in (("src_tokens", mb.src_tokens), ("prev_output_tokens", mb.prev_tokens), ("target", mb.target)):
        length = batch[key].shape[1]
        assert got.shape[1] % 4 == 0 and got.shape[1] - length < 4
        assert torch.equal(got[:, :length], batch[key]) and bool((got[:, length:] == PAD).all())
    assert mb.ntokens == batch["ntokens"] and not mb.key_mask[:, s:].any()
    decoder = Span.of_layers(3, 4, 2, 2)  # D1: receives (memory, decoder hidden)
    assert mb.shapes(decoder, True, 32, False) == [(b, -(-s // 4), 32), (b, -(-t // 4), 32)]
    one = MicroBatch.from_batch(0, batch, "cpu")
    assert one.shapes(decoder, True, 32, False) == [(b, s, 32), (b, t, 32)] and one.src_tokens.shape == (b, s)


@pytest.mark.unit
def test_the_memory_plan_and_dry_run_count_it():
    """The replicated regions' bytes in act/mb at 1/tp (the cost model's per-layer terms, which the distributed
    test measures), what the stages send at exactly 1/tp, the weights unchanged; --dry-run says so."""
    import io

    from megabranch.dry_run import dry_run
    from megabranch.planning.cost_model import CostModel
    from megabranch.planning.memory import plan

    rows = {}
    for sp in (False, True):
        cfg = make_cfg(4, 4, m=4, tp=2, pp=2, sequence_parallel=sp)
        _, rows[sp], _ = plan(cfg, 40, 512, 32, 32, "time", 1, False, 4)
    assert rows[False][0].sent > 0
    for plain, split in zip(rows[False], rows[True]):
        assert split.sent * 2 == plain.sent
        assert (split.params, split.weights, split.grads, split.optim) == (
            plain.params,
            plain.weights,
            plain.grads,
            plain.optim,
        )
        assert plain.act_full * 0.5 < split.act_full < plain.act_full and split.peak < plain.peak
    d, tokens = 32, 512
    layer = {
        sp: CostModel(make_cfg(4, 4).model, 40, tp=2, tokens=tokens, src_len=32, tgt_len=32, sequence_parallel=sp)
        for sp in (False, True)
    }
    # per encoder layer: the input, the LayerNorm input and its mean and rstd of each of its two sub-layers, at half
    sub_layer = tokens * (2 * d * 4 + 8) / 2
    assert layer[False].encoder_layer().act_bytes - layer[True].encoder_layer().act_bytes == 2 * sub_layer
    # per decoder layer: three sub-layers (the encoder output its cross-attention reads is counted per chunk)
    assert layer[False].decoder_layer().act_bytes - layer[True].decoder_layer().act_bytes == 3 * sub_layer
    out = io.StringIO()
    cfg = load_config(
        None,
        [
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.sequence_parallel=true",
            "model.encoder_layers=4",
            "model.decoder_layers=4",
        ],
    )
    info = dry_run(cfg, 4, vocab=32000, out=out)
    plain = dry_run(
        load_config(None, ["parallel.tp=2", "parallel.pp=2", "model.encoder_layers=4", "model.decoder_layers=4"]),
        4,
        vocab=32000,
        out=io.StringIO(),
    )
    assert "; sequence parallel" in out.getvalue().splitlines()[1]
    assert [a * 2 for a in info["sent_bytes"]] == plain["sent_bytes"]
    assert all(a < b for a, b in zip(info["peak_bytes"], plain["peak_bytes"]))


@pytest.mark.unit
@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--set", "parallel.sequence_parallel=true"],
            "parallel.sequence_parallel=True is invalid: must be false with parallel.tp=1",
        ),
        (
            ["--backend", "deepspeed", "--set", "parallel.tp=2", "--set", "parallel.pp=2", "--world-size", "6"],
            "world size 6 does not fit parallel.tp . parallel.pp = 2 . 2 = 4",
        ),
        (
            ["--backend", "deepspeed", "--set", "parallel.tp=2", "--set", "parallel.sequence_parallel=true"],
            "parallel.sequence_parallel is the native engine's",
        ),
    ],
)
def test_the_train_command_refuses_bad_combinations_in_one_line(argv, message, capsys):
    """megabranch-train --dry-run (what the launch scripts run first): one line on stderr, exit status 2."""
    import re

    from megabranch.train import main

    ds_json = os.path.join(os.path.dirname(__file__), "..", "launch", "configs", "ds_fp32.json")
    extra = ["--deepspeed_config", ds_json] if "deepspeed" in argv else []
    with pytest.raises(SystemExit) as e:
        main(argv + extra + ["--dry-run", "--vocab", "40"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


@pytest.mark.unit
def test_dry_run_plans_deepspeed_with_tensor_parallelism(capsys):
    """--backend deepspeed over tp 2 x pp 2 x dp 2: DeepSpeed's layer parts are the native stage layout of the
    tensor-parallel cost model (E0-5 and D0-4 with the target embedding at index 7, then D5 and the output)."""
    from megabranch.train import main

    ds_json = os.path.join(os.path.dirname(__file__), "..", "launch", "configs", "ds_fp32.json")
    assert (
        main(
            [
                "--backend",
                "deepspeed",
                "--deepspeed_config",
                ds_json,
                "--set",
                "parallel.tp=2",
                "--set",
                "parallel.pp=2",
                "--world-size",
                "8",
                "--dry-run",
                "--vocab",
                "32000",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "world size 8 = tp 2 x pp 2 x dp 2" in out and "stage layout: E0-5,D0-4|D5" in out, out
    assert "deepspeed layer parts: [0, 13, 15]" in out, out
