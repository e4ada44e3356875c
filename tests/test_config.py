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
        (["model.deepnorm_beta=fairseq"], "model.deepnorm_beta='fairseq' is invalid: must be one of paper, torchscale"),
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
    """Walks every int / float / tuple field of the config: each declares a range, its default is inside it, and
    every value outside it (inf, -inf, nan, just below / above) is one line naming the field and --set."""
    from megabranch.config import Config, Range, settings

    numeric = [
        s
        for s in settings(Config())
        if s.value is None
        and isinstance(s.rule, Range)
        or isinstance(s.value, (int, float, tuple))
        and not isinstance(s.value, bool)
    ]
    assert len(numeric) == 39
    for key, default, rng, _ in numeric:
        assert isinstance(rng, Range), f"{key}: a number without a range ({rng})"
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


def test_every_field_declares_its_rule_once_with_a_docstring():
    """Each field of every section is one declaration: type, default and rule (`setting(...)`), then a docstring
    (read from the source, as Sphinx would); a name field's bad value is refused naming the valid ones."""
    import ast
    import dataclasses
    import inspect

    from megabranch import config
    from megabranch.config import Choice, Config, Flag, Range, Text, settings

    tree = ast.parse(inspect.getsource(config))
    sections = [type(Config())] + [
        type(getattr(Config(), f.name))
        for f in dataclasses.fields(Config)
        if dataclasses.is_dataclass(getattr(Config(), f.name))
    ]
    for cls in sections:
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        body = node.body
        for i, stmt in enumerate(body):
            if not isinstance(stmt, ast.AnnAssign):
                continue
            doc = body[i + 1] if i + 1 < len(body) else None
            assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and doc.value.value.strip(), (
                f"{cls.__name__}.{stmt.target.id} has no docstring under it"
            )
    kinds = {bool: Flag, str: (Choice, Text), int: Range, float: Range, tuple: Range}
    for s in settings(Config()):
        if s.value is not None:
            assert isinstance(s.rule, kinds[type(s.value)]), (s.key, s.rule)
            assert s.rule.ok(s.value), f"{s.key}: the default {s.value!r} breaks its own rule"
        if isinstance(s.rule, Choice):
            with pytest.raises(
                UserError, match=f"^--set {s.key}='nope' is invalid: must be one of {', '.join(s.rule.names)}$"
            ):
                load_config(None, [f"{s.key}=nope"])


@pytest.mark.parametrize(
    "where, text, needle",
    [
        ("--set", "log.save_dir=", "--set: log.save_dir is empty: must be a non-empty path"),
        ("--set", "model.d_model=", "--set: model.d_model is empty: must be an integer >= 1"),
        ("--set", "data.data_dir=null", "--set: data.data_dir is empty: must be a non-empty path"),
        ("--set", "log.tensorboard=", "--set: log.tensorboard is empty: must be true or false"),
        ("--set", "optim.betas=~", "--set: optim.betas is empty: must be a finite number in [0, 1) (each)"),
        ("--set", "data.data_dir=''", "--set data.data_dir='' is invalid: must be a non-empty path"),
        ("file", "data:\n  data_dir: null\n", "c.yaml: data.data_dir is empty: must be a non-empty path"),
        ("file", "log:\n  save_dir: ''\n", "c.yaml: log.save_dir='' is invalid: must be a non-empty path"),
        ("file", "model:\n  n_heads:\n", "c.yaml: model.n_heads is empty: must be an integer >= 1"),
    ],
)
def test_an_empty_or_null_value_is_one_line_naming_the_field(tmp_path, where, text, needle):
    """Red before the loader checked it: the None went through (every check skipped it) and a TypeError came
    from the first caller that used the value."""
    path = tmp_path / "c.yaml"
    if where == "file":
        path.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(str(path), []) if where == "file" else load_config(None, [text])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_null_means_unset_for_optional_fields_and_empty_for_a_layout():
    from megabranch.config import Config, settings

    cfg = load_config(None, ["model.embed_scale=2", "model.embed_scale=", "parallel.layout=", "model.deepnorm_init=~"])
    assert (cfg.model.embed_scale, cfg.parallel.layout, cfg.model.deepnorm_init) == (None, "", None)
    for s in settings(Config()):  # every other field refuses an empty value, naming itself
        if not s.optional and s.key != "parallel.layout":
            with pytest.raises(UserError, match=f"^--set: {s.key} is empty: must be "):
                load_config(None, [f"{s.key}="])


def test_cli_refuses_an_empty_value_in_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "megabranch.train", "--set", "log.save_dir=", "--print-config"],
        capture_output=True,
        text=True,
    )
    assert (
        p.returncode == 2
        and p.stderr.strip() == "megabranch-train: error: --set: log.save_dir is empty: must be a non-empty path"
    ), p.stderr


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
    for rule, value, want in (
        (count, 0, "--beam 0 is invalid: must be an integer >= 1"),
        (count, 2.5, "--beam 2.5 is invalid: must be an integer >= 1"),
        (count, -12345678, "--beam -12345678 is invalid: must be an integer >= 1"),
        (minutes, float("nan"), "--exit-duration-mins nan is invalid: must be a finite number > 0 (minutes)"),
        (minutes, 0, "--exit-duration-mins 0 is invalid: must be a finite number > 0 (minutes)"),
        (Range(), float("inf"), "--lenpen inf is invalid: must be a finite number"),
    ):
        flag = want.split()[0]
        with pytest.raises(UserError) as e:
            rule.check_flag(flag, value, " (minutes)" if rule is minutes else "")
        assert str(e.value) == want
