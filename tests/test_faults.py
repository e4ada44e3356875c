"""The fault drill (issue 13): what a cluster does to a run, and what the run must do about it.

In one process: every bad input is one line and exit code 2 (config values, --set, megabranch-generate's
arguments and output path, an existing safetensors sidecar, a save_dir below a regular file or on a read-only
filesystem, a --device this torch cannot use, for megabranch-train and megabranch-generate alike); a save that
fails (a stand-in for the shard writer fills the disk) is one line, leaves the previous checkpoint as it was, and
training goes on, the next save succeeding; log.max_failed_saves failures in a row end the run in one line; a
second run on a save directory is refused naming the holder's pid and host, and the lock of a killed run is
taken over; the stale-directory cleanup never touches a live writer's files.

In several processes (gloo, a 2L-2L d=16 model over two pipeline stages, 30 steps; every run is compared with
one uninterrupted run, record by record, bit for bit):
  - SIGUSR1 to rank 1, then (after --resume auto) SIGTERM to rank 0 followed by SIGTERM and SIGUSR1 to both
    ranks every 5 ms until they exit: every rank finishes its step, one checkpoint is saved, rank 0 prints one
    line, both exit 75; the resumed run logs the uninterrupted losses;
  - a tmpfs (a private mount namespace) with room for one checkpoint: the next saves fill it while they are
    written, one line on every rank each, latest stays, training goes on with the uninterrupted losses, and the
    third failure in a row ends the run on every rank;
  - scancel through launch/torchrun_single.sh (SIGTERM to torchrun and to each worker): one checkpoint, exit 75
    from the launcher, no traceback;
  - SIGSTOP of the middle rank of three: the other two exit within parallel.timeout_s (plus a minute), one line
    each naming the step and the timeout (a rank that only saw the other survivor's connection close names the
    first rank's timeout, shared through the store: unit-tested with a HashStore and over a real process group);
  - launch/torchrun_single.sh with MAX_RESTARTS=1 and a worker killed with SIGKILL: the job finishes, with the
    uninterrupted losses, and log.jsonl reads as one curve (megabranch.metrics.read_log).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import safetensors
import torch
import yaml

from megabranch import checkpoint
from megabranch.checkpoint import shard_format, space
from megabranch.errors import EXIT_REQUEUE, EXIT_USER_ERROR
from megabranch.metrics import read_log
from megabranch.parallel import failures
from tests.helpers.checkpoints import tiny_single
from tests.helpers.dist import free_port, run_workers
from tests.helpers.env import ROOT, subprocess_env
from tests.helpers.logs import records_by_step
from tests.helpers.mounts import tmpfs_unavailable, with_tmpfs

STEPS = 30
TIMEOUT_S = 3  # parallel.timeout_s of the stalled-rank case


def _config(data_dir: str, save_dir: str, **parallel) -> dict:
    return {
        "seed": 5,
        "model": {
            "encoder_layers": 2,
            "decoder_layers": 2,
            "d_model": 16,
            "n_heads": 2,
            "ffn_dim": 32,
            "dropout": 0.1,
            "alpha_warmup_steps": 12,
            "max_positions": 64,
        },
        "parallel": {"pp": 2, "layout": "E0-1|D0-1", **parallel},
        "optim": {"max_updates": STEPS, "warmup_updates": 4, "lr": 0.001, "clip_norm": 1.0},
        "data": {"data_dir": data_dir, "max_tokens": 200},
        "log": {
            "save_dir": save_dir,
            "log_interval": 1,
            "valid_interval": 8,
            "bleu_sentences": 0,
            "tensorboard": False,
            "progress": "none",
        },
    }


def _write_config(tmp_path, name: str, cfg: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _records(save_dir: str, tag: str = "train") -> dict:
    return records_by_step(save_dir, tag, drop=("wall", "tokens_per_s", "tag"))


def _one_line(capsys_or_text, prefix: str = "megabranch-train: error:") -> str:
    """The single line of stderr besides the training log's ("model: ...", "[train] ...", "[valid] ..."),
    asserting there is exactly one, with `prefix`, and no traceback."""
    text = capsys_or_text if isinstance(capsys_or_text, str) else capsys_or_text.readouterr().err
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith(("model: ", "[train] ", "[valid] "))]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in text, text
    return lines[0]


# --- one process: bad input -----------------------------------------------------------------------------------


def _exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.mark.unit
def test_bad_training_input_is_one_line_naming_its_source(tiny_corpus, tmp_path, capsys):
    from megabranch.train import main

    cfg = _config(tiny_corpus, str(tmp_path / "run"))
    path = _write_config(tmp_path, "cfg", cfg)
    for setting, needle in [
        ("optim.lr=.inf", "--set optim.lr=inf is invalid: must be a finite number > 0"),
        ("log.log_interval=0", "--set log.log_interval=0 is invalid"),
        ("log.valid_interval=0", "--set log.valid_interval=0 is invalid"),
        ("model.max_positions=0", "--set model.max_positions=0 is invalid"),
        ("model.n_heads=0", "--set model.n_heads=0 is invalid"),  # blames n_heads, not d_model
        ("parallel.timeout_s=-1", "--set parallel.timeout_s=-1.0 is invalid"),
        ("optim.lr=fast", "--set: optim.lr='fast' is not a valid float"),  # blamed on --set, not on the file
    ]:
        assert _exit_code(main, ["--config", path, "--set", setting]) == EXIT_USER_ERROR
        assert needle in _one_line(capsys), (setting, needle)
    cfg["optim"]["lr"] = float("inf")  # the same value from the file: the file is named
    bad = _write_config(tmp_path, "bad", cfg)
    assert _exit_code(main, ["--config", bad]) == EXIT_USER_ERROR
    assert f"{bad}: optim.lr=inf is invalid" in _one_line(capsys)
    for minutes in ("0", "nan", "-3"):
        assert _exit_code(main, ["--config", path, "--exit-duration-mins", minutes]) == EXIT_USER_ERROR
        assert "--exit-duration-mins" in _one_line(capsys)
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


@pytest.mark.unit
def test_generate_checks_its_arguments_and_output_before_loading(tmp_path, capsys):
    from megabranch.generate import main

    save_dir = tiny_single(tmp_path, steps=(2,))
    # a missing checkpoint too: the arguments are checked before anything is loaded (or decoded)
    for args, needle in [
        (["--max-sentences", "0"], "--max-sentences 0 is invalid"),
        (["--limit", "-5"], "--limit -5 is invalid"),
        (["--beam", "0"], "--beam 0 is invalid"),
        (["--lenpen", "nan"], "--lenpen nan is invalid"),
        (["--output", str(tmp_path / "missing" / "hyp.txt")], "does not exist"),
        (["--output", str(tmp_path)], "is a directory"),
    ]:
        assert _exit_code(main, ["--checkpoint", str(tmp_path / "nowhere"), *args]) == EXIT_USER_ERROR
        assert needle in _one_line(capsys, "megabranch-generate: error:"), (args, needle)
    assert os.path.isdir(save_dir)


@pytest.mark.unit
def test_convert_refuses_an_existing_sidecar(tmp_path, capsys):
    from megabranch.convert import main

    save_dir = tiny_single(tmp_path, steps=(2,))
    sidecar = tmp_path / "model.json"
    sidecar.write_text('{"mine": 1}\n')
    assert _exit_code(main, [save_dir, str(tmp_path / "model.safetensors")]) == EXIT_USER_ERROR
    assert f"{sidecar} already exists" in _one_line(capsys, "megabranch-convert: error:")
    assert sidecar.read_text() == '{"mine": 1}\n' and not (tmp_path / "model.safetensors").exists()


@pytest.mark.unit
def test_a_save_dir_that_cannot_be_created_is_one_line(tiny_corpus, tmp_path, capsys):
    from megabranch.train import main

    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    cfg = _config(tiny_corpus, str(blocker / "run"))
    cfg["parallel"] = {}
    assert _exit_code(main, ["--config", _write_config(tmp_path, "cfg", cfg)]) == EXIT_USER_ERROR
    assert _one_line(capsys) == (
        f"megabranch-train: error: log.save_dir={blocker}/run cannot be created or written: "
        f"{blocker} is a file, not a directory; set log.save_dir to a writable directory"
    )


@pytest.mark.unit
def test_a_save_dir_on_a_read_only_filesystem_is_one_line(tiny_corpus, tmp_path):
    why = tmpfs_unavailable()
    if why:
        pytest.skip(why)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    cfg = _config(tiny_corpus, str(read_only / "run"))
    cfg["parallel"] = {}
    argv = [sys.executable, "-m", "megabranch.train", "--config", _write_config(tmp_path, "cfg", cfg)]
    done = subprocess.run(
        with_tmpfs(str(read_only), "ro", argv),
        env=subprocess_env(),
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == EXIT_USER_ERROR and _one_line(done.stderr) == (
        f"megabranch-train: error: log.save_dir={read_only}/run cannot be created or written: Read-only file "
        "system; set log.save_dir to a writable directory"
    ), done.stderr


@pytest.mark.unit
def test_a_device_that_cannot_be_used_is_one_line_for_train_and_generate(tiny_corpus, tmp_path, capsys):
    from megabranch.generate import main as generate
    from megabranch.train import main as train

    cfg = _config(tiny_corpus, str(tmp_path / "run"))
    cfg["parallel"] = {}
    path = _write_config(tmp_path, "cfg", cfg)
    missing_gpu = (
        ("cuda:99", "CUDA device") if torch.cuda.is_available() else ("cuda", "this torch is built without CUDA")
    )
    for device, needle in [
        missing_gpu,
        ("gpu0", "'gpu0' is not a device: use cpu, cuda or cuda:N"),
        ("meta", "megabranch runs on cpu or cuda (cuda:N), not meta"),
    ]:
        assert _exit_code(train, ["--config", path, "--device", device]) == EXIT_USER_ERROR
        assert needle in _one_line(capsys), (device, needle)
        assert _exit_code(generate, ["--checkpoint", str(tmp_path / "nowhere"), "--device", device]) == EXIT_USER_ERROR
        assert needle in _one_line(capsys, "megabranch-generate: error:"), (device, needle)
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


# --- one process: a save that fails ----------------------------------------------------------------------------


class _FullDisk:
    """Stands in for a disk that fills up during the saves whose paths contain one of `fills`: the shard writer
    (safetensors' save_file) writes part of a file, then fails as it does on a full filesystem (measured on a 64 KiB
    tmpfs: SafetensorError "... No space left on device (os error 28)"). The distributed test below fills a real
    tmpfs."""

    def __init__(self, *fills: str, room: int = 4096):
        self.fills, self.room, self.failed = fills, room, 0
        self.real = shard_format.save_file

    def save_file(self, tensors, path, *args, **kwargs):
        if not any(f in str(path) for f in self.fills):
            return self.real(tensors, path, *args, **kwargs)
        with open(path, "wb") as fh:
            fh.write(b"\0" * self.room)
        self.failed += 1
        raise safetensors.SafetensorError(
            f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error {errno.ENOSPC})"
        )


def _warnings(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [x for x in err.splitlines() if x.startswith("warning:")]


@pytest.mark.unit
def test_a_failed_save_is_one_line_and_training_goes_on_and_saves_again(tiny_corpus, tmp_path, capsys, monkeypatch):
    from megabranch.train import main

    save_dir = str(tmp_path / "run")
    cfg = _config(tiny_corpus, save_dir)
    cfg["parallel"] = {}
    cfg["optim"]["max_updates"] = 6
    cfg["log"]["valid_interval"] = 2
    disk = _FullDisk("run/step_4")
    monkeypatch.setattr(shard_format, "save_file", disk.save_file)  # the shard writes, nothing else
    # the save of step 4 runs in the background (log.async_save): its failure is known at the save of step 6
    assert main(["--config", _write_config(tmp_path, "cfg", cfg)]) == 0
    [line] = _warnings(capsys.readouterr().err)
    assert re.fullmatch(
        rf"warning: checkpoint not saved, step_4: no space left on the device of {save_dir}/step_4\."
        rf"tmp-\d+ while saving a checkpoint \(this rank's files need about 0\.\d MB, [\d,.]+ MB free\); "
        rf"{save_dir}/latest still names step_2; training goes on and the next save tries again \(1 "
        r"of log.max_failed_saves=3 failures in a row\)",
        line,
    ), line
    assert disk.failed == 1 and checkpoint.read_pointer(save_dir, "latest") == "step_6"
    assert sorted(os.listdir(save_dir)) == ["best", "latest", "log.jsonl", "run.lock", "step_2", "step_6"]
    checkpoint.verify(os.path.join(save_dir, "step_6"))  # every file's sha256, and each loads
    assert sorted(_records(save_dir)) == list(range(1, 7))

    # log.max_failed_saves failures in a row end the run (synchronous saves: each failure is known at once)
    save_dir = str(tmp_path / "run2")
    cfg["log"].update(save_dir=save_dir, async_save=False, max_failed_saves=2)
    cfg["optim"]["max_updates"] = 10
    monkeypatch.setattr(disk, "fills", ("run2/step_4", "run2/step_6"))
    assert _exit_code(main, ["--config", _write_config(tmp_path, "cfg2", cfg)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert len(_warnings(err)) == 1 and "step_4: no space left" in _warnings(err)[0]
    line = [x for x in err.splitlines() if x.startswith("megabranch-train:")]
    assert len(line) == 1 and line[0].startswith(
        "megabranch-train: error: 2 checkpoint saves in a row failed "
        "(log.max_failed_saves=2), the last of step_6: no space left"
    ), line
    assert line[0].endswith(
        f"stopping; {save_dir}/latest still names step_2; the previous checkpoint is untouched: "
        "free some space or set log.save_dir elsewhere, then --resume"
    ), line
    assert checkpoint.read_pointer(save_dir, "latest") == "step_2" and sorted(_records(save_dir)) == list(range(1, 7))
    # a filesystem that has too little room from the start: refused before anything is written
    assert space.shortfall(save_dir, 2**62) is not None and "need about" in space.shortfall(save_dir, 2**62)
    assert space.shortfall(save_dir, 1) is None


@pytest.mark.unit
def test_full_disk_during_a_conversion_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from megabranch.convert import main

    save_dir = tiny_single(tmp_path, steps=(2,))
    out = str(tmp_path / "split")
    disk = _FullDisk("split")
    monkeypatch.setattr(shard_format, "save_file", disk.save_file)
    assert _exit_code(main, [save_dir, out, "--tp", "2"]) == EXIT_USER_ERROR
    line = _one_line(capsys, "megabranch-convert: error:")
    assert disk.failed and "no space left on the device of" in line and "split.tmp-" in line, line
    assert line.endswith("nothing was written: free some space or write elsewhere"), line
    assert not [n for n in os.listdir(tmp_path) if n.startswith("split")]  # no partial directory left


# --- one process: one writer per save directory -------------------------------------------------------------------

_HOLD = """
import sys, time
from megabranch.checkpoint import SaveDirLock
lock = SaveDirLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(600)
"""


@pytest.mark.unit
def test_one_writer_per_save_directory(tiny_corpus, tmp_path, capsys):
    from megabranch.train import main

    save_dir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, save_dir], env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = _config(tiny_corpus, save_dir)
        cfg["parallel"] = {}
        argv = ["--config", _write_config(tmp_path, "cfg", cfg)]
        assert _exit_code(main, argv) == EXIT_USER_ERROR
        line = _one_line(capsys)
        assert f"{save_dir} is in use by another run (pid {holder.pid} host {socket.gethostname()}" in line, line
        assert os.listdir(save_dir) == ["run.lock"]  # nothing else touched
        # a stale directory of a live writer survives another save's cleanup; a dead writer's does not
        live, dead = os.path.join(save_dir, f"step_9.tmp-{holder.pid}"), os.path.join(save_dir, "step_8.tmp-999999999")
        os.makedirs(live)
        os.makedirs(dead)
        checkpoint.save_step(save_dir, 1, {"shard_tp0_pp0": {"x": torch.zeros(2)}}, {"layout": {}})
        assert os.path.isdir(live) and not os.path.exists(dead)
    finally:
        holder.kill()  # SIGKILL: it never releases the lock
        holder.wait()
    lock = checkpoint.SaveDirLock(save_dir)
    note = lock.acquire()  # taken over, and said so
    assert note and f"pid {holder.pid} host {socket.gethostname()}" in note and "no longer running" in note
    lock.release()
    assert checkpoint.SaveDirLock(save_dir).acquire() is None  # a released lock leaves no holder behind


# --- several processes ---------------------------------------------------------------------------------------------


class Ranks:
    """`megabranch-train` started once per rank with the environment torchrun or srun gives (a stand-in for N
    GPUs); each rank's stderr in a file."""

    def __init__(self, tmp_path, name: str, world: int, args: list[str]):
        port = free_port()
        self.err = [tmp_path / f"{name}.rank{r}.err" for r in range(world)]
        self.procs = []
        for r in range(world):
            env = subprocess_env(
                RANK=r,
                WORLD_SIZE=world,
                LOCAL_RANK=r,
                LOCAL_WORLD_SIZE=world,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
            with open(self.err[r], "w") as fh:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "megabranch.train", *args],
                        env=env,
                        cwd=ROOT,
                        stdout=subprocess.DEVNULL,
                        stderr=fh,
                    )
                )

    def stderr(self, r: int) -> str:
        return self.err[r].read_text()

    def wait(self, timeout: float = 300) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _train_steps_logged(save_dir: str) -> int:
    """How many train records the current run has logged (after its "start" record; 0 after a "stop" record,
    until the next run has started)."""
    path = os.path.join(save_dir, "log.jsonl")
    if not os.path.exists(path):
        return 0
    n = 0
    with open(path) as fh:
        for line in fh:
            try:
                tag = json.loads(line)["tag"]
            except ValueError:  # a line being written
                continue
            n = 0 if tag in ("start", "stop") else n + (tag == "train")
    return n


