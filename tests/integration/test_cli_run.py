"""End to end: ``ucmkd run`` on a tiny experiment writes the table, CSV and plot, and resumes."""
import csv

import pytest
import yaml

from ucmkd.cli import main

TINY = {
    "name": "tiny",
    "methods": ["ce", "kd", "ucmkd-joint", "ucmkd-bilevel", "kd-paired"],
    "variants": {"kd-paired": {"method": "kd", "overrides": {"pairing.mode": "paired"}}},
    "method_params": {"ucmkd-joint": {"n_iter": 10}, "ucmkd-bilevel": {"n_iter": 10}},
    "seeds": [0, 1],
    "directions": [["synthetic/a", "synthetic/b"]],
    "base": {
        "data": {"synthetic": {"n_items": 300, "num_classes": 3}},
        "pairing": {"label_budget": 5},
        "model": {"teacher_width": 8, "student_width": 8, "teacher_feat_dim": 8, "student_feat_dim": 8},
        "optim": {"epochs": 2, "steps_per_epoch": 2, "batch_size": 16},
        "teacher": {"epochs": 2, "batch_size": 32},
    },
}


@pytest.mark.slow
def test_run_tiny_experiment(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| synthetic/a -> synthetic/b | ucmkd-bilevel |" in printed
    for f in ("table.md", "results.csv", "plot.png", "experiment.yaml"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 5 * 2
    assert {r["method"] for r in rows} == set(TINY["methods"])
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    # every run saved its resolved config; the paired variant really ran paired
    paired_cfg = yaml.safe_load(open(out / "runs" / "synthetic-a--synthetic-b" / "kd-paired" / "seed0" / "config.yaml"))
    assert paired_cfg["pairing"]["mode"] == "paired" and paired_cfg["method"]["name"] == "kd"
    # a second invocation reuses every finished cell (no retraining: result files untouched)
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/result.json")}
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/result.json")}


def test_run_overrides_are_applied(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--no-progress", "seeds=[3]", "methods=[ce]"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [("ce", "3")]


def test_run_rejects_bad_override(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "base.optim.lrr=1"]) == 2
    assert "base.optim.lrr" in capsys.readouterr().err


def test_train_single_run_cli(tmp_path, capsys):
    args = ["train", "--run-dir", str(tmp_path / "r"), "--no-progress", "data.teacher=synthetic/a",
            "data.student=synthetic/b", "data.synthetic.n_items=300", "data.synthetic.num_classes=3",
            "optim.epochs=2", "optim.steps_per_epoch=2", "teacher.epochs=2", "method.name=kd"]
    assert main(args) == 0
    assert '"test_acc"' in capsys.readouterr().out
    assert (tmp_path / "r" / "best.pt").is_file()
