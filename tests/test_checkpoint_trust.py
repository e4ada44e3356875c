"""A checkpoint from a stranger (docs/checkpoints.md, "What a checkpoint from a stranger can and cannot do"): every
file megabranch unpickles (format-2 shards, torchscale and fairseq checkpoints, DeepSpeed layer files) goes through
one safe loader whose refusal is one line naming the file; no path that a checkpoint's metadata names (a pointer,
meta.json's file list, a shard index's data file) is followed out of its directory; and a shard cut short is
refused by its size before anything is read, also where the reader needs only its intact first part."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from megabranch import checkpoint
from megabranch.convert import main as convert_main
from megabranch.errors import UserError
from tests.helpers.checkpoints import ckpt_cfg, tiny_single

pytestmark = pytest.mark.unit

SPM = os.path.join(os.path.dirname(__file__), "fixtures", "old_main", "data-bin", "spm.model")


class _RunsCode:
    """A pickle that runs a shell command when it is loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _convert_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        convert_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def _model_cfg_file(tmp_path) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"model": ckpt_cfg().to_dict()["model"]}))
    return str(path)


@pytest.mark.parametrize("source", ["torchscale", "deepspeed", "fairseq"])
def test_every_pickle_reader_refuses_code_and_non_dicts_in_one_line_naming_the_file(source, tmp_path, capsys):
    if source == "fairseq":
        pytest.importorskip("fairseq", reason="fairseq-fixed not installed (requirements-dev.txt)")
    marker = tmp_path / "pwned"
    if source == "deepspeed":
        where = tmp_path / "ds"
        where.mkdir()
        bad = str(where / "layer_00-model_states.pt")
        argv = [str(where), str(tmp_path / "out"), "--from", "deepspeed", "--config", _model_cfg_file(tmp_path)]
    else:
        bad = str(tmp_path / "checkpoint.pt")
        argv = [bad, str(tmp_path / "out"), "--from", source]
        argv += (
            ["--fairseq-dict", str(tmp_path / "dict.txt"), "--spm", SPM]
            if source == "fairseq"
            else ["--config", _model_cfg_file(tmp_path)]
        )
    torch.save({"model": {"encoder.embed_tokens.weight": _RunsCode(marker)}}, bad)
    line = _convert_error(argv, capsys)
    assert line.startswith(
        f"megabranch-convert: error: refusing to load {bad}: it holds pickled objects other "
        "than tensors and plain data (posix.system"
    ), line
    assert "weights_only" not in line and not marker.exists()  # torch's advice to switch it off is never passed on
    torch.save([torch.zeros(2)], bad)  # plain data, but not a dict
    line = _convert_error(argv, capsys)
    assert (
        line == f"megabranch-convert: error: cannot use {bad}: it holds a list, not a dict of tensors (a state "
        "dict or a checkpoint)"
    ), line


def _rewrite_index(step_dir: str, edit) -> None:
    """Change shard_tp0_pp0's index with `edit(index)` (or write `edit` itself, a str) and give meta.json its new
    sha256 (a consistent forgery)."""
    path = os.path.join(step_dir, "shard_tp0_pp0.json")
    if isinstance(edit, str):
        blob = edit
    else:
        index = json.load(open(path))
        edit(index)
        blob = json.dumps(index)
    open(path, "w").write(blob)
    meta_path = os.path.join(step_dir, "meta.json")
    meta = json.load(open(meta_path))
    meta["files"]["shard_tp0_pp0.json"] = hashlib.sha256(blob.encode()).hexdigest()
    json.dump(meta, open(meta_path, "w"))


