"""Configs: typed loading, overrides, and one-line errors for bad keys and values."""

import json
import subprocess
import sys

import pytest

from megabranch.config import load_config
from megabranch.errors import UserError

pytestmark = pytest.mark.unit


def test_yaml_json_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  encoder_layers: 12\n  residual: deepnorm\noptim:\n  betas: [0.9, 0.99]\n")
    cfg = load_config(str(y), ["model.d_model=256", "optim.lr=1e-3", "log.tensorboard=false"])
    assert (cfg.model.encoder_layers, cfg.model.residual, cfg.model.d_model) == (12, "deepnorm", 256)
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.99) and cfg.log.tensorboard is False
    j = tmp_path / "c.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert load_config(str(j)).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.encoder_layer=3"], "unknown config key model.encoder_layer"),
        (["model.encoder_layers=0"], "model.encoder_layers=0 is invalid"),
        (["model.residual=postln"], "model.residual='postln' is invalid"),
        (["model.n_heads=3"], "model.n_heads=3 is invalid: must be a divisor of model.d_model=512"),
        (["model.dropout=1.5"], "model.dropout=1.5"),
        (["optim.lr=fast"], "optim.lr='fast' is not a valid float"),
        (["model=3"], "section model must be a mapping"),
        (["noequals"], "expected key=value"),
    ],
)
def test_bad_config_is_one_line_user_error(overrides, needle):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_reports_user_errors_without_traceback(tmp_path):
    for args, needle in [
        (["--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["--set", "model.decoder_layers=0"], "model.decoder_layers=0 is invalid"),
    ]:
        p = subprocess.run([sys.executable, "-m", "megabranch.train", *args], capture_output=True, text=True)
        assert p.returncode == 2, p.stderr
        assert needle in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
