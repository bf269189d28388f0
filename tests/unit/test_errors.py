"""The user-facing error contract: every failure is a ConfigError/DataError naming what is at
fault, and the CLI turns it into exit code 2 with the message on stderr."""
import numpy as np
import pytest
import torch

from ucmkd.api import run
from ucmkd.cli import builtin_experiments, main
from ucmkd.config import DataConfig, ModelConfig, RunConfig, SyntheticConfig, load_config
from ucmkd.data import load_modality
from ucmkd.engine import load_checkpoint, load_teacher, save_checkpoint
from ucmkd.engine.teacher import build_teacher_model
from ucmkd.errors import ConfigError, DataError, UcmkdError
from ucmkd.losses.ot import FeatureAlignmentLoss
from ucmkd.methods import METHODS, build_distiller
from ucmkd.models import build_classifier


@pytest.fixture
def small_data(tmp_path):
    return DataConfig(mnist1d_samples=600, cache_dir=str(tmp_path / "cache"),
                      synthetic=SyntheticConfig(n_items=200))


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_error_hierarchy():
    assert issubclass(ConfigError, UcmkdError) and issubclass(DataError, UcmkdError)
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- unknown names
def test_unknown_dataset_lists_known(small_data):
    with pytest.raises(ConfigError) as ei:
        load_modality("nope/x", small_data)
    msg = str(ei.value)
    assert "nope/x" in msg
    for known in ("digits/image", "digits/signal", "synthetic/a", "synthetic/b"):
        assert known in msg


def test_cli_unknown_dataset(capsys, tmp_path):
    code, out, err = cli(capsys, "train", "--no-progress", "data.student=nope/x",
                         f"data.cache_dir={tmp_path}")
    assert code == 2
    assert "nope/x" in err and "digits/image" in err
    assert err.startswith("ucmkd: error:")
    assert "Traceback" not in err


def test_unknown_method():
    with pytest.raises(ConfigError) as ei:
        run(load_config(RunConfig, None, ["method.name=nope"]))
    assert "'nope'" in str(ei.value)
    for m in ("ce", "kd", "ucmkd-joint"):
        assert m in str(ei.value)


def test_cli_unknown_method(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "method.name=nope", f"data.cache_dir={tmp_path}")
    assert code == 2 and "nope" in err and "method" in err


def test_unknown_ot_metric_in_loss():
    with pytest.raises(ConfigError) as ei:
        FeatureAlignmentLoss(metric="l3")
    assert "l3" in str(ei.value) and "cosine" in str(ei.value)


def test_unknown_ot_metric_via_method_params():
    teacher = build_classifier((1, 8, 8), "image", 10, width=4, feat_dim=8)
    student = build_classifier((1, 40), "signal", 10, width=4, feat_dim=8)
    with pytest.raises(ConfigError) as ei:
        build_distiller("ucmkd-joint", student, teacher, {"metric": "l3"})
    assert "l3" in str(ei.value)
    # the same through config overrides (validated before any data is loaded)
    cfg = load_config(RunConfig, None, ["method.name=ucmkd-joint", "method.params.metric=l3"])
    with pytest.raises(ConfigError, match="l3"):
        build_distiller(cfg.method.name, student, teacher, cfg.method.params)