def test_no_path_named_by_a_checkpoint_leads_out_of_its_directory(tmp_path):
    save_dir = tiny_single(tmp_path, steps=(2,))
    step_dir = os.path.join(save_dir, "step_2")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(open(os.path.join(step_dir, "shard_tp0_pp0.safetensors"), "rb").read())  # a valid copy
    for name in ("../../outside.safetensors", str(outside), "/etc/passwd"):
        _rewrite_index(step_dir, lambda index: index.update(data=name))
        with pytest.raises(UserError, match="outside") as e:
            checkpoint.load_checkpoint(save_dir)
        assert f"shard_tp0_pp0.json names {name!r}" in str(e.value) and "\n" not in str(e.value), e.value
    _rewrite_index(step_dir, lambda index: index.update(data="shard_tp0_pp0.safetensors"))
    assert checkpoint.load_checkpoint(save_dir)["step"] == 2
    # a symlink inside the directory that leads out of it (a stranger's tarball can hold one)
    data = os.path.join(step_dir, "shard_tp0_pp0.safetensors")
    os.replace(data, tmp_path / "moved")
    os.symlink(tmp_path / "moved", data)
    with pytest.raises(UserError, match="names 'shard_tp0_pp0.safetensors', which resolves to .*moved, outside"):
        checkpoint.load_checkpoint(save_dir)
    os.replace(tmp_path / "moved", data)
    # meta.json's file list (verify opens every file it names) and the latest pointer
    meta_path = os.path.join(step_dir, "meta.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, files={**meta["files"], "../../outside.safetensors": "0" * 64}), open(meta_path, "w"))
    with pytest.raises(UserError, match="meta.json names '../../outside.safetensors', which resolves to"):
        checkpoint.verify(step_dir)
    json.dump(meta, open(meta_path, "w"))
    open(os.path.join(save_dir, "latest"), "w").write("../../elsewhere\n")
    with pytest.raises(UserError, match="latest names '../../elsewhere', which resolves to .*, outside"):
        checkpoint.resolve(save_dir)


def test_a_malformed_index_that_meta_json_vouches_for_is_one_line(tmp_path):
    save_dir = tiny_single(tmp_path, steps=(2,))
    step_dir = os.path.join(save_dir, "step_2")
    key = "model/encoder.layers.0.ffn.block.fc1.weight"
    original = open(os.path.join(step_dir, "shard_tp0_pp0.json")).read()

    def wider_rows(index):
        index["tensors"][key]["row_bytes"] *= 2  # rows twice as long as the shape says: reads past the tensor

    def unknown_tensor(index):
        index["tree"]["model"]["encoder.layers.0.ffn.block.fc1.weight"] = {"__tensor__": "model/nothing"}

    for edit, needle in [
        ("[" * 100_000, "is not JSON"),
        ('{"tree": 1}', "is malformed: it needs a tree"),
        (wider_rows, f"is malformed: the entry of {key!r} does not describe a tensor"),
        (unknown_tensor, "refers to a tensor 'model/nothing' it does not describe"),
    ]:
        _rewrite_index(step_dir, edit)
        with pytest.raises(UserError, match=needle) as e:
            checkpoint.load_checkpoint(save_dir)
        assert "\n" not in str(e.value)
        _rewrite_index(step_dir, original)
    assert checkpoint.load_checkpoint(save_dir)["step"] == 2


def test_a_shard_cut_short_is_refused_by_its_size_where_the_reader_needs_only_the_intact_part(tmp_path, capsys):
    save_dir = tiny_single(tmp_path, steps=(2,))
    step_dir = os.path.join(save_dir, "step_2")
    data = os.path.join(step_dir, "shard_tp0_pp0.safetensors")
    tensors = json.load(open(os.path.join(step_dir, "shard_tp0_pp0.json")))["tensors"]
    model_end = max(e["bytes"][1] for k, e in tensors.items() if k.startswith("model/"))
    size = os.path.getsize(data)
    assert model_end < size // 2  # the parameters come first: the optimizer half is what gets cut
    with open(data, "r+b") as fh:
        fh.truncate(model_end)
    # what megabranch-generate reads (the parameters alone), and megabranch-convert without the optimizer
    with pytest.raises(
        UserError, match=f"{data} is truncated: {model_end:,} bytes, its index shard_tp0_pp0.json describes {size:,}"
    ):
        checkpoint.load_checkpoint(save_dir)
    line = _convert_error([save_dir, str(tmp_path / "m.safetensors"), "--no-optimizer"], capsys)
    assert f"{data} is truncated" in line and not os.path.exists(tmp_path / "m.safetensors")
    with open(data, "ab") as fh:
        fh.write(b"\0" * (size - model_end + 1))  # one byte more than the index describes
    with pytest.raises(UserError, match="is longer than its index says"):
        checkpoint.load_checkpoint(save_dir)
