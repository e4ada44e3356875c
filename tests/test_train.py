"""The trainer end to end on a tiny preprocessed corpus: a run killed with SIGKILL at a random moment (or during a
background save) and resumed logs the uninterrupted run's losses bit for bit (single process and 2-process
pipeline), no checkpoint is lost
or corrupted, and bad input (unknown key, depth 0, missing data, corrupt checkpoint, another vocabulary, a
save directory that already holds checkpoints) is a one-line error with exit code 2 that leaves existing
checkpoints untouched."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from megabranch import checkpoint
from tests.helpers.corpus import preprocessed
from tests.helpers.dist import run_workers
from tests.helpers.env import ROOT, subprocess_env
from tests.helpers.logs import records_by_step

ENV = subprocess_env()

# one tiny run: a YAML file for the command line, --set overrides for the in-process runs
RUN = {
    "seed": 3,
    "model": {
        "residual": "branchnorm",
        "encoder_layers": 2,
        "decoder_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "ffn_dim": 64,
        "dropout": 0.1,
        "max_positions": 128,
        "alpha_warmup_steps": 12,
    },
    "optim": {"warmup_updates": 4, "lr": 0.001, "clip_norm": 1.0},
    "data": {"max_tokens": 200},
    "log": {
        "log_interval": 1,
        "valid_interval": 4,
        "bleu_sentences": 0,
        "keep_last": 2,
        "tensorboard": False,
        "progress": "none",
    },
}


def _run(data_dir, max_updates) -> dict:
    run = copy.deepcopy(RUN)
    run["data"]["data_dir"], run["optim"]["max_updates"] = data_dir, max_updates
    return run


def _preprocess(d, vocab: int, seed: int = 0):
    return preprocessed(d, vocab, 160, 16, seed)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _preprocess(tmp_path_factory.mktemp("tiny"), 64)


def _config(tmp_path, data_dir, max_updates=40):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_run(data_dir, max_updates)))
    return str(path)


def _train_cmd(cfg, save_dir, *extra):
    return [sys.executable, "-m", "megabranch.train", "--config", cfg, "--set", f"log.save_dir={save_dir}", *extra]


def _records(save_dir, tag="train") -> dict:
    """step -> the last record logged for it, less the timings (which differ between two identical runs)."""
    return records_by_step(save_dir, tag, drop=("wall", "tokens_per_s", "tag"))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = _config(tmp, data)
    save_dir = str(tmp / "run")
    subprocess.run(_train_cmd(cfg, save_dir), env=ENV, cwd=ROOT, check=True, capture_output=True)
    return cfg, save_dir


def _kill_when(cfg, save_dir, ready, deadline_s=120) -> bool:
    """Start a run, SIGKILL it as soon as ready() holds -> whether it was still running then."""
    proc = subprocess.Popen(
        _train_cmd(cfg, save_dir), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + deadline_s
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.001)
    was_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return was_running


def _check_resume(cfg, ref_dir, save_dir, what: str) -> None:
    """Nothing lost or corrupt after the kill, and the resumed run logs the uninterrupted one's records."""
    killed_at = max(_records(save_dir), default=0)
    latest = checkpoint.resolve(save_dir)
    published = checkpoint.step_dirs(save_dir)
    assert published and all(checkpoint.verify(p) for _, p in published)
    # latest is rewritten last: it names the newest directory, or the one before when the kill fell between the
    # rename of a finished save and the pointer update (that newer one is then simply saved again)
    names = [os.path.basename(p) for _, p in published]
    assert os.path.basename(latest) in names[-2:], (names, latest)

    subprocess.run(_train_cmd(cfg, save_dir, "--resume"), env=ENV, cwd=ROOT, check=True, capture_output=True)
    got, want = _records(save_dir), _records(ref_dir)
    assert sorted(got) == sorted(want) == list(range(1, 41))
    bad = [s for s in want if got[s] != want[s]]
    assert not bad, (
        f"{what}, killed after step {killed_at}, resumed from {latest}: steps {bad[:3]} "
        f"differ, e.g. {got[bad[0]]} vs {want[bad[0]]}"
    )
    assert _records(save_dir, "valid") == _records(ref_dir, "valid")
    # the alpha of the step after the resume is the uninterrupted run's (alpha warmup 12 steps: still moving)
    resumed = int(os.path.basename(latest).split("_")[1])
    if resumed < 12:
        assert got[resumed + 1]["alpha"] == want[resumed + 1]["alpha"] < 1.0


@pytest.mark.unit
def test_kill_9_at_a_random_moment_then_resume_is_bit_for_bit(uninterrupted, tmp_path):
    cfg, ref_dir = uninterrupted
    save_dir = str(tmp_path / "run")
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    # a random step after the first checkpoint (4), far enough from the end (40) that a busy machine still kills
    # the run before it finishes, then somewhere inside a step, a validation or a save
    target, delay = rng.randint(5, 30), rng.uniform(0.0, 0.05)
    log = os.path.join(save_dir, "log.jsonl")
    state = {"since": None}

    def ready() -> bool:
        if (
            state["since"] is None
            and os.path.exists(log)
            and os.path.exists(os.path.join(save_dir, "latest"))
            and len(_records(save_dir)) >= target
        ):
            state["since"] = time.time()
        return state["since"] is not None and time.time() - state["since"] >= delay

    assert _kill_when(cfg, save_dir, ready), f"random seed {seed}: the run ended before the kill at step {target}"
    _check_resume(cfg, ref_dir, save_dir, f"random seed {seed}")


