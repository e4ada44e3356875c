"""megabranch-convert: safetensors written and read back byte-exactly, consolidate / split / reshard chains with
identical outputs, DeepSpeed pipeline export and import, checkpoint averaging against an independent mean, and
one-line errors. (torchscale and fairseq: tests/test_interop.py, against the real packages.)"""

from __future__ import annotations

import os

import pytest
import torch

from megabranch import checkpoint
from megabranch.convert import load_safetensors, save_safetensors
from megabranch.convert import main as convert_main
from megabranch.errors import UserError
from tests.helpers.checkpoints import ckpt_cfg, tiny_single
from tests.helpers.configs import VOCAB

pytestmark = pytest.mark.unit


def _ok_lines(out: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith("check")]


def test_safetensors_round_trip_and_malformed_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).bfloat16(),
        "steps": torch.arange(6).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "h": torch.randn(2, 2).half(),
    }
    path = str(tmp_path / "m.safetensors")
    save_safetensors(tensors, path, {"step": 3})
    back, meta = load_safetensors(path)
    assert meta == {"step": "3"} and set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[:8], "little")
    assert (8 + n) % 8 == 0  # header padded to 8 bytes, as the format asks
    open(path, "wb").write(blob[:-5])
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_safetensors(path)
    open(path, "wb").write((10**9).to_bytes(8, "little") + blob[8:])
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_safetensors(path)
    open(path, "wb").write(blob[:8] + b"\x00garbage" * (n // 8) + b" " * (n % 8) + blob[8 + n :])  # not JSON
    with pytest.raises(UserError, match="not a valid safetensors file") as e:
        load_safetensors(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory mapping holds t's data (None: anonymous memory), from /proc/self/maps."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_safetensors_are_read_memory_mapped(tmp_path):
    path = str(tmp_path / "big.safetensors")
    save_safetensors({"w": torch.arange(1 << 16, dtype=torch.float32)}, path)
    back, _ = load_safetensors(path)
    assert torch.equal(back["w"], torch.arange(1 << 16, dtype=torch.float32))
    assert _mapped_file(back["w"]) == os.path.realpath(path)  # no copy: the tensor is the file's pages


def test_safetensors_from_the_old_hand_written_writer_load():
    """tests/fixtures/old_main/tensors.safetensors was written by megabranch's own codec (before the package)."""
    path = os.path.join(os.path.dirname(__file__), "fixtures", "old_main", "tensors.safetensors")
    back, meta = load_safetensors(path)
    assert meta == {"format": "megabranch", "step": "4"}
    want = {
        "a.weight": torch.arange(15, dtype=torch.float32).reshape(3, 5) / 8 - 0.5,
        "b": torch.linspace(-2, 2, 7).bfloat16(),
        "h": (torch.arange(4.0).reshape(2, 2) / 3).half(),
        "d": torch.arange(3, dtype=torch.float64) / 7,
        "steps": torch.arange(6).reshape(2, 3),
        "i32": torch.tensor([-3, 0, 7], dtype=torch.int32),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    assert set(back) == set(want)
    for k, t in want.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


def _logits(step_dir_or_params, cfg, step):
    from megabranch.model import build_model
    from megabranch.residual import set_step

    params = step_dir_or_params
    if isinstance(params, str):
        params = checkpoint.consolidate(params, optimizer=False)[0]
    model = build_model(cfg.model, VOCAB, seed=0)
    model.load_state_dict(params, strict=False)
    set_step(model, step)
    model.eval()
    g = torch.Generator().manual_seed(5)
    src, prev = torch.randint(4, VOCAB, (2, 6), generator=g), torch.randint(4, VOCAB, (2, 5), generator=g)
    with torch.no_grad():
        return model(src, prev)


def test_consolidate_split_reshard_chain(tmp_path, capsys):
    save_dir = tiny_single(tmp_path, steps=(2,))
    cfg = ckpt_cfg()
    want = _logits(os.path.join(save_dir, "step_2"), cfg, 2)
    st = str(tmp_path / "model.safetensors")
    assert convert_main([save_dir, st]) == 0
    assert os.path.isfile(str(tmp_path / "model.json"))
    split = str(tmp_path / "tp2pp2")
    assert convert_main([st, split, "--tp", "2", "--pp", "2", "--layout", "E0-1|D0-1"]) == 0
    assert sorted(os.listdir(split)) == sorted(
        ["meta.json"] + [f for t in (0, 1) for p in (0, 1) for f in checkpoint.shard_files(f"shard_tp{t}_pp{p}")]
    )
    back = str(tmp_path / "tp1")
    assert convert_main([split, back]) == 0
    out = capsys.readouterr().out
    lines = _ok_lines(out)
    assert len(lines) == 3 and all(x.endswith("OK") for x in lines), out
    for d in (split, back):  # independent of the tool's own check: a model built here from what it wrote
        assert torch.equal(_logits(d, cfg, 2), want)
    assert torch.equal(_logits(load_safetensors(st)[0], cfg, 2), want)
    # the tensor-parallel shards really are slices: the tp1 half of fc1 holds rows 32..63
    full = checkpoint.consolidate(back, optimizer=False)[0]["encoder.layers.0.ffn.block.fc1.weight"]
    shard = checkpoint.load_shard(split, "shard_tp1_pp0")["model"]["encoder.layers.0.ffn.block.fc1.weight"]
    assert torch.equal(shard, full[32:])


@pytest.mark.parametrize("tp", [1, 2])
def test_deepspeed_export_import_round_trip(tmp_path, capsys, tp):
    ds = pytest.importorskip("megabranch.backends.deepspeed")
    if not hasattr(ds, "export_deepspeed") or not hasattr(ds, "import_deepspeed"):
        pytest.skip("megabranch.backends.deepspeed has no export/import yet")
    save_dir = tiny_single(tmp_path, steps=(2,))
    out = str(tmp_path / "ds")
    assert convert_main([save_dir, out, "--to", "deepspeed", "--tp", str(tp)]) == 0
    assert os.path.isfile(os.path.join(out, "latest"))
    rank = "model_01-" if tp == 2 else ""  # a file per tensor-parallel rank
    assert os.path.isfile(os.path.join(out, "megabranch", f"layer_01-{rank}model_states.pt"))
    cfg_path = tmp_path / "cfg.json"
    import json

    cfg_path.write_text(json.dumps({"model": ckpt_cfg().to_dict()["model"]}))
    back = str(tmp_path / "back")
    assert convert_main([out, back, "--from", "deepspeed", "--config", str(cfg_path)]) == 0
    lines = _ok_lines(capsys.readouterr().out)
    assert len(lines) == 2 and all(x.endswith("OK") for x in lines)
    a = checkpoint.consolidate(os.path.join(save_dir, "step_2"), optimizer=False)[0]
    b = checkpoint.consolidate(back, optimizer=False)[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_average_last_k_against_an_independent_mean(tmp_path, capsys):
    save_dir = tiny_single(tmp_path, steps=(2, 4, 6))
    out = str(tmp_path / "avg")
    assert convert_main(["average", save_dir, "--last", "2", "--out", out]) == 0
    assert "averaged step_4, step_6" in capsys.readouterr().out
    got = checkpoint.consolidate(out, optimizer=False)[0]
    a = checkpoint.load_shard(os.path.join(save_dir, "step_4"), "shard_tp0_pp0")["model"]
    b = checkpoint.load_shard(os.path.join(save_dir, "step_6"), "shard_tp0_pp0")["model"]
    for k in a:
        assert torch.equal(got[k], ((a[k].double() + b[k].double()) / 2).float()), k
    assert checkpoint.read_meta(out)["step"] == 6
    # errors: too few checkpoints, an existing destination
    with pytest.raises(SystemExit) as e:
        convert_main(["average", save_dir, "--last", "9", "--out", str(tmp_path / "avg2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "holds only 3" in err
    assert err.startswith("megabranch-convert: error:"), err
    with pytest.raises(SystemExit) as e:
        convert_main([save_dir, out])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    # averaging into an existing checkpoint (here the newest source itself) is refused, the source left intact
    newest = os.path.join(save_dir, "step_6")
    before = checkpoint.read_meta(newest)
    with pytest.raises(SystemExit) as e:
        convert_main(["average", save_dir, "--last", "2", "--out", newest])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    assert checkpoint.read_meta(newest) == before and checkpoint.verify(newest)
