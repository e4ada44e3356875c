"""launch/: every script parses (bash -n), prints the resolved layout and the command it would run (DRY_RUN=1),
and refuses a layout that does not fit its machines (one line, exit 2); every YAML config loads and passes
`megabranch-train --dry-run` (with each DeepSpeed JSON config too); the dry run's numbers against the model itself;
the SLURM script passes its USR1 warning on to the job step and requeues the job; and the single-node torchrun
script trains a tiny model for 2 steps on 2 CPU processes for real."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time

import pytest

from megabranch.config import load_config
from megabranch.errors import UserError
from tests.helpers.configs import tiny_model_cfg, tiny_pp2_yaml
from tests.helpers.corpus import write_corpus
from tests.helpers.env import ROOT, subprocess_env
from tests.helpers.logs import read_log

LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(LAUNCH, "*.sbatch")))
YAMLS = sorted(glob.glob(os.path.join(LAUNCH, "configs", "*.yaml")))
DS_JSONS = sorted(glob.glob(os.path.join(LAUNCH, "configs", "ds_*.json")))
# the world size docs/launch.md suggests for each depth
SUGGESTED = {6: 8, 18: 8, 50: 8, 100: 8, 250: 16, 500: 32}


def _bash(script: str, args: list[str], timeout: int = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", os.path.join(LAUNCH, script), *args],
        cwd=ROOT,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.unit
def test_every_script_parses():
    assert {os.path.basename(s) for s in SCRIPTS} >= {
        "torchrun_single.sh",
        "torchrun_multi.sh",
        "slurm.sbatch",
        "deepspeed_launcher.sh",
        "common.sh",
        "torchrun_check.sh",
        "prepare_wmt17_en_de.sh",
        "prepare_wmt14_en_fr.sh",
    }
    for script in SCRIPTS:
        r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


def _depth(path: str) -> int:
    return int(os.path.basename(path).split("_")[1].split("L")[0])


@pytest.mark.unit
def test_configs_are_the_papers_settings():
    assert sorted(_depth(p) for p in YAMLS) == [6, 18, 50, 100, 250, 500]
    for path in YAMLS:
        cfg = load_config(path)
        m, o = cfg.model, cfg.optim
        n = _depth(path)
        assert (m.encoder_layers, m.decoder_layers, m.d_model, m.ffn_dim, m.n_heads) == (n, n, 512, 2048, 8)
        assert m.residual == "branchnorm" and m.alpha_warmup_steps == 4000
        assert (o.lr, o.warmup_updates, cfg.data.max_tokens * o.update_freq) == (5e-4, 4000, 16384)
    for path in DS_JSONS:
        with open(path) as fh:
            ds = json.load(fh)
        assert "gradient_accumulation_steps" not in ds  # it follows the YAML config's optim.update_freq
    kinds = {os.path.basename(p) for p in DS_JSONS}
    assert {"ds_bf16.json", "ds_fp16.json", "ds_bf16_zero1.json", "ds_fp32.json"} <= kinds
    with open(os.path.join(LAUNCH, "configs", "ds_fp16.json")) as fh:
        assert json.load(fh)["fp16"]["loss_scale"] == 0  # 0: dynamic loss scaling


@pytest.mark.unit
@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_every_config_passes_dry_run(path, capsys):
    from megabranch.train import main

    n = _depth(path)
    assert main(["--config", path, "--dry-run", "--world-size", str(SUGGESTED[n])]) == 0
    out = capsys.readouterr().out
    assert f"{n}L-{n}L d=512" in out and "stage layout:" in out and "peak MB" in out
    cfg = load_config(path)
    pp, dp = cfg.parallel.pp, SUGGESTED[n] // cfg.parallel.pp
    assert (
        f"effective batch: max_tokens {cfg.data.max_tokens} x update_freq {cfg.optim.update_freq} x dp {dp} = "
        f"131,072 tokens per step" in out
    )  # the same batch at every depth
    # the recipe's own settings: a simulated bubble <= 10%, within an 80 GB GPU (planning.USABLE of it)
    line = next(x for x in out.splitlines() if x.startswith("simulated bubble: "))
    bubble = float(line.split()[2].rstrip("%"))
    chosen = next(x for x in out.splitlines() if x.startswith("| => "))
    peak = max(float(g) for g in chosen.split("|")[-2].split())
    assert bubble <= 10.0 and "| yes  |" in chosen and peak <= 72.0, (line, chosen)
    # docs/launch.md's and the README's rows for this config hold the numbers the dry run computes
    params = int(next(x for x in out.splitlines() if x.startswith("parameters: ")).split()[1].replace(",", ""))
    for doc in (os.path.join("docs", "launch.md"), "README.md"):
        with open(os.path.join(ROOT, doc)) as fh:
            row = next(x for x in fh if x.startswith(f"| `{os.path.basename(path)}`"))
        assert f"| {params / 1e6:,.1f}M |" in row, (doc, row, params)
        assert f"| {bubble:.1f}% | {peak:.1f} GiB |" in row, (doc, row, bubble, peak)
        assert (f"pp {pp} x dp {dp}" if pp > 1 else f"dp {dp}") in row, (doc, row)
        if pp > 1:
            assert f"| {cfg.parallel.schedule}, {cfg.optim.update_freq} x {cfg.data.max_tokens} tokens |" in row


@pytest.mark.unit
@pytest.mark.parametrize("ds", DS_JSONS, ids=os.path.basename)
def test_every_deepspeed_config_passes_dry_run(ds, capsys):
    from megabranch.train import main

    path = os.path.join(LAUNCH, "configs", "base_50L-50L.yaml")  # one GPU holds it; split over 2 stages here
    assert (
        main(
            [
                "--config",
                path,
                "--set",
                "parallel.pp=2",
                "--dry-run",
                "--world-size",
                "8",
                "--backend",
                "deepspeed",
                "--deepspeed_config",
                ds,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # the cost-model split E0-49,D0-9 | D10-49 as LayerSpec indices: 1 + 50 + 1 + 10 = 62; 50 + 50 + 3 = 103
    assert "stage layout: E0-49,D0-9|D10-49" in out and "deepspeed layer parts: [0, 62, 103]" in out


@pytest.mark.unit
def test_dry_run_numbers_against_the_model(capsys):
    from megabranch.dry_run import dry_run
    from megabranch.model import build_model, count_parameters

    cfg = load_config(
        None,
        [
            "parallel.pp=2",
            "parallel.layout=E0-2|D0-2",
            "data.max_tokens=300",
            "optim.update_freq=3",
            "data.data_dir=/nonexistent",
        ],
    )
    cfg.model = tiny_model_cfg(encoder_layers=3, decoder_layers=3)
    info = dry_run(cfg, world_size=6, vocab=48)
    assert info["parameters"] == count_parameters(build_model(cfg.model, 48, seed=1))
    # stage 1 holds a copy of the tied table for the target embedding / output projection
    assert sum(info["stage_parameters"]) == info["parameters"] + 48 * 32
    assert (info["dp"], info["effective_tokens"], info["layout"]) == (3, 300 * 3 * 3, "E0-2|D0-2")
    with pytest.raises(UserError, match="world size 5 does not fit"):
        dry_run(cfg, world_size=5, vocab=48)
    with pytest.raises(UserError, match=r"--vocab -5 is invalid: must be an integer >= 1 \(a vocabulary size\)"):
        dry_run(cfg, world_size=6, vocab=-5)
    with pytest.raises(UserError, match="world size 6 does not fit"):  # DeepSpeed's layout divides the world too
        cfg.parallel.tp = 2
        dry_run(cfg, world_size=6, vocab=48, backend="deepspeed")


@pytest.mark.unit
def test_scripts_print_the_layout_and_command(tmp_path):
    cfg = str(tmp_path / "tiny.yaml")  # pp=2, update_freq 4 (the DeepSpeed configs follow it)
    (tmp_path / "tiny.yaml").write_text(tiny_pp2_yaml("/nonexistent", update_freq=4))
    r = _bash("torchrun_single.sh", ["--config", cfg], GPUS=8, DRY_RUN=1)
    assert r.returncode == 0, r.stderr
    assert "world size 8 = tp 1 x pp 2 x dp 4" in r.stdout and "--standalone --nproc_per_node 8" in r.stdout
    r = _bash(
        "torchrun_multi.sh",
        ["--config", cfg],
        MASTER_ADDR="node0",
        MASTER_PORT=29500,
        NNODES=2,
        NODE_RANK=1,
        GPUS_PER_NODE=4,
        DRY_RUN=1,
    )
    assert r.returncode == 0, r.stderr
    assert "world size 8" in r.stdout and "--nnodes 2 --node_rank 1 --nproc_per_node 4" in r.stdout
    assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 300" in r.stdout
    assert r.stdout.rstrip().endswith("--resume auto")
    r = _bash("torchrun_single.sh", ["--config", cfg, "--resume", "runs/x/step_4"], GPUS=2, DRY_RUN=1)
    assert r.stdout.rstrip().endswith("--resume runs/x/step_4")  # an explicit --resume is kept as it is
    r = _bash(
        "deepspeed_launcher.sh",
        ["--config", cfg],
        HOSTFILE=os.path.join(LAUNCH, "hostfile.example"),
        DS_CONFIG=os.path.join(LAUNCH, "configs", "ds_bf16_zero1.json"),
        DRY_RUN=1,
    )
    assert r.returncode == 0, r.stderr
    assert "world size 16 = tp 1 x pp 2 x dp 8" in r.stdout and "deepspeed layer parts" in r.stdout
    assert "--hostfile" in r.stdout and "--module megabranch.train --backend deepspeed" in r.stdout
    assert r.stdout.rstrip().endswith(f"--config {cfg} --resume auto")  # a restart continues the run
    # SLURM: a fake allocation of 2 nodes x 4 GPUs (scontrol stubbed); srun is only printed
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text("#!/bin/sh\necho gpu-node-7\necho gpu-node-8\n")
    (stub / "scontrol").chmod(0o755)
    slurm = dict(
        SLURM_JOB_NODELIST="gpu-node-[7-8]",
        SLURM_JOB_NUM_NODES=2,
        SLURM_GPUS_ON_NODE=4,
        SLURM_JOB_ID=42,
        SLURM_SUBMIT_DIR=ROOT,
        PATH=f"{stub}:{os.environ['PATH']}",
    )
    r = _bash("slurm.sbatch", ["--config", cfg], DRY_RUN=1, **slurm)
    assert r.returncode == 0, r.stderr
    assert "world size 8" in r.stdout and "srun" in r.stdout and "gpu-node-7:20042" in r.stderr


@pytest.mark.unit
@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_slurm_script_passes_usr1_on_and_requeues_the_job(tmp_path, sig):
    """SLURM's warning before the time limit (--signal=B:USR1@300) reaches only the batch script: it must pass it
    on to the job step (srun), wait for the step to end and requeue the job. On TERM (scancel, preemption) it waits
    for the step the same way and exits with its code, 75, without requeueing."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_pp2_yaml("/nonexistent"))
    calls, stub = tmp_path / "calls", tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(
        f'#!/bin/sh\nif [ "$1" = show ]; then echo node-1; else echo "scontrol $*" >> {calls}; fi\n'
    )
    # a job step that runs until it gets USR1 or TERM, then saves and exits 75 as megabranch-train does
    (stub / "srun").write_text(
        f'#!/bin/bash\nfor s in USR1 TERM; do trap "echo srun: $s >> {calls}; kill \\$S; exit 75" $s; done\n'
        f'sleep 120 & S=$!\necho "srun: started" >> {calls}\nwait $S\n'
    )
    for f in ("scontrol", "srun"):
        (stub / f).chmod(0o755)
    with open(os.path.join(LAUNCH, "slurm.sbatch")) as fh:
        head = fh.read()
    assert "#SBATCH --signal=B:USR1@300" in head and "#SBATCH --requeue" in head
    env = subprocess_env(
        SLURM_JOB_NODELIST="node-1",
        SLURM_JOB_NUM_NODES=1,
        SLURM_GPUS_ON_NODE=2,
        SLURM_JOB_ID=42,
        SLURM_SUBMIT_DIR=ROOT,
        PATH=f"{stub}:{os.environ['PATH']}",
    )
    proc = subprocess.Popen(
        ["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (calls.exists() and "srun: started" in calls.read_text()):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no srun"
            time.sleep(0.02)
        proc.send_signal(getattr(signal, f"SIG{sig}"))  # what SLURM sends to the batch shell
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert code == 75, err
    requeue = ["scontrol requeue 42"] if sig == "USR1" else []
    assert calls.read_text().splitlines() == ["srun: started", f"srun: {sig}"] + requeue
    assert ("requeueing job 42" in err) == (sig == "USR1"), err


@pytest.mark.unit
def test_scripts_refuse_a_layout_that_does_not_fit(tmp_path):
    cfg = os.path.join(LAUNCH, "configs", "base_250L-250L.yaml")  # pp=2: an odd process count cannot hold it
    r = _bash("torchrun_single.sh", ["--config", cfg], GPUS=3)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("torchrun_single.sh: error: the parallel layout does not fit 3 processes: world size 3")
    assert "Traceback" not in r.stderr
    r = _bash(
        "torchrun_multi.sh", ["--config", cfg], MASTER_ADDR="n0", MASTER_PORT=1, NNODES=3, NODE_RANK=0, GPUS_PER_NODE=1
    )
    assert r.returncode == 2 and "does not fit 3 processes" in r.stderr
    r = _bash("torchrun_multi.sh", ["--config", cfg], MASTER_PORT=1, NNODES=3, NODE_RANK=0)
    assert r.returncode == 2 and "MASTER_ADDR is not set" in r.stderr


@pytest.mark.distributed
def test_torchrun_single_node_script_trains_two_steps(tiny_corpus, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_pp2_yaml(tiny_corpus, tmp_path / "run", max_updates=2, update_freq=2, warmup_updates=2))
    r = _bash("torchrun_single.sh", ["--config", str(cfg), "--device", "cpu"], timeout=300, GPUS=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "stage layout: E0-1|D0-1" in r.stdout and "world size 2 = tp 1 x pp 2 x dp 1" in r.stdout
    train = [x for x in read_log(tmp_path / "run" / "log.jsonl") if "lr" in x]
    assert [x["step"] for x in train] == [1, 2]
    assert [x["alpha"] for x in train] == [0.0, 0.25]  # alpha_t = t / T for t = 0, 1 with T = 4
    assert all(x["loss"] > 0 for x in train)


@pytest.mark.unit
@pytest.mark.parametrize(
    "script,pair", [("prepare_wmt17_en_de.sh", ("en", "de")), ("prepare_wmt14_en_fr.sh", ("en", "fr"))]
)
def test_preprocessing_recipes_run_on_tiny_text(tmp_path, script, pair):
    raw = tmp_path / "raw"
    write_corpus(raw, 120, 10, pair, lo=2, hi=8)
    dest = tmp_path / "bin"
    r = _bash(script, [], RAW=raw, DEST=dest, VOCAB=30)
    assert r.returncode == 0, r.stderr
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["joint"] and meta["vocab_size"] == {pair[0]: 30, pair[1]: 30}
    assert meta["splits"]["train"][f"{pair[0]}-{pair[1]}"]["kept"] == 120 and "test" not in meta["splits"]
    r = _bash(script, [], RAW=raw, DEST=dest, VOCAB=30)  # a second run into the same directory: refused
    assert r.returncode == 2 and "already holds preprocessed data" in r.stderr.strip().splitlines()[-1], r.stderr
    assert _bash(script, [], RAW=raw, DEST=dest, VOCAB=30, OVERWRITE=1).returncode == 0
    r = _bash(script, [], RAW=tmp_path / "missing")
    assert r.returncode == 2 and "not found" in r.stderr.strip().splitlines()[-1]
