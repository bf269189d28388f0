"""Typed configs: defaults <- YAML <- overrides, field-naming errors, built-in experiments, hashing."""
import dataclasses
from importlib import resources

import pytest
import yaml

from ucmkd.cli import builtin_experiments, experiment_path
from ucmkd.config import (DataConfig, ExperimentConfig, MethodConfig, OptimConfig, PairingConfig, RunConfig,
                          SyntheticConfig, config_hash, deep_merge, from_dict, load_config, parse_overrides,
                          save_config)
from ucmkd.errors import ConfigError
from ucmkd.experiment import apply_quick, run_config_for, validate_experiment
from ucmkd.methods import METHODS


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# --------------------------------------------------------------------------- merging
def test_defaults_yaml_overrides_merge(tmp_path):
    p = write_yaml(tmp_path / "run.yaml", """
optim:
  lr: 0.001
  epochs: 5
method:
  name: ce
pairing:
  mode: unpaired
  label_budget: 5
data:
  student: synthetic/b
  synthetic: {n_items: 500, noise: 1}
seed: 3
""")
    cfg = load_config(RunConfig, p, ["optim.lr=0.01", "method.name=kd", "pairing.label_budget=null"])
    assert isinstance(cfg, RunConfig)
    # overrides win over the YAML
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.method.name == "kd"
    assert cfg.pairing.label_budget is None
    # the YAML wins over the defaults
    assert cfg.optim.epochs == 5 and isinstance(cfg.optim.epochs, int)
    assert cfg.pairing.mode == "unpaired"
    assert cfg.seed == 3
    assert cfg.data.student == "synthetic/b"
    assert isinstance(cfg.data.synthetic, SyntheticConfig)
    assert cfg.data.synthetic.n_items == 500
    assert cfg.data.synthetic.noise == 1.0 and isinstance(cfg.data.synthetic.noise, float)
    # untouched fields keep their defaults, also inside partially given sections
    assert cfg.optim.batch_size == OptimConfig().batch_size
    assert cfg.data.teacher == DataConfig().teacher
    assert cfg.data.synthetic.dim_b == SyntheticConfig().dim_b
    assert cfg.model == RunConfig().model
    assert cfg.method.params == {}


