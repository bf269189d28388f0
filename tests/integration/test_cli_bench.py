"""The CLI end to end: ``ucmkd bench`` (with --only, methods=[...], --workers), ``train-teacher``
(with --retrain) and ``run --quick``."""
import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from ucmkd.cli import main
from ucmkd.engine import load_checkpoint

from factories import TINY_BASE

SUITE = {"name": "tiny", "methods": ["ce", "kd", "reviewkd"], "seeds": [0, 1], "base": TINY_BASE,
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
    """``--only``, ``seeds=[...]`` and ``methods=[...]`` narrow a bench through the CLI: one setting,
    two methods, one seed run, and the reports count the suite's own cells."""
    out = tmp_path / "out"
    code = main(["bench", str(suite_yaml), "--only", "no*", "--out", str(out), "--no-progress",
                 "seeds=[0]", "methods=[ce,kd]"])
    assert code == 0, capsys.readouterr().err
    assert [r[:3] for r in _rows(out / "results.csv")] == [("noisy", "ce", 0), ("noisy", "kd", 0)]
    tables = (out / "tables.md").read_text()
    assert "### noisy" in tables and "### mild" not in tables and "| reviewkd |" not in tables
    assert "- reviewkd in mild, noisy, other: reviewkd: student" in tables   # it cannot apply to MLPs
    # the reports cover the suite's own cells: 3 settings x (ce, kd) x seeds 0, 1
    assert "2 runs requested, 2 of 12 suite runs finished" in capsys.readouterr().out


def test_narrowed_full_suite_runs_the_named_cells_despite_exclusions(tmp_path):
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
           "directions": [["synthetic/a", "synthetic/b"]], "base": TINY_BASE, "out_dir": str(tmp_path / "full"),
           "quick": {"seeds": [0], "out_dir": str(tmp_path / "quick"), "base.optim.epochs": 1}}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(exp))
    assert main(["run", str(p), "--quick", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "quick" / "results.csv")))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("ce", "0"), ("kd", "0")]
    assert not (tmp_path / "full").exists()
    res = json.loads(next((tmp_path / "quick" / "runs").rglob("result.json")).read_text())
    assert res["epochs"] == 1


# --------------------------------------------------------------------------- reports over every finished cell
def fake_row(cell, acc: float | None = None) -> dict:
    """A results-store row of ``cell`` as a finished run writes it (accuracy made up)."""
    from dataclasses import asdict

    acc = 0.5 + 0.01 * cell.seed + 0.05 * ["ce", "kd", "fitnet", "mmd"].index(cell.label) if acc is None else acc
    return {"setting": cell.setting, "method": cell.label, "seed": cell.seed, "store_key": cell.store_key,
            "teacher": cell.cfg.data.teacher, "student": cell.cfg.data.student, "test_acc": acc, "val_acc": acc,
            "teacher_test_acc": 0.9, "seconds": 1.0, "selected": "student", "config": asdict(cell.cfg)}


def store_suite(tmp_path, suite: dict, methods=None):
    """Write ``suite`` as YAML and fake rows of its cells (of ``methods`` only, if given) into
    ``tmp_path/out/results.jsonl``; returns (yaml path, out dir)."""
    from ucmkd.bench import suite_cells
    from ucmkd.config import SuiteConfig, from_dict
    from ucmkd.grid import ResultStore

    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    store = ResultStore(out / "results.jsonl")
    for c in suite_cells(from_dict(SuiteConfig, suite), out)[1]:
        if methods is None or c.label in methods:
            store.append(fake_row(c))
    return p, out


def no_training(monkeypatch):
    """Make any attempt to run a cell fail."""
    import ucmkd.bench
    import ucmkd.grid

    def fail(*a, **k):
        raise AssertionError("a cell was run")

    monkeypatch.setattr(ucmkd.grid, "_run_cell", fail)
    monkeypatch.setattr(ucmkd.grid, "run_cells", fail)
    monkeypatch.setattr(ucmkd.bench, "run_cells", fail)


