"""tools.research.study at toy size: variants x seeds, a stopped study resumes bit for bit, test BLEU / chrF as
megabranch-generate and sacreBLEU compute them, the report's means and spreads."""

import json
import os
import re
import statistics

import pytest
import sacrebleu

from megabranch import generate
from tests.helpers.corpus import preprocessed
from tests.helpers.env import one_thread
from tests.helpers.logs import records_by_step
from tools.research import study

pytestmark = pytest.mark.unit

CONFIG = """\
model: {encoder_layers: 2, decoder_layers: 2, d_model: 16, n_heads: 2, ffn_dim: 32, dropout: 0.0,
        alpha_warmup_steps: 3, max_positions: 64}
optim: {lr: 0.003, warmup_updates: 2, max_updates: 4}
data: {data_dir: '%s', max_tokens: 128}
log: {valid_interval: 2, bleu_sentences: 0}
"""


@pytest.fixture(scope="module")
def study_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("study_corpus")
    data = preprocessed(d, 60, 80, 12, extra=("--max-len", "64", "--testpref", str(d / "valid")))
    cfg = d / "base.yaml"
    cfg.write_text(CONFIG % data)
    return str(cfg), str(d / "valid.tgt")


def _argv(cfg, out, variants=("post_ln:model.residual=post_ln", "branchnorm"), seeds="1,2"):
    argv = ["--config", cfg, "--out", out, "--seeds", seeds, "--beam", "2", "--analysis-sentences", "6"]
    for v in variants:
        argv += ["--variant", v]
    return argv


def test_study_resumes_where_it_stopped_and_scores_like_generate(study_setup, tmp_path, monkeypatch, capsys):
    cfg, refs_path = study_setup
    calls = []

    def stop_at_step_3(stats):  # the first run is killed after step 3; its last checkpoint is step 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return False

    out = str(tmp_path / "stopped")
    with one_thread():
        monkeypatch.setattr(study, "stop_run", stop_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            study.main_study(study.parse_args(_argv(cfg, out)))
        monkeypatch.undo()
        assert not os.path.exists(os.path.join(out, "results", "post_ln-seed1.json"))
        study.main_study(study.parse_args(_argv(cfg, out)))
        assert "resuming from step 2" in capsys.readouterr().err
        ref_out = str(tmp_path / "straight")
        study.main_study(study.parse_args(_argv(cfg, ref_out, ["post_ln:model.residual=post_ln"], "1")))

    stopped_dir, straight_dir = (os.path.join(o, "runs", "post_ln-seed1") for o in (out, ref_out))
    steps = [json.loads(x)["step"] for x in open(os.path.join(stopped_dir, "log.jsonl")) if '"train"' in x]
    assert steps == [1, 2, 3, 3, 4]  # steps 1-2 ran once: the rerun resumed from the step-2 checkpoint
    assert records_by_step(stopped_dir, drop=("wall", "tokens_per_s")) == records_by_step(
        straight_dir, drop=("wall", "tokens_per_s")
    )
    res = {f[:-5]: json.load(open(os.path.join(out, "results", f))) for f in os.listdir(os.path.join(out, "results"))}
    assert sorted(res) == ["branchnorm-seed1", "branchnorm-seed2", "post_ln-seed1", "post_ln-seed2"]
    straight = json.load(open(os.path.join(ref_out, "results", "post_ln-seed1.json")))
    r = res["post_ln-seed1"]
    assert r["resumed_from"] == 2 and r["status"] == "ok" and r["steps_done"] == 4
    assert r["test"]["bleu"] == straight["test"]["bleu"] and r["valid"] == straight["valid"]
    assert r["config"]["model"]["residual"] == "post_ln" and res["branchnorm-seed2"]["config"]["seed"] == 2
    assert len(r["analysis"]["encoder"]["cosine"]) == 2 and r["gnorm_stats"]["n"] == 4

    # the test scores are megabranch-generate's BLEU and sacreBLEU's chrF of the same hypotheses
    hyp_file = tmp_path / "gen.hyp"
    assert (
        generate.main(["--checkpoint", os.path.join(stopped_dir, "latest"), "--beam", "2", "--output", str(hyp_file)])
        == 0
    )
    printed = float(re.search(r"^BLEU = ([0-9.]+)", capsys.readouterr().out, re.M).group(1))
    hyps = open(os.path.join(stopped_dir, "test.hyp")).read().splitlines()
    assert hyps == hyp_file.read_text().splitlines()
    assert round(r["test"]["bleu"], 2) == printed
    refs = open(refs_path).read().splitlines()
    assert r["test"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)

    # the report: mean ± sample sd over the seeds of each variant's final valid loss
    report = open(os.path.join(out, "report.md")).read()
    losses = [res[f"branchnorm-seed{s}"]["valid"]["4"]["loss"] for s in (1, 2)]
    assert (
        f"{statistics.mean(losses):.2f} ± {statistics.stdev(losses):.2f}"
        in report.split("| branchnorm |")[1].split("\n")[0]
    )
    assert "| post_ln | 1,2 | 0 |" in report and "step 2 | step 4" in report
    # the Figures 8-9 row: each column the mean over layers, then over seeds, of what its header names
    table = report.split("| variant | enc adjacent")[1].split("\n\n")[0]
    header = "| variant | enc adjacent" + table.splitlines()[0]
    row = next(ln for ln in table.splitlines() if ln.startswith("| branchnorm |"))
    cells = dict(zip(header.split(" | ")[1:5], row.split(" | ")[1:5]))
    for col, (stack, key) in {
        "enc adjacent cos": ("encoder", "cosine"),
        "dec adjacent cos": ("decoder", "cosine"),
        "enc FFN non-zero": ("encoder", "ffn_nonzero"),
        "dec FFN non-zero": ("decoder", "ffn_nonzero"),
    }.items():
        means = [statistics.mean(res[f"branchnorm-seed{s}"]["analysis"][stack][key]) for s in (1, 2)]
        assert cells[col] == f"{statistics.mean(means):.2f} ± {statistics.stdev(means):.2f}", (col, cells[col], means)
    assert os.path.getsize(os.path.join(out, "study_gnorm_loss.png")) > 1000
    assert os.path.getsize(os.path.join(out, "study_layers.png")) > 1000
    # the health monitor's profile: per layer, the median of the run's health records (all 4 steps here)
    health = [rec for rec in map(json.loads, open(os.path.join(stopped_dir, "log.jsonl"))) if rec["tag"] == "health"]
    last = {rec["step"]: rec["grad_norm"]["encoder"] for rec in health}  # the resumed steps once
    assert r["health"]["encoder"]["profile"] == pytest.approx(
        [statistics.median(g[i] for g in last.values()) for i in (0, 1)]
    )
    assert r["health"]["encoder"]["records"] == 4 and "| post_ln |" in report.split("Health monitor")[1]
    assert os.path.getsize(os.path.join(out, "study_health.png")) > 1000

    # a finished study trains nothing when run again
    mtime = os.path.getmtime(os.path.join(out, "results", "post_ln-seed1.json"))
    study.main_study(study.parse_args(_argv(cfg, out)))
    assert "4 runs, 4 already finished (skipped)" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(out, "results", "post_ln-seed1.json")) == mtime