def test_overrides_without_yaml_and_types():
    cfg = load_config(RunConfig, None, ["optim.lr=1", "optim.epochs=3.0", "pairing.mismatch_ratio=0.5",
                                        "method.params.w_fa=0.5", "method.params.metric=l2", "threads=2",
                                        "data.cache_dir=/tmp/x", "optim.steps_per_epoch=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 3 and isinstance(cfg.optim.epochs, int)
    assert cfg.pairing.mismatch_ratio == 0.5
    assert cfg.method.params == {"w_fa": 0.5, "metric": "l2"}
    assert cfg.threads == 2
    assert cfg.data.cache_dir == "/tmp/x"
    assert cfg.optim.steps_per_epoch is None
    assert load_config(RunConfig) == RunConfig()


def test_later_override_wins():
    cfg = load_config(RunConfig, None, ["optim.lr=0.1", "optim.lr=0.2"])
    assert cfg.optim.lr == 0.2


def test_base_dict_layer(tmp_path):
    p = write_yaml(tmp_path / "r.yaml", {"optim": {"epochs": 7}})
    cfg = load_config(RunConfig, p, ["seed=4"], base={"optim": {"epochs": 1, "lr": 0.5}, "seed": 1})
    assert cfg.optim.epochs == 7 and cfg.optim.lr == 0.5 and cfg.seed == 4


def test_parse_overrides_and_deep_merge():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x=y", "e="]) == \
        {"a": {"b": 1, "c": [1, 2]}, "d": "x=y", "e": ""}
    assert deep_merge({"a": {"b": 1, "c": 2}, "z": 0}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}, "z": 0}
    base = {"a": {"b": 1}}
    deep_merge(base, {"a": {"b": 2}})
    assert base == {"a": {"b": 1}}, "deep_merge modified its input"


# --------------------------------------------------------------------------- errors
def test_unknown_yaml_field_names_path_and_file(tmp_path):
    p = write_yaml(tmp_path / "typo.yaml", {"optim": {"lrr": 1}})
    with pytest.raises(ConfigError) as ei:
        load_config(RunConfig, p)
    msg = str(ei.value)
    assert "optim.lrr" in msg
    assert str(p) in msg
    assert "lr" in msg.split("known fields")[-1]  # it lists the valid fields


def test_unknown_top_level_and_nested_fields(tmp_path):
    with pytest.raises(ConfigError, match="'sead'"):
        load_config(RunConfig, None, ["sead=1"])
    with pytest.raises(ConfigError, match="data.synthetic.n_item"):
        load_config(RunConfig, None, ["data.synthetic.n_item=10"])


def test_wrong_type_names_field():
    with pytest.raises(ConfigError) as ei:
        load_config(RunConfig, None, ["optim.epochs=abc"])
    assert "optim.epochs" in str(ei.value) and "abc" in str(ei.value)


@pytest.mark.parametrize("override,field", [
    ("optim.lr=fast", "optim.lr"),
    ("optim.epochs=2.5", "optim.epochs"),
    ("optim.epochs=true", "optim.epochs"),
    ("pairing.label_budget=some", "pairing.label_budget"),
    ("data.teacher=3", "data.teacher"),
    ("method.params=[1]", "method.params"),
    ("data.synthetic=5", "data.synthetic"),
    ("optim=3", "optim"),
])
def test_wrong_types(override, field):
    with pytest.raises(ConfigError) as ei:
        load_config(RunConfig, None, [override])
    assert field in str(ei.value)


def test_wrong_type_in_yaml_names_field_and_file(tmp_path):
    p = write_yaml(tmp_path / "t.yaml", {"optim": {"batch_size": "big"}})
    with pytest.raises(ConfigError) as ei:
        load_config(RunConfig, p)
    assert "optim.batch_size" in str(ei.value) and str(p) in str(ei.value)


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim.lr=[1,"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError) as ei:
        load_config(RunConfig, None, [bad])
    assert bad in str(ei.value)


def test_missing_yaml_file(tmp_path):
    p = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(RunConfig, p)
    assert str(p) in str(ei.value)


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", "optim: [1, 2\n")
    with pytest.raises(ConfigError) as ei:
        load_config(RunConfig, bad)
    assert str(bad) in str(ei.value)
    lst = write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(RunConfig, lst)


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(RunConfig, write_yaml(tmp_path / "empty.yaml", "")) == RunConfig()


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        from_dict(OptimConfig, {"lr": "x"})


# --------------------------------------------------------------------------- built-in experiments
def test_builtin_experiments_listed():
    names = builtin_experiments()
    assert {"digits", "synthetic"} <= set(names)
    on_disk = sorted(p.name[:-5] for p in resources.files("ucmkd.configs").iterdir() if p.name.endswith(".yaml"))
    assert names == on_disk


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_builtin_experiment_yaml_loads(name):
    exp = load_config(ExperimentConfig, experiment_path(name))
    assert isinstance(exp, ExperimentConfig)
    assert exp.name == name
    assert isinstance(exp.base, RunConfig)
    variants = getattr(exp, "variants", {}) or {}   # labels standing for a method + overrides
    assert exp.methods and all(m in METHODS or m in variants for m in exp.methods)
    assert exp.seeds and exp.directions
    validate_experiment(exp)
    if name == "synthetic":
        assert ["synthetic/a", "synthetic/b"] in exp.directions
    else:
        assert ["digits/image", "digits/signal"] in exp.directions
    cfg = run_config_for(exp, *exp.directions[0], "kd", exp.seeds[-1])
    assert isinstance(cfg, RunConfig)
    assert (cfg.data.teacher, cfg.data.student) == tuple(exp.directions[0])
    assert cfg.method.name == "kd" and cfg.seed == exp.seeds[-1]
    assert exp.base.method.name == "ce", "run_config_for modified the experiment's base config"


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_apply_quick_is_smaller(name):
    exp = load_config(ExperimentConfig, experiment_path(name))
    assert exp.quick
    q = apply_quick(exp)
    assert isinstance(q, ExperimentConfig)
    assert len(q.seeds) < len(exp.seeds)
    assert q.base.optim.epochs < exp.base.optim.epochs
    assert q.base.teacher.epochs < exp.base.teacher.epochs
    assert q.out_dir != exp.out_dir
    assert q.quick == {}
    assert q.methods == exp.methods and q.directions == exp.directions
    assert q.base.pairing == exp.base.pairing
    assert apply_quick(q) == q
    # the quick overrides compose with command-line overrides of other fields
    exp2 = load_config(ExperimentConfig, experiment_path(name), ["base.optim.lr=0.01"])
    assert apply_quick(exp2).base.optim.lr == 0.01


def test_unknown_field_in_quick_is_an_error():
    exp = dataclasses.replace(ExperimentConfig(), quick={"base.optim.epochz": 1})
    with pytest.raises(ConfigError, match="epochz"):
        apply_quick(exp)


def test_validate_experiment_errors():
    with pytest.raises(ConfigError, match="nope"):
        validate_experiment(ExperimentConfig(methods=["ce", "nope"]))
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        validate_experiment(ExperimentConfig(methods=["ce"], method_params={"nope": {}}))
    validate_experiment(ExperimentConfig(methods=["ce"], method_params={"kd": {}}))  # outside the grid: fine
    with pytest.raises(ConfigError, match="method.params.bogus"):
        validate_experiment(ExperimentConfig(methods=["kd"], method_params={"kd": {"bogus": 1}}))
    with pytest.raises(ConfigError, match="directions"):
        validate_experiment(ExperimentConfig(directions=[["digits/image"]]))
    with pytest.raises(ConfigError, match="seeds"):
        validate_experiment(ExperimentConfig(seeds=[]))


# --------------------------------------------------------------------------- hashing / saving
def test_config_hash_stable_and_sensitive():
    a = {"x": 1, "y": {"p": 2, "q": [1, 2]}}
    b = {"y": {"q": [1, 2], "p": 2}, "x": 1}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 10 and len(config_hash(a, n=16)) == 16
    assert config_hash(RunConfig()) == config_hash(RunConfig())
    assert config_hash(RunConfig()) == config_hash(dataclasses.asdict(RunConfig()))
    base = config_hash(RunConfig())
    assert config_hash(RunConfig(seed=1)) != base
    assert config_hash(RunConfig(optim=OptimConfig(lr=1e-2))) != base
    assert config_hash(RunConfig(data=DataConfig(synthetic=SyntheticConfig(noise=0.6)))) != base
    assert config_hash(RunConfig(method=MethodConfig(params={"w_fa": 1.0}))) != base


def test_config_hash_known_value():
    """The hash must not depend on the process (no id()/random salt): fixed input, fixed output."""
    import hashlib
    import json

    d = {"b": 1, "a": [1, 2]}
    assert config_hash(d) == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def test_save_config_round_trip(tmp_path):
    cfg = RunConfig(
        data=DataConfig(student="synthetic/b", teacher="synthetic/a", cache_dir=str(tmp_path),
                        synthetic=SyntheticConfig(n_items=321, noise=0.25, distractors=3)),
        pairing=PairingConfig(mode="unpaired", label_budget=None, mismatch_ratio=0.4, shift_level=0.3),
        optim=OptimConfig(lr=1e-4, steps_per_epoch=None),
        method=MethodConfig(name="ucmkd-joint", params={"metric": "l2", "w_fa": 0.5}),
        seed=11, threads=2)
    p = tmp_path / "cfg.yaml"
    save_config(cfg, p)
    back = load_config(RunConfig, p)
    assert back == cfg
    assert config_hash(back) == config_hash(cfg)
    assert yaml.safe_load(p.read_text())["optim"]["lr"] == 1e-4       # YAML writes the float's repr


def test_save_config_round_trip_experiment(tmp_path):
    exp = load_config(ExperimentConfig, experiment_path("synthetic"))
    p = tmp_path / "exp.yaml"
    save_config(exp, p)
    assert load_config(ExperimentConfig, p) == exp


def test_from_dict_accepts_dataclass_and_none():
    assert from_dict(OptimConfig, None) == OptimConfig()
    assert from_dict(OptimConfig, OptimConfig(lr=0.5)) == OptimConfig(lr=0.5)


def test_nest_and_override_conflicts():
    from ucmkd.config import nest

    assert nest({"optim.lr": 0.1, "seeds": [0]}) == {"optim": {"lr": 0.1}, "seeds": [0]}
    for items in (["a=1", "a.b=2"], ["a.b=2", "a=1"]):
        with pytest.raises(ConfigError, match="conflicts"):
            parse_overrides(items)
    with pytest.raises(ConfigError, match="empty"):
        parse_overrides(["optim..lr=1"])


def test_exponent_without_dot_is_a_float():
    cfg = load_config(RunConfig, overrides=["optim.lr=1e-4", "optim.min_lr=5E-7"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.min_lr == 5e-7
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(RunConfig, overrides=["optim.lr=fast"])
