"""Reading log.jsonl (megabranch.metrics.read_log: train/valid tags, NaN from a diverged run, junk lines, a resumed
run as one curve) and plotting it (tools.research.plot_logs)."""

import json
import math
import os

import pytest

from megabranch.errors import UserError
from megabranch.metrics import read_log
from tools.research import plot_logs

pytestmark = pytest.mark.unit


def _write(path, records, junk=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        if junk:
            fh.write("{not json\n")


def test_read_log_keeps_the_tag_and_nan(tmp_path, capsys):
    path = str(tmp_path / "post_ln" / "log.jsonl")
    _write(
        path,
        [
            {"tag": "train", "step": 1, "loss": 9.0},
            {"tag": "valid", "step": 1, "loss": 8.5},
            {"tag": "train", "step": 2, "loss": float("nan")},
        ],
        junk=True,
    )
    rows = read_log(path)
    assert [r["step"] for r in rows] == [1, 2]
    assert math.isnan(rows[1]["loss"])
    assert [r["loss"] for r in read_log(path, "valid")] == [8.5]
    assert "is not JSON; skipped" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path):
    a, b = str(tmp_path / "a" / "log.jsonl"), str(tmp_path / "b" / "log.jsonl")
    _write(a, [{"step": s, "loss": 10.0 / s, "gnorm": 1.0 + s} for s in range(1, 6)])
    _write(b, [{"step": 1, "loss": 9.0, "gnorm": 2.0}, {"step": 2, "loss": float("nan"), "gnorm": float("inf")}])
    out = plot_logs.plot([a, b], ["a", "b"], ["loss", "gnorm"], str(tmp_path / "out" / "curves.png"))
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_health_heatmaps_are_drawn_and_a_log_without_them_is_a_one_line_error(tmp_path, capsys):
    path = str(tmp_path / "deep" / "log.jsonl")
    _write(
        path,
        [
            {
                "tag": "health",
                "step": s,
                "grad_norm": {"encoder": [10.0**-s, 1.0], "decoder": [0.5, 0.4, 0.3], "encoder.embed": 2.0},
                "update_ratio": {"encoder": [1e-3, 1e-3], "decoder": [1e-3, 2e-3, 0.0]},
            }
            for s in (10, 20)
        ],
    )
    assert plot_logs.main([path, "--health", "--out", str(tmp_path / "h.png")]) == 0
    with open(tmp_path / "h.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    plain = str(tmp_path / "plain" / "log.jsonl")
    _write(plain, [{"step": 1, "loss": 9.0}])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        plot_logs.main([plain, "--health", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "holds no health records" in capsys.readouterr().err


def test_missing_log_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="log file not found"):
        read_log(str(tmp_path / "nope.jsonl"))
    with pytest.raises(SystemExit) as e:
        plot_logs.main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "c.png")])
    assert e.value.code == 2


def _strict(line: str) -> dict:
    """json.loads that refuses NaN / Infinity, as every JSON reader but Python's does."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_log_is_strict_json_and_a_resumed_run_is_one_curve(tmp_path):
    from megabranch.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path / "run"), 10, tensorboard=False, progress="none")
    logger.log({"step": 0, "resumed": False}, tag="start", echo=False)
    for s in (1, 2, 3, 4):
        logger.log({"step": s, "loss": 10.0 - s, "gnorm": float("inf") if s == 3 else 1.0})
    logger.log({"step": 2, "resumed": True}, tag="start", echo=False)  # resumed from step 2: 3 and 4 replayed
    for s in (3, 4, 5):
        logger.log({"step": s, "loss": 20.0 - s, "gnorm": float("nan") if s == 5 else 2.0})
    logger.close()
    path = str(tmp_path / "run" / "log.jsonl")
    records = [_strict(line) for line in open(path)]
    assert [r.get("gnorm", "-") for r in records if r["tag"] == "train"] == [1.0, 1.0, None, 1.0, 2.0, 2.0, None]
    rows = read_log(path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0), (5, 15.0)]
    out = plot_logs.plot([path], ["run"], ["loss", "gnorm"], str(tmp_path / "curves.png"))
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
