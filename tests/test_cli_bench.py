"""The CLI end to end: ``ucmkd bench`` (with --only, methods=[...], --workers), ``train-teacher``
(with --retrain) and ``run --quick``."""
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from ucmkd.cli import main
from ucmkd.engine import load_checkpoint

from test_bench import BASE

SUITE = {"name": "tiny", "methods": ["ce", "kd", "reviewkd"], "seeds": [0, 1], "base": BASE,
         "settings": {"mild": {"overrides": {}, "exclude_methods": ["reviewkd"]},
                      "noisy": {"overrides": {"data.synthetic.noise": 1.5}, "exclude_methods": ["reviewkd"]},
                      "other": {"overrides": {"data.synthetic.noise": 0.2}, "exclude_methods": ["reviewkd"]}}}

TEACHER_ARGS = ["data.teacher=synthetic/a", "data.synthetic.n_items=300", "data.synthetic.num_classes=3",
                "model.teacher_width=8", "model.teacher_feat_dim=8", "teacher.epochs=2", "teacher.batch_size=32"]


def _rows(path):
    return sorted((r["setting"], r["method"], int(r["seed"]), float(r["test_acc"])) for r in csv.DictReader(open(path)))


@pytest.fixture
def suite_yaml(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(SUITE))
    return p


@pytest.mark.slow
def test_bench_only_with_narrowed_methods_and_seeds(tmp_path, suite_yaml, capsys):
    """Issue 13, item 6, through the CLI: one setting, two methods, one seed."""
    out = tmp_path / "out"
    code = main(["bench", str(suite_yaml), "--only", "no*", "--out", str(out), "--no-progress",
                 "seeds=[0]", "methods=[ce,kd]"])
    assert code == 0, capsys.readouterr().err
    assert [r[:3] for r in _rows(out / "results.csv")] == [("noisy", "ce", 0), ("noisy", "kd", 0)]
    tables = (out / "tables.md").read_text()
    assert "### noisy" in tables and "### mild" not in tables and "reviewkd" not in tables
    assert "2 runs requested, 2 of 6 suite runs finished" in capsys.readouterr().out


def test_full_suite_narrowed_as_in_the_issue(tmp_path):
    """`ucmkd bench full --only spoken-img2aud-k10 'seeds=[0]' 'methods=[ce,ucmkd]'`: the cells it
    runs (the synthetic settings exclude reviewkd, which the narrowed list does not have)."""
    from ucmkd.bench import suite_cells, suite_path
    from ucmkd.cli import parse_args
    from ucmkd.config import SuiteConfig, load_config

    a = parse_args(["bench", "full", "--only", "spoken-img2aud-k10", "seeds=[0]", "methods=[ce,ucmkd]"])
    now, _ = suite_cells(load_config(SuiteConfig, suite_path(a.suite), a.overrides), tmp_path, a.only)
    assert [(c.setting, c.label, c.seed) for c in now] == [("spoken-img2aud-k10", "ce", 0),
                                                          ("spoken-img2aud-k10", "ucmkd", 0)]


@pytest.mark.slow
def test_bench_workers_give_the_serial_results(tmp_path, suite_yaml, capsys):
    args = ["--only", "mild", "--no-progress", "seeds=[0,1]", "methods=[ce,kd]"]
    assert main(["bench", str(suite_yaml), "--out", str(tmp_path / "w1"), "--workers", "1", *args]) == 0
    assert main(["bench", str(suite_yaml), "--out", str(tmp_path / "w2"), "--workers", "2", *args]) == 0
    serial, par = _rows(tmp_path / "w1" / "results.csv"), _rows(tmp_path / "w2" / "results.csv")
    assert len(serial) == 4 and serial == par


@pytest.mark.slow
def test_train_teacher_reuses_then_retrains(tmp_path, capsys):
    args = ["train-teacher", "--no-progress", f"data.cache_dir={tmp_path}", *TEACHER_ARGS]
    assert main(args) == 0
    out1 = capsys.readouterr().out
    assert out1.startswith("teacher synthetic/a: val acc ") and "checkpoint: " in out1
    path = Path(out1.split("checkpoint: ")[1].strip())
    stamp, first = path.stat().st_mtime_ns, load_checkpoint(path)
    assert main(args) == 0                                            # cached: not rewritten
    assert capsys.readouterr().out == out1 and path.stat().st_mtime_ns == stamp
    assert main(args + ["--retrain"]) == 0                            # trained again, from scratch
    assert capsys.readouterr().out == out1                            # same recipe: same accuracies
    again = load_checkpoint(path)
    assert path.stat().st_mtime_ns != stamp and again["info"]["seconds"] != first["info"]["seconds"]
    for k, v in first["model"].items():                               # ... and the same weights
        assert torch.equal(v, again["model"][k]), k


@pytest.mark.slow
def test_run_quick(tmp_path, capsys):
    exp = {"name": "tiny", "methods": ["ce", "kd"], "seeds": [0, 1, 2],
           "directions": [["synthetic/a", "synthetic/b"]], "base": BASE, "out_dir": str(tmp_path / "full"),
           "quick": {"seeds": [0], "out_dir": str(tmp_path / "quick"), "base.optim.epochs": 1}}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(exp))
    assert main(["run", str(p), "--quick", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "quick" / "results.csv")))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("ce", "0"), ("kd", "0")]
    assert not (tmp_path / "full").exists()
    res = json.loads(next((tmp_path / "quick" / "runs").rglob("result.json")).read_text())
    assert res["epochs"] == 1
