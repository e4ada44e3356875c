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
        (["model.deepnorm_beta=fairseq"], "model.deepnorm_beta='fairseq' is invalid: must be paper or torchscale"),
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


def _bad_values(rng) -> list:
    """Values just outside `rng` (and the non-finite ones, which no field accepts)."""
    bad = [float("inf"), float("-inf"), float("nan")]
    step = 1 if rng.integer else 1e-3
    if rng.lo is not None:
        bad.append(rng.lo if rng.lo_open else rng.lo - step)
    if rng.hi is not None:
        bad.append(rng.hi if rng.hi_open else rng.hi + step)
    return bad


def test_every_numeric_field_rejects_non_finite_and_out_of_range_values(tmp_path):
    """Walks every int / float / tuple field of the config: each has a range, its default is inside it, and every
    value outside it (inf, -inf, nan, just below / above) is one line naming the field and --set."""
    from megabranch.config import RANGES, Config, numeric_fields

    fields = dict(numeric_fields(Config()))
    assert set(fields) == set(RANGES), f"fields without a range: {set(fields) - set(RANGES)}; ranges without a " \
                                       f"field: {set(RANGES) - set(fields)}"
    for key, default in fields.items():
        rng = RANGES[key]
        for v in default if isinstance(default, tuple) else (() if default is None else (default,)):
            assert rng.ok(float(v)), f"{key}: the default {default} is outside its own range"
        for bad in _bad_values(rng):
            value = f"[{bad}, {default[1]}]" if isinstance(default, tuple) else repr(bad)
            value = value.replace("inf", ".inf").replace("nan", ".nan")  # YAML's spelling (what --set parses)
            with pytest.raises(UserError) as e:
                load_config(None, [f"{key}={value}"])
            msg = str(e.value)
            assert msg.startswith("--set") and key in msg and "\n" not in msg, (key, value, msg)
    # the same from a file names the file
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(UserError, match=f"^{path}: optim.lr=nan is invalid: must be a finite number > 0$"):
        load_config(str(path))


@pytest.mark.parametrize("name", ["demo", "deep100", "translate", "en_es_depth_study", "multilingual_demo"])
def test_shipped_configs_load_and_say_what_the_readme_says(name):
    """The configs users start from load, validate, and keep the settings their comments and the README state."""
    import os

    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{name}.yaml"))
    m = cfg.model
    o = cfg.optim
    if name == "translate":  # the demo's 6L-6L model and optimizer on the real pair
        assert (m.residual, m.encoder_layers, m.decoder_layers, m.d_model, m.dropout) == ("branchnorm", 6, 6, 64, 0.0)
        assert (o.lr, o.warmup_updates, o.clip_norm, o.max_updates) == (0.002, 400, 1.0, 7000)
        assert cfg.data.data_dir == "data-bin/en_es"
    if name == "en_es_depth_study":  # the sweep's setting under which the encoders keep learning
        assert (m.residual, m.encoder_layers, m.decoder_layers, m.alpha_warmup_steps) == ("branchnorm", 18, 18, 800)
        assert (o.lr, o.warmup_updates, o.clip_norm, o.max_updates) == (0.001, 400, 1.0, 2000)
        assert cfg.data.data_dir == "data-bin/en_es"
    if name == "multilingual_demo":
        assert cfg.data.data_dir == "data-bin/en_es_multi" and (m.encoder_layers, m.decoder_layers) == (6, 6)


@pytest.mark.unit
def test_a_command_line_number_follows_the_config_fields_rule_and_wording():
    from megabranch.config import Range

    count, minutes = Range(lo=1, integer=True), Range(lo=0, lo_open=True)
    count.check_flag("--beam", 4)
    count.check_flag("--beam", None)  # not given
    minutes.check_flag("--exit-duration-mins", 0.5, " (minutes)")
    for rule, value, want in ((count, 0, "--beam 0 is invalid: must be an integer >= 1"),
                              (count, 2.5, "--beam 2.5 is invalid: must be an integer >= 1"),
                              (count, -12345678, "--beam -12345678 is invalid: must be an integer >= 1"),
                              (minutes, float("nan"), "--exit-duration-mins nan is invalid: must be a finite number > 0 (minutes)"),
                              (minutes, 0, "--exit-duration-mins 0 is invalid: must be a finite number > 0 (minutes)"),
                              (Range(), float("inf"), "--lenpen inf is invalid: must be a finite number")):
        flag = want.split()[0]
        with pytest.raises(UserError) as e:
            rule.check_flag(flag, value, " (minutes)" if rule is minutes else "")
        assert str(e.value) == want
