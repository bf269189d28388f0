"""``ucmkd bench``: grid, resumable store, paired statistics, outputs."""
import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

from ucmkd.bench import builtin_suites, run_suite, suite_cells
from ucmkd.config import SuiteConfig, load_config
from ucmkd.errors import ConfigError, DataError
from ucmkd.grid import ResultStore
from ucmkd.report import paired_stats

from factories import tiny_suite


@pytest.mark.slow
def test_suite_outputs_and_statistics(tmp_path):
    out = tmp_path / "b"
    res = run_suite(tiny_suite(), out_dir=out, progress=False, log=lambda *a: None)
    for f in ("tables.md", "summary.csv", "results.csv", "results.jsonl", "heatmap.png", "suite.yaml",
              "bars/mild.png", "bars/noisy.png"):
        assert (out / f).is_file(), f
    stored = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(stored) == 2 * 2 * 3
    assert all(r["code_version"].startswith("ucmkd") and r["config"]["method"]["name"] for r in stored)
    # recompute the paired statistics independently from the per-run CSV (float64 both ways; the
    # deltas differ by the rounding of 100 a - 100 b vs 100 (a - b): ~1e-14 of values <= 100)
    runs = list(csv.DictReader(open(out / "results.csv")))
    acc = {(r["setting"], r["method"], int(r["seed"])): 100 * float(r["test_acc"]) for r in runs}
    summary = {(r["setting"], r["method"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    for setting in ("mild", "noisy"):
        d = np.array([acc[(setting, "kd", k)] - acc[(setting, "ce", k)] for k in range(3)])
        row = summary[(setting, "kd")]
        assert float(row["delta_mean"]) == pytest.approx(d.mean(), rel=1e-12, abs=1e-12)
        if d.std() > 0:
            lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(3))
            assert float(row["ci_low"]) == pytest.approx(lo, rel=1e-12, abs=1e-12)
            assert float(row["ci_high"]) == pytest.approx(hi, rel=1e-12, abs=1e-12)
            assert float(row["wilcoxon_p"]) == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-12)
    assert "### noisy: noisier view B" in res["tables"]
    assert "Wilcoxon p" in res["tables"]


def test_paired_stats_known_values():
    s = paired_stats(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert s["delta_mean"] == 3.0 and s["delta_std"] == pytest.approx(math.sqrt(2.5), rel=1e-15)
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)   # t_{0.975, 4}
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((3 - half, 3 + half), rel=1e-14)   # float64
    assert s["wilcoxon_p"] == 0.0625          # exact: all 5 positive, 2 / 2^5
    assert paired_stats(np.zeros(3))["wilcoxon_p"] == 1.0
    assert math.isnan(paired_stats(np.array([1.0]))["ci_low"])


@pytest.mark.slow
def test_only_and_resume_never_rerun(tmp_path):
    out = tmp_path / "b"
    quiet = {"progress": False, "log": lambda *a: None}
    r1 = run_suite(tiny_suite(seeds=[0]), out_dir=out, only="mild", **quiet)
    assert {r["setting"] for r in r1["results"]} == {"mild"}
    n1 = len((out / "results.jsonl").read_text().splitlines())
    r2 = run_suite(tiny_suite(seeds=[0]), out_dir=out, only="no*", **quiet)
    assert {r["setting"] for r in r2["results"]} == {"mild", "noisy"}   # outputs cover all finished
    n2 = len((out / "results.jsonl").read_text().splitlines())
    assert n2 == 2 * n1
    run_suite(tiny_suite(seeds=[0]), out_dir=out, **quiet)               # everything done: nothing re-run
    assert len((out / "results.jsonl").read_text().splitlines()) == n2
    with pytest.raises(ConfigError, match="--only 'zzz' matches no setting"):
        run_suite(tiny_suite(seeds=[0]), out_dir=out, only="zzz", **quiet)


def test_store_tolerates_a_torn_last_line_but_not_a_corrupt_one(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps({"store_key": "a"}) + "\n" + '{"store_key": "b", "tr')
    st = ResultStore(p)
    assert st.done == {"a"}
    p.write_text('{"bad\n' + json.dumps({"store_key": "a"}) + "\n")
    with pytest.raises(DataError, match="line 1"):
        ResultStore(p)


def test_suite_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match="baseline"):
        suite_cells(tiny_suite(baseline="mmd-nope"), tmp_path)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        suite_cells(tiny_suite(methods=["ce", "nope"]), tmp_path)
    with pytest.raises(ConfigError, match="settings.mild"):
        suite_cells(tiny_suite(settings={"mild": {"overides": {}}}), tmp_path)
    with pytest.raises(ConfigError, match="settings"):
        suite_cells(tiny_suite(settings={}), tmp_path)