def test_no_test_skips_decoding_only(study_setup, tmp_path):
    cfg, _ = study_setup
    out = str(tmp_path / "no_test")
    with one_thread():
        study.main_study(study.parse_args(_argv(cfg, out, ["branchnorm"], "1") + ["--no-test"]))
    r = json.load(open(os.path.join(out, "results", "branchnorm-seed1.json")))
    assert "test" not in r and r["status"] == "ok" and len(r["analysis"]["decoder"]["cosine"]) == 2
    assert not os.path.exists(os.path.join(out, "runs", "branchnorm-seed1", "test.hyp"))


def test_health_profile_applies_the_monitors_warning_rule(tmp_path):
    """Bottom / top ratios 1e-5 at steps 2-4 (three records in a row under 1e-4: the rule holds at step 4), then a
    recovery; the profile is the median of the last records."""
    bottoms = {1: 1.0, 2: 1e-5, 3: 1e-5, 4: 1e-5, 5: 1.0, 6: 0.5}
    with open(tmp_path / "log.jsonl", "w") as fh:
        for step, b in bottoms.items():
            fh.write(
                json.dumps(
                    {"tag": "health", "step": step, "grad_norm": {"encoder": [b, 0.5, 1.0], "decoder": [1.0, 1.0]}}
                )
                + "\n"
            )
    h = study.health_profile(str(tmp_path), last=3)
    assert h["encoder"]["starved_at"] == 4 and h["decoder"]["starved_at"] is None
    assert h["encoder"]["profile"] == pytest.approx([0.5, 0.5, 1.0]) and h["encoder"]["last"] == 3
    assert h["encoder"]["bottom_over_top"] == pytest.approx(0.5)
    assert study.health_profile(str(tmp_path / "none")) == {}


def test_mean_sd_and_loss_rise_hand_computed():
    assert study.mean_sd([1.0, 2.0, 4.0]) == "2.33 ± 1.53"
    assert study.mean_sd([3.0, None, float("nan")]) == "3.00" and study.mean_sd([]) == "—"
    # 10-step means 5, 5, 6 (rise 1 above the minimum 5), then 4: the largest rise is 1
    losses = [5.0] * 10 + [5.0, 15.0, -35.0]
    assert study.max_loss_rise(losses) == pytest.approx(1.0)
    assert study.plan([("a", []), ("b", ["x=1"])], [1, 2]) == [
        ("a", [], 1),
        ("b", ["x=1"], 1),
        ("a", [], 2),
        ("b", ["x=1"], 2),
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variant", "bad name"], "the name must be letters"),
        (["--variant", "a:model.residual"], "is not KEY=VALUE"),
        (["--variant", "a", "--variant", "a"], "names must differ"),
        (["--variant", "a", "--seeds", "1,x"], "expected comma-separated integers"),
        ([], "give at least one"),
        (["--variant", "a:model.residual=postln"], "model.residual='postln' is invalid"),
    ],
)
def test_study_user_errors_are_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        study.main(argv + ["--out", str(tmp_path), "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