@pytest.mark.unit
def test_kill_9_during_a_background_write_then_resume_is_bit_for_bit(uninterrupted, tmp_path):
    """log.async_save (the default): the kill lands while a save is being written in the background (its
    step_<N>.tmp-* directory exists, training goes on beside it); nothing is lost."""
    cfg, ref_dir = uninterrupted
    for attempt in range(5):  # the write of a tiny model takes milliseconds: try again if the kill missed it
        save_dir = str(tmp_path / f"run{attempt}")

        def writing() -> bool:
            return os.path.exists(os.path.join(save_dir, "latest")) and bool(
                [d for d in os.listdir(save_dir) if ".tmp-" in d and d.startswith("step_")]
            )

        assert _kill_when(cfg, save_dir, writing), "the run ended before a background save began"
        if any(".tmp-" in d and d.startswith("step_") for d in os.listdir(save_dir)):
            break
    else:
        pytest.fail("five kills in a row missed every background write")
    _check_resume(cfg, ref_dir, save_dir, f"killed during the background write (attempt {attempt})")


# --- two processes, pipeline-parallel -----------------------------------------------------------------------


def _two_rank_body(rank, world, data_dir, root):
    from megabranch.config import load_config
    from megabranch.train import run

    def cfg(save_dir, max_updates, **parallel):
        run = _run(data_dir, max_updates)
        run["log"]["save_dir"], run["parallel"] = save_dir, parallel
        sets = [f"{k}={json.dumps(v)}" for k, v in run.items() if not isinstance(v, dict)]
        sets += [f"{sec}.{k}={json.dumps(v)}" for sec, kv in run.items() if isinstance(kv, dict) for k, v in kv.items()]
        return load_config(None, sets)

    pp = dict(pp=2, layout="E0-1|D0-1")
    a, b, c = (os.path.join(root, x) for x in ("a", "b", "c"))
    run(cfg(a, 8, **pp))
    run(cfg(b, 4, **pp))
    run(cfg(b, 8, **pp), resume="last")
    if rank == 0:
        got, want = _records(b), _records(a)
        assert sorted(got) == list(range(1, 9)) and got == want, (got, want)
        assert sorted(os.listdir(os.path.join(b, "step_8"))) == sorted(
            ["meta.json"] + checkpoint.shard_files("shard_tp0_pp0") + checkpoint.shard_files("shard_tp0_pp1")
        )
    # the pipeline checkpoint resumed by a tensor-parallel run: resharded on load, continues from step 4
    run(cfg(c, 6, tp=2), resume=os.path.join(b, "step_4"))
    if rank == 0:
        got = _records(c)
        assert sorted(got) == [5, 6] and all(r["loss"] == r["loss"] for r in got.values())


@pytest.mark.distributed
def test_two_process_pipeline_save_resume_bit_for_bit(data, tmp_path):
    run_workers(_two_rank_body, 2, data, str(tmp_path))


# --- one-line errors ----------------------------------------------------------------------------------------


def _fails(capsys, argv, needle):
    from megabranch.train import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("megabranch-train: error:") and needle in lines[0], err
    assert "Traceback" not in err


def _digest(save_dir) -> dict:
    out = {}
    for dirpath, _, files in os.walk(save_dir):
        for f in files:
            if f != "log.jsonl":
                p = os.path.join(dirpath, f)
                out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.mark.unit
def test_bad_input_is_a_one_line_error(data, tmp_path, capsys):
    cfg = _config(tmp_path, data)
    save = f"log.save_dir={tmp_path / 'x'}"
    _fails(capsys, ["--config", cfg, "--set", "model.bogus=1"], "unknown config key model.bogus")
    _fails(capsys, ["--config", cfg, "--set", "model.encoder_layers=0"], "model.encoder_layers=0")
    _fails(capsys, ["--config", cfg, "--set", save, "--set", f"data.data_dir={tmp_path / 'nowhere'}"], "nowhere")
    _fails(capsys, ["--config", str(tmp_path / "missing.yaml")], "missing.yaml")


@pytest.mark.unit
def test_an_interrupted_run_still_publishes_the_save_in_flight(data, tmp_path, monkeypatch):
    """Ctrl-C (or any error) one step after a background save started: run() returns only once that checkpoint
    is published, so a caller that then removes or reuses the directory never races the writer."""
    from megabranch import train
    from megabranch.checkpoint import async_save
    from megabranch.config import Config

    real = async_save.save_step

    def slow_save_step(*args, **kwargs):  # the writer is still busy when the next step's interrupt arrives
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(async_save, "save_step", slow_save_step)
    cfg = Config.from_dict(_run(data, 40))
    cfg.log.save_dir = str(tmp_path / "run")

    steps = []

    def interrupt_after_the_save(stats):
        steps.append(stats)
        if len(steps) == 5:  # step 4 validated and started its save
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, on_step=interrupt_after_the_save)
    latest = checkpoint.resolve(cfg.log.save_dir)
    assert latest.endswith("step_4") and checkpoint.verify(latest)