def _when_logged(save_dir: str, steps: int, procs, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while _train_steps_logged(save_dir) < steps:
        assert all(p.poll() is None for p in procs), "a rank ended before the fault was injected"
        assert time.time() < deadline, f"{save_dir}: {steps} steps not logged within {timeout} s"
        time.sleep(0.005)


def _keep_signalling(procs) -> int:
    """SIGTERM and SIGUSR1 in turn to every process still running, every 5 ms, until all have exited -> how many
    rounds were sent (Popen.send_signal never reaches a pid that was reused: it sends only to its own unreaped
    child)."""
    rounds = 0
    while any(p.poll() is None for p in procs):
        for p in procs:
            p.send_signal((signal.SIGTERM, signal.SIGUSR1)[rounds % 2])
        rounds += 1
        time.sleep(0.005)
    return rounds


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """The uninterrupted 2-rank run: its config file and its records."""
    tmp = tmp_path_factory.mktemp("reference")
    path = _write_config(tmp, "cfg", _config(tiny_corpus, str(tmp / "run")))
    ranks = Ranks(tmp, "ref", 2, ["--config", path])
    try:
        assert ranks.wait() == [0, 0], ranks.stderr(0)[-3000:] + ranks.stderr(1)[-3000:]
    finally:
        ranks.kill()
    return path, _records(str(tmp / "run")), _records(str(tmp / "run"), "valid")


def _latest_step(save_dir: str) -> int:
    return int(checkpoint.read_pointer(save_dir, "latest").split("_")[1])


@pytest.mark.distributed
@pytest.mark.slow
def test_sigusr1_and_sigterm_save_one_checkpoint_that_resumes_bit_for_bit(reference, tmp_path):
    cfg_path, want, want_valid = reference
    save_dir = str(tmp_path / "run")
    args = ["--config", cfg_path, "--set", f"log.save_dir={save_dir}", "--resume", "auto"]
    stopped_at = []
    for sig, target, after, again in ((signal.SIGUSR1, 1, 3, False), (signal.SIGTERM, 0, 4, True)):
        ranks = Ranks(tmp_path, sig.name, 2, args)
        try:
            _when_logged(save_dir, after, ranks.procs)
            ranks.procs[target].send_signal(sig)  # one rank only: the other learns it at the end of the step
            # the second time, SIGTERM and SIGUSR1 to every rank again and again until they have exited (scancel,
            # torchrun's forwarding, an impatient user): still one checkpoint and exit code 75, never a death (143)
            sent = _keep_signalling(ranks.procs) if again else 0
            codes = ranks.wait()
        finally:
            ranks.kill()
        assert codes == [EXIT_REQUEUE] * 2, (sig.name, codes, ranks.stderr(0)[-2000:], ranks.stderr(1)[-2000:])
        assert sent > 10 or not again, sent
        line = [x for x in ranks.stderr(0).splitlines() if x.startswith("megabranch-train:")]
        step = max(_records(save_dir))
        names = ("SIGTERM", "SIGUSR1") if again else (sig.name,)  # (a rank may see a SIGUSR1 first)
        assert len(line) == 1 and any(
            line[0] == f"megabranch-train: stopped after step {step} on {name}: saved a "
            f"checkpoint of it in {save_dir}; run the same command with --resume auto to "
            "continue"
            for name in names
        ), line
        assert "Traceback" not in ranks.stderr(0) + ranks.stderr(1) and not ranks.stderr(1).strip()
        assert _latest_step(save_dir) == step and step < STEPS
        step_dir = os.path.join(save_dir, f"step_{step}")
        files = sorted(checkpoint.verify(step_dir)["files"])  # every rank's shard, each sha256 checked
        assert files == sorted(f for f in os.listdir(step_dir) if f != "meta.json") and len(files) == 4, files
        stopped_at.append(step)
    ranks = Ranks(tmp_path, "rest", 2, args)
    try:
        assert ranks.wait() == [0, 0], ranks.stderr(0)[-3000:]
    finally:
        ranks.kill()
    assert stopped_at[0] < stopped_at[1]
    got = _records(save_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    bad = [s for s in want if got[s] != want[s]]
    assert not bad, f"stopped at {stopped_at}: steps {bad[:3]} differ, e.g. {got[bad[0]]} vs {want[bad[0]]}"
    assert _records(save_dir, "valid") == want_valid
    starts = [r for r in map(json.loads, open(os.path.join(save_dir, "log.jsonl"))) if r["tag"] in ("start", "stop")]
    assert [(r["tag"], r["step"]) for r in starts] == [
        ("start", 0),
        ("stop", stopped_at[0]),
        ("start", stopped_at[0]),
        ("stop", stopped_at[1]),
        ("start", stopped_at[1]),
    ]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_stalled_rank_makes_the_others_exit_within_the_timeout(tiny_corpus, tmp_path):
    save_dir = str(tmp_path / "run")
    cfg = _config(tiny_corpus, save_dir, pp=3, layout="E0-1|D0|D1", timeout_s=TIMEOUT_S)
    ranks = Ranks(tmp_path, "stall", 3, ["--config", _write_config(tmp_path, "cfg", cfg)])
    try:
        _when_logged(save_dir, 3, ranks.procs)
        ranks.procs[1].send_signal(signal.SIGSTOP)  # alive, holding its sockets, answering nothing
        stalled_from = max(_records(save_dir))
        # a bound against a hang, not a speed claim: the issue allows the timeout plus a minute
        codes = [ranks.procs[r].wait(timeout=TIMEOUT_S + 60) for r in (0, 2)]
    finally:
        ranks.kill()
    assert codes == [1, 1], codes
    for r in (0, 2):
        line = _one_line(ranks.stderr(r))
        # the peer stalls inside a step or in the stop decision after one: either way the line names that step
        where = re.search(rf"rank {r}, (step|the stop decision after step) (\d+): ", line)
        assert where and f"parallel.timeout_s={TIMEOUT_S} s" in line, line
        assert int(where.group(2)) in range(stalled_from, stalled_from + 3), (line, stalled_from)


# two ranks of megabranch-train ("$0": the interpreter), each rank's stderr in $ERR<rank>, then what the tmpfs
# holds copied to $KEEP (the tmpfs goes with the namespace) and both exit codes printed
_TWO_RANKS = (
    'RANK=0 LOCAL_RANK=0 "$0" -m megabranch.train "$@" 2>"$ERR0" & first=$!; '
    'RANK=1 LOCAL_RANK=1 "$0" -m megabranch.train "$@" 2>"$ERR1"; second=$?; '
    'wait "$first"; first=$?; cp -a "$SAVE" "$KEEP"; echo "$first $second"'
)


@pytest.mark.distributed
@pytest.mark.slow
def test_saves_that_fill_a_tmpfs_leave_latest_and_training_goes_on_until_max_failed_saves(reference, tmp_path):
    why = tmpfs_unavailable()
    if why:
        pytest.skip(why)
    cfg_path, want, _ = reference
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    # room for one checkpoint (90 pages of 4 KiB for this model over two stages), the log and half a checkpoint
    # more: step_8 fits, step_16 fills the tmpfs while its shards are written (each rank's files fit the free space
    # by themselves, so the check before writing lets them start), and so do step_24 and the last one, step_30
    argv = ["sh", "-c", _TWO_RANKS, sys.executable, "--config", cfg_path, "--set", f"log.save_dir={save_dir}"]
    err = [tmp_path / f"rank{r}.err" for r in range(2)]
    env = subprocess_env(
        WORLD_SIZE=2,
        LOCAL_WORLD_SIZE=2,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=free_port(),
        ERR0=err[0],
        ERR1=err[1],
        SAVE=save_dir,
        KEEP=tmp_path / "kept",
    )
    done = subprocess.run(
        with_tmpfs(str(save_dir), "size=576k", argv), env=env, cwd=ROOT, text=True, capture_output=True, timeout=600
    )
    texts = [e.read_text() for e in err]
    assert done.stdout.split() == ["2", "2"], done.stdout + done.stderr + texts[0][-3000:] + texts[1][-3000:]
    kept = f"{save_dir}/latest still names step_8"
    for r, text in enumerate(texts):
        warnings = [w for w in _warnings(text) if "checkpoint not saved" in w]  # (a log write may wait too)
        assert [w.split(": no space left")[0] for w in warnings] == [
            f"warning: rank {r}: checkpoint not saved, step_{s}" for s in (16, 24)
        ], warnings
        assert all(kept in w and "training goes on" in w for w in warnings), warnings
        assert [w.split("(")[-1] for w in warnings] == [
            f"{k} of log.max_failed_saves=3 failures in a row)" for k in (1, 2)
        ]
        line = _one_line("\n".join(x for x in text.splitlines() if not x.startswith("warning:")))
        assert (
            line.startswith(
                "megabranch-train: error: 3 checkpoint saves in a row failed (log.max_failed_saves=3),"
                " the last of step_30: no space left on the device of "
            )
            and kept in line
        ), line
    # nothing of the failed saves is left, and training went on to the last step with the uninterrupted losses
    kept_dir = str(tmp_path / "kept")
    got = _records(kept_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(got[s] == want[s] for s in got)
    assert checkpoint.read_pointer(kept_dir, "latest") == "step_8"
    assert sorted(os.listdir(kept_dir)) == ["best", "latest", "log.jsonl", "run.lock", "step_8"]
    checkpoint.verify(os.path.join(kept_dir, "step_8"))


@pytest.mark.distributed
@pytest.mark.slow
def test_scancel_through_torchrun_saves_once_and_gives_the_scheduler_75_without_a_traceback(reference, tmp_path):
    cfg_path, _, _ = reference
    save_dir = str(tmp_path / "run")
    err = tmp_path / "torchrun.err"
    proc = subprocess.Popen(
        [
            "bash",
            os.path.join(ROOT, "launch", "torchrun_single.sh"),
            "--config",
            cfg_path,
            "--set",
            f"log.save_dir={save_dir}",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        env=subprocess_env(GPUS=2),
        stdout=subprocess.DEVNULL,
        stderr=open(err, "w"),
    )
    workers = []
    try:
        _when_logged(save_dir, 3, [proc])
        workers += [os.pidfd_open(int(p)) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        assert len(workers) == 2
        # scancel: SIGTERM to every process of the job step, torchrun and each worker (which torchrun forwards
        # its own to: two per worker); a pidfd never reaches a reused pid
        proc.send_signal(signal.SIGTERM)
        for fd in workers:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for fd in workers:
            os.close(fd)
    text = err.read_text()
    assert code == EXIT_REQUEUE and "Traceback" not in text, text[-3000:]
    stopped = [x for x in text.splitlines() if x.startswith("megabranch-train:")]
    assert len(stopped) == 1 and re.fullmatch(
        r"megabranch-train: stopped after step (\d+) on SIGTERM: saved a "
        r"checkpoint of it in .*",
        stopped[0],
    ), stopped
    assert "# torchrun: all 2 workers saved a checkpoint and stopped: exit code 75" in text
    step = int(re.search(r"after step (\d+)", stopped[0]).group(1))
    assert _latest_step(save_dir) == step == max(_records(save_dir))
    checkpoint.verify(os.path.join(save_dir, f"step_{step}"))


GLOO_TIMEOUT = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for recv operation")
GLOO_CLOSED = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:10664")


@pytest.mark.unit
def test_a_lost_connection_reports_the_first_timeout_of_the_job(monkeypatch):
    # the cascade a stall starts: rank 2 times out and exits, rank 0 then sees only its connection to rank 2 close
    store = torch.distributed.HashStore()
    monkeypatch.setattr(failures, "_default_store", lambda: store)
    monkeypatch.setattr(failures, "LINGER_S", 0.0)
    monkeypatch.setenv("RANK", "2")
    first = str(failures.comm_failure_ended(GLOO_TIMEOUT, "step 4", 3))
    assert first.startswith("error: rank 2, step 4: no answer from a peer rank within parallel.timeout_s=3 s"), first
    monkeypatch.setenv("RANK", "0")
    then = str(failures.comm_failure_ended(GLOO_CLOSED, "step 4", 3))
    assert then.startswith(
        "error: rank 0, step 4: lost the connection to a peer rank after the job's first "
        "failure (rank 2, step 4: no answer from a peer rank within parallel.timeout_s=3 s"
    ), then
    assert then.endswith("[Connection closed by peer [127.0.0.1]:10664]"), then
    # a second timeout does not replace the first
    failures.comm_failure_ended(GLOO_TIMEOUT, "step 9", 3)
    assert store.get(failures._cause_key()).decode().startswith("rank 2, step 4: ")


@pytest.mark.unit
def test_a_lost_connection_without_a_shared_cause_blames_the_dead_peer_and_never_waits_on_a_stuck_store(monkeypatch):
    monkeypatch.setattr(failures, "STORE_WAIT_S", 0.3)
    monkeypatch.setattr(failures, "_default_store", lambda: torch.distributed.HashStore())
    line = str(failures.comm_failure_ended(GLOO_CLOSED, "step 4", 3))
    assert "lost the connection to a peer rank (it died or closed its process group)" in line, line

    class StoppedHost:  # a TCPStore whose host was SIGSTOPped: every call blocks
        def check(self, keys):
            time.sleep(600)

        compare_set = get = check

    monkeypatch.setattr(failures, "_default_store", lambda: StoppedHost())
    monkeypatch.setattr(failures, "LINGER_S", 0.0)
    t0 = time.monotonic()
    line = str(failures.comm_failure_ended(GLOO_CLOSED, "step 4", 3))
    assert "(it died or closed its process group)" in line, line
    assert "within parallel.timeout_s=3 s" in str(failures.comm_failure_ended(GLOO_TIMEOUT, "step 4", 3))
    # a bound against a hang, not a speed claim: two store waits of 0.3 s, never the 600 s a call blocks
    assert time.monotonic() - t0 < 60


def _share_a_timeout(rank, world):
    failures.LINGER_S = 0.0
    if rank == 1:
        failures.comm_failure_ended(GLOO_TIMEOUT, "step 7", 3)
    torch.distributed.barrier()
    if rank == 0:
        line = str(failures.comm_failure_ended(GLOO_CLOSED, "step 7", 3))
        assert "after the job's first failure (rank 1, step 7: no answer" in line, line


@pytest.mark.distributed
def test_the_first_timeout_travels_through_the_process_groups_own_store():
    run_workers(_share_a_timeout, 2)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_finishes_as_if_uninterrupted(reference, tmp_path):
    cfg_path, want, want_valid = reference
    save_dir = str(tmp_path / "run")
    proc = subprocess.Popen(
        [
            "bash",
            os.path.join(ROOT, "launch", "torchrun_single.sh"),
            "--config",
            cfg_path,
            "--set",
            f"log.save_dir={save_dir}",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        env=subprocess_env(GPUS=2, MAX_RESTARTS=1),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "torchrun.err", "w"),
    )
    try:
        _when_logged(save_dir, 10, [proc])  # after the checkpoint of step 8
        workers = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        rank1 = [
            p
            for p in workers
            if b"RANK=1\x00" in open(f"/proc/{p}/environ", "rb").read().replace(b"LOCAL_RANK=1\x00", b"")
        ]
        assert len(rank1) == 1, workers
        os.kill(rank1[0], signal.SIGKILL)
        killed_after = max(_records(save_dir))
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (tmp_path / "torchrun.err").read_text()
    assert code == 0, f"killed after step {killed_after}: " + err[-3000:]
    # the survivor's one line (in a pipeline message "to rank 1", in a collective "to a peer rank"), no traceback
    line = [x for x in err.splitlines() if x.startswith("megabranch-train:")]
    assert (
        len(line) == 1
        and line[0].startswith("megabranch-train: error: rank 0, ")
        and "lost the connection" in line[0]
        and "Traceback" not in err
    ), line
    got = _records(save_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), (killed_after, sorted(got))
    bad = [s for s in want if got[s] != want[s]]
    assert not bad, f"killed after step {killed_after}: steps {bad[:3]} differ, e.g. {got[bad[0]]} vs {want[bad[0]]}"
    assert _records(save_dir, "valid") == want_valid
    # the replayed steps are logged twice; metrics.read_log reads one curve: each step once, the uninterrupted values
    rows = read_log(os.path.join(save_dir, "log.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [want[s]["loss"] for s in range(1, STEPS + 1)]