def test_builtin_suites_load_and_cover_the_grid(tmp_path):
    from ucmkd.bench import suite_path

    assert {"quick", "full"} <= set(builtin_suites())
    full = load_config(SuiteConfig, suite_path("full"))
    assert len(full.seeds) == 5
    names = set(full.settings)
    for k in (5, 10, 50):
        assert f"digits-img2sig-k{k}" in names and f"digits-sig2img-k{k}" in names
    assert any("noisy" in n for n in names) and sum(n.startswith("synthetic") for n in names) == 2
    now, all_cells = suite_cells(load_config(SuiteConfig, suite_path("quick")), tmp_path)
    assert now == all_cells and len({c.setting for c in all_cells}) >= 3


def test_preflight_rejects_an_impossible_cell_before_training(tmp_path):
    suite = tiny_suite(methods=["ce", "reviewkd"], seeds=[0])   # synthetic data: MLP backbones
    with pytest.raises(ConfigError, match=r"setting 'mild', method 'reviewkd'.*multi-stage"):
        run_suite(suite, out_dir=tmp_path, progress=False, log=lambda *a: None)
    assert not (tmp_path / "results.jsonl").exists()   # nothing was trained


def test_exclude_methods(tmp_path):
    suite = tiny_suite(methods=["ce", "reviewkd"], seeds=[0],
                       settings={"mild": {"overrides": {}, "exclude_methods": ["reviewkd"]}})
    res = run_suite(suite, out_dir=tmp_path, progress=False, log=lambda *a: None)
    assert {r["method"] for r in res["results"]} == {"ce"}
    assert "Not run" in res["tables"] and "reviewkd in mild" in res["tables"]
    # an exclusion of a method the (narrowed) list does not have is no error; a typo is
    now, _ = suite_cells(tiny_suite(settings={"mild": {"exclude_methods": ["mmd"]}}), tmp_path)
    assert {c.label for c in now} == {"ce", "kd"}
    with pytest.raises(ConfigError, match=r"settings\.mild\.exclude_methods: 'mdm' is neither a method"):
        suite_cells(tiny_suite(settings={"mild": {"exclude_methods": ["mdm"]}}), tmp_path)


def test_a_cell_dir_from_an_older_config_is_set_aside_not_resumed(tmp_path):
    quiet = {"progress": False, "log": lambda *a: None}
    one = {"mild": {"overrides": {}}}
    run_suite(tiny_suite(methods=["ce"], seeds=[0], settings=one), out_dir=tmp_path, **quiet)
    (tmp_path / "results.jsonl").unlink()
    (tmp_path / "runs" / "mild" / "ce" / "seed0" / "result.json").unlink()   # as if interrupted
    edited = {"mild": {"overrides": {"optim.lr": 0.01}}}                  # the suite was edited since
    res = run_suite(tiny_suite(methods=["ce"], seeds=[0], settings=edited), out_dir=tmp_path, **quiet)
    assert len(res["results"]) == 1
    assert list((tmp_path / "runs" / "mild" / "ce").glob("seed0.stale-*"))


def test_rows_written_before_a_config_field_existed_still_count(tmp_path):
    quiet = {"progress": False, "log": lambda *a: None}
    suite = tiny_suite(methods=["ce"], seeds=[0], settings={"mild": {"overrides": {}}})
    run_suite(suite, out_dir=tmp_path, **quiet)
    p = tmp_path / "results.jsonl"
    row = json.loads(p.read_text())
    del row["config"]["data"]["spoken"]            # as written by a version without that field
    row["store_key"] = "mild|ce|old-hash"
    p.write_text(json.dumps(row) + "\n")
    (tmp_path / "runs" / "mild" / "ce" / "seed0" / "result.json").unlink()   # would retrain if not found
    res = run_suite(suite, out_dir=tmp_path, **quiet)
    assert len(res["results"]) == 1 and len(p.read_text().splitlines()) == 1
    # but a stored field with another value is a different run
    row["config"]["optim"]["lr"] = 0.5
    p.write_text(json.dumps(row) + "\n")
    run_suite(suite, out_dir=tmp_path, **quiet)
    assert len(p.read_text().splitlines()) == 2


def test_a_row_made_with_another_default_of_the_method_is_not_reused(tmp_path, monkeypatch):
    """The store matches rows by the method params with their defaults spelled out (as rows
    record them), so a cell whose config is unchanged but whose method's default changed since
    runs again instead of silently reusing a row of the old default."""
    from dataclasses import field, make_dataclass

    from ucmkd.methods import METHODS

    quiet = {"progress": False, "log": lambda *a: None}
    suite = tiny_suite(methods=["ce"], seeds=[0], settings={"mild": {"overrides": {}}})
    run_suite(suite, out_dir=tmp_path, **quiet)
    p = tmp_path / "results.jsonl"
    assert json.loads(p.read_text())["params"] == {"label_smoothing": 0.0}
    run_suite(suite, out_dir=tmp_path, **quiet)
    assert len(p.read_text().splitlines()) == 1                  # same defaults: reused
    ce = METHODS.get("ce")
    monkeypatch.setattr(ce, "Params", make_dataclass("Params", [("label_smoothing", float, field(default=0.05))]))
    run_suite(suite, out_dir=tmp_path, **quiet)
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["params"] == {"label_smoothing": 0.05}