def test_a_narrowed_command_line_reports_every_finished_cell(tmp_path, monkeypatch, capsys):
    """`ucmkd bench SUITE methods=[fitnet]`, adding one method: tables.md and the headline keep
    the finished runs of the suite's own methods, and gain the new method's."""
    import ucmkd.bench

    suite = {"name": "tiny", "methods": ["ce", "kd"], "seeds": [0, 1], "base": TINY_BASE,
             "settings": {"mild": {"overrides": {}}, "noisy": {"overrides": {"data.synthetic.noise": 1.5}}},
             "headline": {"method": "kd"}}
    p, out = store_suite(tmp_path, suite)
    (out / "kd.md").write_text("stale\n")
    ran = []

    def fake_run_cells(cells, store, **kw):      # "train" the cells: made-up rows
        ran.extend((c.setting, c.label, c.seed) for c in cells)
        for c in cells:
            if store.find(c) is None:
                store.append(fake_row(c))

    monkeypatch.setattr(ucmkd.bench, "run_cells", fake_run_cells)
    assert main(["bench", str(p), "--out", str(out), "--no-progress", "methods=[fitnet]"]) == 0
    assert sorted(ran) == [(s, "fitnet", k) for s in ("mild", "noisy") for k in (0, 1)]
    assert "4 runs requested, 12 of 12 suite runs finished" in capsys.readouterr().out
    tables = (out / "tables.md").read_text()
    for s in ("mild", "noisy"):
        block = tables.split(f"### {s}")[1].split("###")[0]
        assert all(f"| {m} | " in block for m in ("ce", "kd", "fitnet")), block
    assert len(_rows(out / "results.csv")) == 12
    headline = (out / "kd.md").read_text()
    assert headline != "stale\n" and "| fitnet | +10.00 |" in headline   # kd.md rewritten over the same rows
    # the suite record is the suite the reports cover
    assert yaml.safe_load((out / "suite.yaml").read_text())["methods"] == ["ce", "kd", "fitnet"]


def test_report_rebuilds_from_the_store_without_running(tmp_path, monkeypatch, capsys):
    suite = {"name": "tiny", "methods": ["ce", "kd", "fitnet"], "seeds": [0, 1, 2], "base": TINY_BASE,
             "settings": {"mild": {"overrides": {}}}}
    p, out = store_suite(tmp_path, suite, methods=["ce", "kd"])     # fitnet not run yet
    no_training(monkeypatch)
    assert main(["bench", str(p), "--out", str(out), "--report", "--no-progress"]) == 0
    assert "reports rebuilt, nothing run, 6 of 9 suite runs finished" in capsys.readouterr().out
    tables = (out / "tables.md").read_text()
    assert "| ce | 51.0 +- 1.0 |" in tables and "| kd | 56.0 +- 1.0 | +5.0 [+5.0, +5.0] * |" in tables
    assert "| fitnet |" not in tables
    for f in ("summary.csv", "results.csv", "heatmap.png", "bars/mild.png"):
        assert (out / f).is_file(), f
    assert main(["bench", str(p), "--out", str(out), "--report", "--only", "mild"]) == 2
    assert "--only has no effect" in capsys.readouterr().err


def test_excluded_methods_say_why(tmp_path, monkeypatch):
    """reviewkd cannot apply to the MLPs of vector data; kd could, and the suite left it out."""
    suite = {"name": "tiny", "methods": ["ce", "kd", "reviewkd"], "seeds": [0], "base": TINY_BASE,
             "settings": {"mild": {"overrides": {}, "exclude_methods": ["reviewkd", "kd"]},
                          "noisy": {"overrides": {"data.synthetic.noise": 1.5}, "exclude_methods": ["reviewkd"]}}}
    p, out = store_suite(tmp_path, suite)
    no_training(monkeypatch)
    assert main(["bench", str(p), "--out", str(out), "--report", "--no-progress"]) == 0
    tables = (out / "tables.md").read_text()
    cannot = tables.split("Not run (the method cannot apply to the setting):\n")[1].split("\n\n")[0]
    assert cannot.startswith("- reviewkd in mild, noisy: reviewkd: student 'student[synthetic/b]'")
    assert "multi-stage feature maps" in cannot and not re.search(r"\bkd in mild", cannot)
    assert "Not run (excluded by the suite, settings.<setting>.exclude_methods): kd in mild." in tables
    assert "backbones): kd" not in tables


def test_one_seed_tables_print_no_nan(tmp_path, monkeypatch):
    suite = {"name": "tiny", "methods": ["ce", "kd", "fitnet", "mmd"], "seeds": [0], "base": TINY_BASE,
             "settings": {"mild": {"overrides": {}}}, "headline": {"method": "kd", "control": "mmd"}}
    p, out = store_suite(tmp_path, suite)
    no_training(monkeypatch)
    assert main(["bench", str(p), "--out", str(out), "--report", "--no-progress"]) == 0
    for f in ("tables.md", "kd.md"):
        text = (out / f).read_text()
        assert "nan" not in text.lower(), f
        assert "+5.0 [CI n/a]" in text, f          # kd - ce, one seed: a delta, no interval