def test_unknown_method_param(tmp_path):
    cfg = load_config(RunConfig, None, ["method.name=kd", "method.params.foo=1",
                                        f"data.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError) as ei:
        run(cfg)
    assert "method.params.foo" in str(ei.value)
    with pytest.raises(ConfigError, match="method.params.foo"):
        METHODS.get("ucmkd-joint").parse_params({"foo": 1})


def test_wrong_method_param_type():
    with pytest.raises(ConfigError, match="method.params.w_fa"):
        METHODS.get("ucmkd-joint").parse_params({"w_fa": "lots"})


def test_cli_unknown_method_param(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "method.params.foo=1", f"data.cache_dir={tmp_path}")
    assert code == 2 and "method.params.foo" in err


def test_cli_bad_override_and_unknown_field(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "optim.lr")
    assert code == 2 and "optim.lr" in err
    code, _, err = cli(capsys, "train", "optim.lrr=1")
    assert code == 2 and "optim.lrr" in err
    missing = tmp_path / "nope.yaml"
    code, _, err = cli(capsys, "train", "--config", str(missing))
    assert code == 2 and str(missing) in err


# --------------------------------------------------------------------------- label sets
def test_label_sets_differ_between_modalities(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    pa = tmp_path / "student.npz"
    pb = tmp_path / "teacher.npz"
    np.savez(pa, x=rng.normal(size=(60, 4)).astype(np.float32), y=y, classes=np.array(["cat", "dog", "fox"]))
    np.savez(pb, x=rng.normal(size=(60, 6)).astype(np.float32), y=y, classes=np.array(["cat", "dog", "owl"]))
    cfg = load_config(RunConfig, None, [f"data.student=npz:{pa}", f"data.teacher=npz:{pb}",
                                        f"data.cache_dir={tmp_path}", "method.name=kd"])
    with pytest.raises(DataError) as ei:
        run(cfg)
    msg = str(ei.value)
    assert f"npz:{pa}" in msg and f"npz:{pb}" in msg
    assert "fox" in msg and "owl" in msg
    # a teacher-free method still loads the pair, and still refuses
    cfg.method.name = "ce"
    with pytest.raises(DataError, match="label sets differ"):
        run(cfg)


# --------------------------------------------------------------------------- checkpoints
def test_missing_checkpoint(tmp_path):
    p = tmp_path / "nope.pt"
    with pytest.raises(DataError) as ei:
        load_checkpoint(p)
    assert str(p) in str(ei.value)


def test_unreadable_checkpoint(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"not a torch file")
    with pytest.raises(DataError) as ei:
        load_checkpoint(p)
    assert str(p) in str(ei.value)


def test_checkpoint_round_trip(tmp_path):
    p = tmp_path / "sub" / "ck.pt"
    save_checkpoint({"a": torch.arange(3), "b": "x"}, p)
    st = load_checkpoint(p)
    assert torch.equal(st["a"], torch.arange(3)) and st["b"] == "x"
    assert not list(p.parent.glob("*.tmp"))


@pytest.fixture
def teacher_setup(small_data):
    cfg = RunConfig(data=small_data, model=ModelConfig(teacher_width=8, teacher_feat_dim=8))
    data = load_modality("synthetic/a", small_data)
    return cfg, data


def test_load_teacher_missing_file(tmp_path, teacher_setup):
    cfg, data = teacher_setup
    p = tmp_path / "nope.pt"
    with pytest.raises(DataError) as ei:
        load_teacher(p, cfg, data)
    assert str(p) in str(ei.value)


def test_load_teacher_round_trip(tmp_path, teacher_setup):
    cfg, data = teacher_setup
    model = build_teacher_model(cfg, data)
    p = tmp_path / "teacher.pt"
    save_checkpoint({"model": model.state_dict(), "info": {"test_acc": 0.5}}, p)
    loaded, info = load_teacher(p, cfg, data)
    assert info == {"test_acc": 0.5}
    assert not loaded.training
    assert not any(q.requires_grad for q in loaded.parameters())
    x = data.x[:4]
    assert torch.equal(loaded(x), model.eval()(x))          # the same weights: the same bits


def test_load_teacher_wrong_width(tmp_path, teacher_setup):
    cfg, data = teacher_setup
    wide = RunConfig(data=cfg.data, model=ModelConfig(teacher_width=16, teacher_feat_dim=8))
    p = tmp_path / "teacher.pt"
    save_checkpoint({"model": build_teacher_model(wide, data).state_dict(), "info": {}}, p)
    with pytest.raises(DataError) as ei:
        load_teacher(p, cfg, data)
    assert str(p) in str(ei.value)
    assert "do not fit" in str(ei.value)


def test_load_teacher_other_modality(tmp_path, small_data, teacher_setup):
    """A teacher trained on another modality (other input size) does not fit either."""
    cfg, data = teacher_setup
    other = load_modality("synthetic/b", small_data)
    p = tmp_path / "teacher.pt"
    save_checkpoint({"model": build_teacher_model(cfg, other).state_dict(), "info": {}}, p)
    with pytest.raises(DataError, match="teacher.pt"):
        load_teacher(p, cfg, data)


def test_load_teacher_not_a_teacher_checkpoint(tmp_path, teacher_setup):
    cfg, data = teacher_setup
    p = tmp_path / "other.pt"
    save_checkpoint({"weights": {}}, p)
    with pytest.raises(DataError) as ei:
        load_teacher(p, cfg, data)
    assert str(p) in str(ei.value)


# --------------------------------------------------------------------------- shapes
def test_wrong_input_shape_to_model():
    model = build_classifier((1, 8, 8), "image", 10, width=4, feat_dim=8)
    with pytest.raises(DataError) as ei:
        model(torch.zeros(4, 1, 40))
    msg = str(ei.value)
    assert "1, 8, 8" in msg and "[4, 1, 40]" in msg
    with pytest.raises(DataError):
        model.features(torch.zeros(4, 1, 8, 9))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_backbone_kind_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="cnn2d"):
        build_classifier((1, 40), "signal", 10, backbone="cnn2d")
    with pytest.raises(ConfigError, match="backbone 'resnet9000'"):
        build_classifier((1, 40), "signal", 10, backbone="resnet9000")


# --------------------------------------------------------------------------- CLI
def test_cli_unknown_experiment(capsys):
    code, _, err = cli(capsys, "run", "nope")
    assert code == 2
    assert "nope" in err
    for name in builtin_experiments():
        assert name in err


def test_cli_missing_experiment_yaml(capsys, tmp_path):
    p = tmp_path / "missing.yaml"
    code, _, err = cli(capsys, "run", str(p))
    assert code == 2 and str(p) in err


def test_cli_run_bad_override(capsys):
    code, _, err = cli(capsys, "run", "digits", "seedz=[0]")
    assert code == 2 and "seedz" in err


def test_cli_list(capsys):
    code, out, err = cli(capsys, "list")
    assert code == 0
    assert err == ""
    methods_line = next(line for line in out.splitlines() if line.startswith("methods:"))
    for m in METHODS.names():
        assert m in methods_line
    for word in ("digits/image", "synthetic/a", "npz:PATH", "cosine", "digits", "synthetic"):
        assert word in out


def test_cli_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main([])
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2


def test_optional_backbone_without_its_package_is_a_clear_error(monkeypatch):
    import builtins

    from ucmkd.errors import ConfigError
    from ucmkd.models import build_classifier

    real_import = builtins.__import__

    def no_timm(name, *a, **k):
        if name in ("timm", "torchvision") or name.startswith(("timm.", "torchvision.")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    for backbone, pkg in (("timm", "timm"), ("torchvision-resnet18", "torchvision")):
        with pytest.raises(ConfigError, match=pkg):
            build_classifier((3, 32, 32), "image", 10, backbone=backbone)


def test_backbone_args_are_passed_and_checked():
    from ucmkd.errors import ConfigError
    from ucmkd.models import build_classifier

    m = build_classifier((1, 40), "signal", 10, backbone_args={"depth": 2})
    assert len(m.encoder.stages) == 2
    with pytest.raises(ConfigError, match="bad arguments for backbone 'cnn1d'"):
        build_classifier((1, 40), "signal", 10, backbone_args={"depht": 2})


# --------------------------------------------------------------------------- models and runs: what does not fit is named
def _model_cfg(tmp_path, *overrides):
    return load_config(RunConfig, None, ["data.teacher=synthetic/a", "data.student=synthetic/b",
                                         "data.synthetic.n_items=240", "data.synthetic.num_classes=4",
                                         f"data.cache_dir={tmp_path}", "model.teacher_width=8",
                                         "model.teacher_feat_dim=8", "teacher.epochs=1", "optim.epochs=1",
                                         "optim.steps_per_epoch=1", "method.name=kd", *overrides])


def test_student_encoder_width_differs_from_feat_dim(tmp_path):
    from ucmkd.models import Classifier

    cfg = _model_cfg(tmp_path)
    d = load_modality("synthetic/b", cfg.data)
    enc = torch.nn.Sequential(torch.nn.Linear(d.input_shape[0], 32))
    with pytest.raises(DataError, match=r"student_model 'model': its encoder maps \[2, 48\] to \[2, 32\], "
                                        r"but feat_dim=16 \(the head takes \[B, 16\]\)"):
        run(cfg, student_model=Classifier(enc, feat_dim=16, num_classes=4, input_shape=d.input_shape))


def test_student_model_that_is_not_a_classifier(tmp_path):
    cfg = _model_cfg(tmp_path)
    with pytest.raises(ConfigError, match=r"student_model: expected a ucmkd.models.Classifier.*got Sequential"):
        run(cfg, student_model=torch.nn.Sequential(torch.nn.Linear(48, 4)))


def test_student_model_with_other_classes_or_input(tmp_path):
    cfg = _model_cfg(tmp_path)
    with pytest.raises(DataError, match=r"student_model 'model': 3 classes, but 'synthetic/b' has 4"):
        run(cfg, student_model=build_classifier((48,), "vector", 3, width=4, feat_dim=8))
    with pytest.raises(DataError, match=r"input_shape \[40\], but 'synthetic/b' items are \[48\]"):
        run(cfg, student_model=build_classifier((40,), "vector", 4, width=4, feat_dim=8))


def test_label_budget_larger_than_a_class(tmp_path):
    cfg = _model_cfg(tmp_path, "pairing.label_budget=1000", "method.name=ucmkd")
    with pytest.raises(ConfigError, match=r"pairing.label_budget=1000 is more than the \d+ training items of "
                                          r"class 'c\d' in 'synthetic/b'.*or null"):
        run(cfg)


def test_class_names_from_a_numpy_array_print_as_plain_strings(tmp_path):
    """A user's RawModality whose classes come from a NumPy string array (e.g. scikit-learn's
    ``target_names``): messages show 'malignant', not np.str_('malignant')."""
    from ucmkd.data import PairingSampler
    from ucmkd.data.base import RawModality, finalize
    from ucmkd.config import PairingConfig

    rng = np.random.default_rng(0)
    raw = RawModality(x=rng.normal(size=(60, 5)).astype(np.float32), y=np.repeat([0, 1], 30),
                      classes=np.array(["benign", "malignant"]), kind="vector")
    data = finalize(raw, "user/cancer", DataConfig(cache_dir=str(tmp_path)))
    assert all(type(c) is str for c in data.classes)
    with pytest.raises(ConfigError) as ei:
        PairingSampler(data, None, PairingConfig(label_budget=1000), 8, 2)
    assert "class 'benign' in 'user/cancer'" in str(ei.value) and "np.str_" not in str(ei.value)


def test_teacher_test_acc_is_measured_when_no_info_is_given(tmp_path):
    from ucmkd.api import load_pair
    from ucmkd.engine import evaluate, get_teacher

    cfg = _model_cfg(tmp_path)
    student, teacher_data = load_pair(cfg)
    teacher, info = get_teacher(cfg, teacher_data)
    res = run(cfg, student=student, teacher_data=teacher_data, teacher=teacher)     # no teacher_info
    assert res["teacher_test_acc"] == evaluate(teacher, *teacher_data.split("test"))[0] == info["test_acc"]


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", "optim.lr: expected a value > 0.0, got -1.0"),
    ("optim.batch_size=0", "optim.batch_size: expected a value >= 1, got 0"),
    ("optim.epochs=0", "optim.epochs: expected a value >= 1, got 0"),
    ("data.val_frac=1.5", "data.val_frac: expected a value in (0.0, 1.0), got 1.5"),
    ("pairing.label_budget=0", "pairing.label_budget: expected a value >= 1, got 0"),
    ("seed=-3", "seed: expected a value >= 0, got -3"),
])
def test_cli_out_of_range_values(capsys, tmp_path, override, message):
    code, _, err = cli(capsys, "train", override, f"data.cache_dir={tmp_path}")
    assert code == 2 and message in err and "Traceback" not in err


def test_out_of_range_value_set_in_python(tmp_path):
    cfg = _model_cfg(tmp_path)
    cfg.optim.lr = -1.0                       # never went through from_dict: prepare checks it
    with pytest.raises(ConfigError, match=r"optim.lr: expected a value > 0.0, got -1.0"):
        run(cfg)


def test_cuda_device_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device: 'cuda', but no CUDA device is available"):
        run(_model_cfg(tmp_path, "device=cuda"))


def test_preflight_applies_needs_pairs_before_any_teacher_trains(tmp_path, monkeypatch):
    """paired-kd with class-matched batches fails in preflight, before a teacher trains."""
    import ucmkd.engine.teacher as teacher_mod
    from ucmkd.config import ExperimentConfig, from_dict
    from ucmkd.experiment import run_experiment

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was trained before the grid was checked")

    monkeypatch.setattr(teacher_mod, "get_teacher", no_teacher)
    monkeypatch.setattr("ucmkd.engine.get_teacher", no_teacher)
    exp = from_dict(ExperimentConfig, {"methods": ["ce", "paired-kd"], "seeds": [0],
                                       "directions": [["synthetic/a", "synthetic/b"]],
                                       "base": {"data": {"synthetic": {"n_items": 240, "num_classes": 4}}}})
    with pytest.raises(ConfigError, match=r"method 'paired-kd'.*needs pairing.mode: paired, got 'class-matched'"):
        run_experiment(exp, tmp_path / "out", progress=False, log=lambda *a: None)


def test_bad_pairing_fails_before_any_teacher_trains(tmp_path, monkeypatch):
    import ucmkd.assembly as api

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was trained before the config was checked")

    monkeypatch.setattr(api, "get_teacher", no_teacher)
    with pytest.raises(ConfigError, match=r"unknown pairing.mode 'bogus'; known: class-matched, unpaired, paired"):
        run(_model_cfg(tmp_path, "pairing.mode=bogus"))


def test_checkpoint_of_an_older_format(tmp_path):
    from ucmkd.api import prepare

    cfg = _model_cfg(tmp_path, "method.name=ce")
    ctx = prepare(cfg)
    d = tmp_path / "run"
    save_checkpoint({"config_hash": ctx.key, "model": {}, "best": {}}, d / "latest.pt")   # format 1: no "format"
    with pytest.raises(DataError, match=r"latest.pt: checkpoint format 1 \(an older ucmkd\).*fresh run directory"):
        run(cfg, run_dir=d)


def test_every_row_of_the_error_matrix_has_a_test(monkeypatch):
    """docs/errors.md: each row names the test that produces its error text."""
    import importlib
    import re
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    doc = tests.parent / "docs" / "errors.md"
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| ") and "::test_" in line]
    assert len(rows) >= 40
    for row in rows:
        cited = re.findall(r"`tests/(\w+)/(test_\w+)\.py::(test_\w+)", row)
        assert cited, f"no tests/<folder>/test_*.py::test_* in {row!r}"
        for folder, module, name in cited:
            monkeypatch.syspath_prepend(str(tests / folder))
            assert hasattr(importlib.import_module(module), name), \
                f"tests/{folder}/{module}.py::{name} (docs/errors.md) does not exist"


@pytest.mark.parametrize("overrides,message", [
    (["method.name=ucmkd-joint", "method.params.metric=l3"], "l3"),
    (["data.teacher=digits/image", "data.student=digits/signal", "data.mnist1d_samples=600", "pairing.mode=paired"],
     r"pairing.mode 'paired' needs true pairs"),
    (["method.name=reviewkd"], r"ReviewKD needs multi-stage feature maps"),
])
def test_run_mistakes_fail_before_the_teacher_trains(tmp_path, monkeypatch, overrides, message):
    import ucmkd.assembly as api

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was trained before the run was checked")

    monkeypatch.setattr(api, "get_teacher", no_teacher)
    with pytest.raises(UcmkdError, match=message):
        run(_model_cfg(tmp_path, *overrides))