@pytest.mark.unit
def test_checkpoint_errors_never_touch_existing_checkpoints(uninterrupted, tmp_path, capsys):
    cfg, ref_dir = uninterrupted
    save_dir = str(tmp_path / "run")
    shutil.copytree(ref_dir, save_dir)
    before = _digest(save_dir)
    # a save directory with checkpoints and no --resume: refused, nothing overwritten
    _fails(capsys, ["--config", cfg, "--set", f"log.save_dir={save_dir}"], "already holds checkpoints")
    # another vocabulary
    other = _preprocess(tmp_path / "other", 48, seed=7)
    capsys.readouterr()
    _fails(
        capsys,
        ["--config", cfg, "--set", f"log.save_dir={save_dir}", "--set", f"data.data_dir={other}", "--resume"],
        "vocabulary",
    )
    # another model
    _fails(
        capsys,
        ["--config", cfg, "--set", f"log.save_dir={save_dir}", "--set", "model.ffn_dim=32", "--resume"],
        "model.ffn_dim=32",
    )
    assert _digest(save_dir) == before
    # a corrupt (truncated) shard: one line naming the file, for train and generate alike
    step_dir = checkpoint.resolve(save_dir)
    shard = os.path.join(step_dir, "shard_tp0_pp0.safetensors")
    blob = open(shard, "rb").read()
    open(shard, "wb").write(blob[: len(blob) // 8])
    _fails(capsys, ["--config", cfg, "--set", f"log.save_dir={save_dir}", "--resume"], "shard_tp0_pp0.safetensors is")
    from megabranch.generate import main as generate_main

    with pytest.raises(SystemExit) as e:
        generate_main(["--checkpoint", save_dir, "--split", "valid"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "shard_tp0_pp0.safetensors is" in err


@pytest.mark.unit
def test_generate_reads_a_save_directory(uninterrupted, capsys):
    _, ref_dir = uninterrupted
    from megabranch.generate import main as generate_main

    assert generate_main(["--checkpoint", ref_dir, "--split", "valid", "--beam", "2", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "BLEU =" in out and "references: the reference file as written" in out
    assert (
        generate_main(
            ["--checkpoint", ref_dir, "--split", "valid", "--beam", "2", "--limit", "4", "--references", "ids"]
        )
        == 0
    )
    assert "references: the target token ids decoded" in capsys.readouterr().out


@pytest.mark.unit
def test_fine_tune_from_an_averaged_checkpoint(uninterrupted, tmp_path, capsys):
    """An averaged checkpoint has weights but no optimizer state: --resume continues its step count with a fresh
    Adam (and says so)."""
    from megabranch.config import load_config
    from megabranch.convert import main as convert_main
    from megabranch.train import run

    cfg_path, ref_dir = uninterrupted
    avg = str(tmp_path / "avg")
    assert convert_main(["average", ref_dir, "--last", "2", "--out", avg]) == 0
    save_dir = str(tmp_path / "ft")
    run(load_config(cfg_path, [f"log.save_dir={save_dir}", "optim.max_updates=42"]), resume=avg)
    assert "Adam starts fresh" in capsys.readouterr().err
    assert sorted(_records(save_dir)) == [41, 42]


@pytest.mark.unit
def test_generate_device_precision_and_token_batches(uninterrupted, tmp_path, capsys):
    """--device cpu --precision bf16 decodes; batches cut by --max-tokens give the hypotheses of one sentence per
    batch; --device cuda without a GPU and a negative --max-tokens are one-line errors."""
    _, ref_dir = uninterrupted
    from megabranch.generate import main as generate_main

    def hyps(*extra):
        out = tmp_path / "hyps.txt"
        assert (
            generate_main(
                [
                    "--checkpoint",
                    ref_dir,
                    "--split",
                    "valid",
                    "--beam",
                    "1",
                    "--limit",
                    "12",
                    "--output",
                    str(out),
                    "--device",
                    "cpu",
                    *extra,
                ]
            )
            == 0
        )
        return out.read_text().splitlines()

    token_batched = hyps("--max-tokens", "64")
    assert hyps("--max-tokens", "0", "--max-sentences", "1") == token_batched and len(token_batched) == 12
    assert len(hyps("--precision", "bf16")) == 12
    assert "cpu bf16" in capsys.readouterr().out
    import torch

    bad = [["--max-tokens", "-1"]] + ([] if torch.cuda.is_available() else [["--device", "cuda"]])
    for extra in bad:
        with pytest.raises(SystemExit) as e:
            generate_main(["--checkpoint", ref_dir, "--split", "valid", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and extra[0] in err, err
