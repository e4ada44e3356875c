"""tools/plot_logs.py: reads log.jsonl (train/valid tags, NaN from a diverged run, junk lines) and writes a PNG."""

import json
import math
import os

import pytest

from tests.helpers.env import load_tool

pytestmark = pytest.mark.unit

plot_logs = load_tool("plot_logs")


def _write(path, records, junk=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        if junk:
            fh.write("{not json\n")


def test_read_log_keeps_the_tag_and_nan(tmp_path, capsys):
    path = str(tmp_path / "post_ln" / "log.jsonl")
    _write(path, [{"tag": "train", "step": 1, "loss": 9.0}, {"tag": "valid", "step": 1, "loss": 8.5},
                  {"tag": "train", "step": 2, "loss": float("nan")}], junk=True)
    rows = plot_logs.read_log(path)
    assert [r["step"] for r in rows] == [1, 2]
    assert math.isnan(rows[1]["loss"])
    assert [r["loss"] for r in plot_logs.read_log(path, "valid")] == [8.5]
    assert "is not JSON; skipped" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path):
    a, b = str(tmp_path / "a" / "log.jsonl"), str(tmp_path / "b" / "log.jsonl")
    _write(a, [{"step": s, "loss": 10.0 / s, "gnorm": 1.0 + s} for s in range(1, 6)])
    _write(b, [{"step": 1, "loss": 9.0, "gnorm": 2.0}, {"step": 2, "loss": float("nan"), "gnorm": float("inf")}])
    out = plot_logs.plot([a, b], ["a", "b"], ["loss", "gnorm"], str(tmp_path / "out" / "curves.png"))
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_log_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="log file not found"):
        plot_logs.read_log(str(tmp_path / "nope.jsonl"))
