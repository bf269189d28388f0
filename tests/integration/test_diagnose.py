"""ucmkd diagnose: the probes, the gain model (against scikit-learn's Ridge), verdicts, the CLI."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from ucmkd.api import load_pair
from ucmkd.cli import main
from ucmkd.diagnose import (COEFFICIENTS_FILE, PROBE_EPOCHS, Diagnosis, GainModel, diagnose, features_of,
                            ridge_classifier, verdict)
from ucmkd.engine import get_teacher
from ucmkd.errors import DataError

from factories import small_config


def fake_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"ce_val_acc": rng.uniform(0.2, 0.95), "teacher_val_acc": rng.uniform(0.1, 1.0),
             "more_labels_val_acc": rng.uniform(0.3, 1.0), "n_unlabelled": int(rng.integers(0, 3000)),
             "n_labelled": int(rng.integers(10, 500)), "fa_classwise": rng.uniform(0, 0.7),
             "la_tv": rng.uniform(0.1, 0.7)} for _ in range(n)]


def test_gain_model_is_scikit_learns_ridge_on_standardised_features():
    rows = fake_rows(30)
    X = np.array([list(features_of(r).values()) for r in rows])
    y = X @ np.array([0.2, -5.0, -3.0, 0.5]) + np.random.default_rng(1).normal(0, 1, 30) + 4.0
    model = GainModel.fit(rows, list(y), alphas=(0.3,))
    Z = (X - X.mean(0)) / X.std(0)
    ref = Ridge(alpha=0.3).fit(Z, y)
    np.testing.assert_allclose(model.coef, ref.coef_, rtol=1e-9, atol=1e-12)   # float64 normal equations
    assert model.intercept == pytest.approx(ref.intercept_, rel=1e-12, abs=1e-12)
    x = features_of(rows[3])
    assert model.predict(x)[0] == pytest.approx(max(0.0, float(ref.predict(Z[3:4])[0])), rel=1e-9, abs=1e-9)


def test_interval_is_the_quantile_of_leave_one_out_errors():
    rows = fake_rows(12, seed=2)
    y = [float(v) for v in np.random.default_rng(3).uniform(0, 20, 12)]
    model = GainModel.fit(rows, y, alphas=(1.0,), coverage=0.8)
    X = np.array([list(features_of(r).values()) for r in rows])
    errs = []
    for i in range(12):
        keep = np.arange(12) != i
        m, s = X.mean(0), X.std(0)           # standardised once, on all rows, as the model does
        fit = Ridge(alpha=1.0).fit((X[keep] - m) / s, np.array(y)[keep])
        errs.append(max(0.0, float(fit.predict(((X[i] - m) / s)[None])[0])) - y[i])
    assert model.half_width == pytest.approx(float(np.quantile(np.abs(errs), 0.8)), rel=1e-9)
    g, lo, hi = model.predict(features_of(rows[0]))
    assert g >= 0 and hi - g == g - lo == pytest.approx(model.half_width)


def test_gain_model_round_trips_and_the_shipped_one_loads(tmp_path):
    rows = fake_rows(10)
    model = GainModel.fit(rows, list(range(10)), alphas=(0.1,))
    model.save(tmp_path / "m.json")
    again = GainModel.load(tmp_path / "m.json")
    assert again.predict(features_of(rows[1])) == model.predict(features_of(rows[1]))
    shipped = GainModel.load(COEFFICIENTS_FILE)
    assert shipped.features == list(features_of(rows[0]))
    assert all(s >= 100 for s in shipped.info["fit_seeds"])       # validation seeds only
    with pytest.raises(DataError, match="missing"):
        GainModel.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: unreadable gain model"):
        GainModel.load(tmp_path / "bad.json")
    (tmp_path / "field.json").write_text('{"features": ["headroom"], "nonsense": 1}')
    with pytest.raises(DataError, match=r"field\.json: unreadable gain model"):
        GainModel.load(tmp_path / "field.json")


def test_ridge_classifier_against_numpy():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(50, 4, generator=g), torch.arange(50) % 3
    scores = ridge_classifier(z, y, 3, ridge=1e-2)
    zd = z.double().numpy()
    a = np.hstack([(zd - zd.mean(0)) / zd.std(0), np.ones((50, 1))])
    t = np.eye(3)[y.numpy()]
    w = np.linalg.lstsq(np.vstack([a, np.sqrt(1e-2 * 50) * np.eye(5)]), np.vstack([t, np.zeros((5, 3))]), rcond=None)[0]
    np.testing.assert_allclose(scores(z).numpy(), a @ w, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    cfg = small_config("ucmkd", epochs=8)
    cfg.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
    student, teacher_data = load_pair(cfg)
    teacher, info = get_teacher(cfg, teacher_data)
    return cfg, dict(student=student, teacher_data=teacher_data, teacher=teacher, teacher_info=info)


def test_diagnose_a_small_setting(setting):
    cfg, kw = setting
    student = kw["student"]
    # the probes never read the test split: its indices point outside the data
    blind = dataclasses.replace(student, splits={**student.splits, "test": torch.tensor([10 ** 9])})
    d = diagnose(cfg, **{**kw, "student": blind})
    assert d.num_classes == 4 and d.n_labelled == 40 and d.n_unlabelled == len(student.splits["train"]) - 40
    assert d.ce_probe_steps == max(2, round(PROBE_EPOCHS * cfg.optim.epochs)) * cfg.optim.steps_per_epoch
    for v in (d.teacher_val_acc, d.ce_val_acc, d.linear_val_acc, d.more_labels_val_acc, d.teacher_head_acc, d.vote_acc):
        assert 0.0 <= v <= 1.0
    assert d.teacher_val_acc == kw["teacher_info"]["val_acc"] and d.teacher_cached
    assert d.fa_classwise >= 0 and 0 <= d.la_tv <= 1 and d.labelled_balance == 1.0
    assert d.predicted_gain >= 0 and d.interval[0] < d.predicted_gain < d.interval[1]
    assert d.verdict in ("distil", "do not bother", "teacher too weak")
    table = d.table()
    for text in ("label sets", "identical, 4 classes", "teacher accuracy", "CE student at the label budget",
                 "class-wise OT", "teacher head", "predicted gain", "verdict"):
        assert text in table
    again = diagnose(cfg, **{**kw, "student": blind})           # deterministic for a seed
    assert again.ce_val_acc == d.ce_val_acc and again.predicted_gain == d.predicted_gain


def test_label_sets_must_match(setting):
    cfg, kw = setting
    other = dataclasses.replace(kw["teacher_data"], classes=["a", "b", "c", "zz"])
    with pytest.raises(DataError, match="label sets differ"):
        diagnose(cfg, student=kw["student"], teacher_data=other, predict=False)


def _diag(**kw):
    base = dict(teacher="t", student="s", label_budget=10, num_classes=10, n_labelled=100, n_unlabelled=900,
                n_teacher_pool=1000, labelled_balance=1.0, student_balance=1.0, teacher_balance=1.0, prior_tv=0.0,
                teacher_val_acc=0.99, ce_val_acc=0.6, linear_val_acc=0.6, more_labels_val_acc=0.8, n_more_labels=300,
                ce_probe_steps=40, fa=0.3, fa_classwise=0.3, teacher_head_acc=0.6, la_tv=0.3, vote_acc=0.6,
                predicted_gain=8.0, interval=(1.0, 15.0))
    return Diagnosis(**{**base, **kw})


def test_verdicts():
    assert verdict(_diag())[0] == "distil"
    assert verdict(_diag(predicted_gain=0.4, interval=(-7, 8)))[0] == "do not bother"
    weak = verdict(_diag(teacher_val_acc=0.1))
    assert weak[0] == "teacher too weak" and "fallback" in weak[1]
    assert verdict(_diag(teacher_val_acc=0.97, ce_val_acc=0.98, predicted_gain=0.2, interval=(-7, 7)))[0] == "do not bother"


def test_cli_diagnose(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UCMKD_CACHE", str(tmp_path))
    args = ["diagnose", "data.teacher=synthetic/a", "data.student=synthetic/b", "data.synthetic.n_items=400",
            "data.synthetic.num_classes=4", "teacher.epochs=2", "optim.epochs=8", "optim.steps_per_epoch=3",
            "optim.batch_size=16", "model.teacher_width=16", "model.student_width=16", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ucmkd diagnose: synthetic/a -> synthetic/b" in out and "**verdict**" in out
    assert "teacher trained" in out
    assert main(args + ["--json"]) == 0
    import json

    d = json.loads(capsys.readouterr().out)
    assert d["teacher_cached"] and not math.isnan(d["predicted_gain"])
