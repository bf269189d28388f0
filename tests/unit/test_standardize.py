"""Per-feature standardisation of vector modalities (data.standardize): scikit-learn's
StandardScaler (float64) is the oracle; raw features over six orders of magnitude give the same
standardised inputs and the same trained run as features at unit scale."""
import json

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from ucmkd.api import run
from ucmkd.config import DataConfig, RunConfig, load_config
from ucmkd.data import Standardizer, load_modality
from ucmkd.data import standardize as stdz
from ucmkd.errors import ConfigError

U = 2.0 ** -24          # float32 unit roundoff


def two_views(n=300, k=3, d_t=6, d_s=5, seed=0):
    """(y [n], teacher view [n, d_t], student view [n, d_s]): two noisy linear maps of one latent
    class structure, both at unit scale."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    z = rng.normal(size=(k, 4))[y] * 3.0 + rng.normal(size=(n, 4))
    t = z @ rng.normal(size=(4, d_t)) + 0.3 * rng.normal(size=(n, d_t))
    s = np.tanh(z @ rng.normal(size=(4, d_s))) + 0.3 * rng.normal(size=(n, d_s))
    return y, t.astype(np.float32), s.astype(np.float32)


def save(path, x, y):
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def oracle(x, train):
    """StandardScaler fitted on the training rows (float64): (mean [F], scale [F], transform)."""
    sc = StandardScaler().fit(x[train].astype(np.float64))
    return sc.mean_, sc.scale_, sc.transform(x.astype(np.float64))


def bound(x, mean, scale):
    """Elementwise error bound of the float32 standardisation against the float64 one: mean and
    std rounded to float32 (u each), one subtraction and one division rounded (u each), so
    |err| <= 4u (|mean| / scale + |z|) (plus the float32 rounding of z itself, inside the 4u)."""
    z = (x.astype(np.float64) - mean) / scale
    return 4 * U * (np.abs(mean) / scale + np.abs(z)) + 1e-30


# --------------------------------------------------------------------------- statistics
def test_per_feature_matches_standard_scaler_with_constant_features(tmp_path):
    y, _, x = two_views()
    x = np.concatenate([x, np.full((len(x), 1), 7.25, np.float32), np.zeros((len(x), 1), np.float32)], axis=1)
    d = load_modality(save(tmp_path / "s.npz", x, y), DataConfig(cache_dir=str(tmp_path)))
    train = d.splits["train"].numpy()
    mean, scale, ref = oracle(x, train)
    assert d.meta["standardize"] == "per_feature"
    np.testing.assert_allclose(np.asarray(d.meta["norm_mean"]), mean.astype(np.float32), rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(d.meta["norm_std"]), scale.astype(np.float32))
    assert d.meta["norm_std"][-2:] == [1.0, 1.0]           # constant features: scale 1 (as StandardScaler)
    got = d.x.numpy().astype(np.float64)
    assert np.isfinite(got).all()
    assert (np.abs(got - ref) <= bound(x, mean, scale)).all()
    assert (got[:, -2:] == 0).all()                          # x - mean, exactly 0: nothing blows up


def test_streaming_moments_equal_float64_over_chunks(monkeypatch):
    """Chunked float64 accumulation (many chunks) vs numpy's one-shot float64 statistics."""
    monkeypatch.setattr(stdz, "CHUNK_BYTES", 4 * 3 * 8 * 4)        # 4 rows of [3, 8] per chunk
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(103, 3, 8)) * [[10.0], [1e-3], [1e3]] + [[5.0], [-2e-3], [3e3]]).astype(np.float32)
    rows = np.sort(rng.choice(103, size=70, replace=False))
    assert stdz.chunk_rows(x.shape) == 4
    x64 = x[rows].astype(np.float64)
    mean, m2, n = stdz.moments(x, rows, per_feature=True)
    ref_mean = x64.mean(axis=(0, 2))
    ref_var = x64.var(axis=(0, 2))
    assert n == 70 * 8
    # float64, ~26 chunk merges of sums of <= 32 values: relative error far below 1e-12
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(m2 / n, ref_var, rtol=1e-12)
    gmean, gm2, gn = stdz.moments(x, rows, per_feature=False)
    np.testing.assert_allclose([gmean, gm2 / (gn - 1)], [x64.mean(), x64.var(ddof=1)], rtol=1e-12)


def test_per_feature_on_images_is_per_channel(tmp_path):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(90, 2, 4, 4)) * [[[3.0]], [[0.01]]]).astype(np.float32)
    y = np.arange(90) % 3
    d = load_modality(save(tmp_path / "img.npz", x, y), DataConfig(cache_dir=str(tmp_path), standardize="per_feature"))
    tr = x[d.splits["train"].numpy()].astype(np.float64)
    np.testing.assert_array_equal(np.asarray(d.meta["norm_mean"]), tr.mean(axis=(0, 2, 3)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(d.meta["norm_std"]), tr.std(axis=(0, 2, 3)).astype(np.float32))
    auto = load_modality(save(tmp_path / "img.npz", x, y), DataConfig(cache_dir=str(tmp_path)))
    assert auto.meta["standardize"] == "global" and isinstance(auto.meta["norm_mean"], float)


def test_global_mode_is_the_former_formula_bit_for_bit(tmp_path):
    y, _, x = two_views()
    d = load_modality(save(tmp_path / "s.npz", x, y), DataConfig(cache_dir=str(tmp_path), standardize="global"))
    t = torch.as_tensor(x)
    tr = t[d.splits["train"]]
    assert torch.equal(d.x, (t - tr.mean()) / tr.std().clamp_min(1e-8))
    assert d.meta["norm_mean"] == float(tr.mean())


def test_global_statistics_do_not_depend_on_the_thread_count():
    """The same data gives the same standardised values, fingerprint and keys on 1 or 4 threads
    (a float32 reduction split over threads rounds differently; this one runs on one)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, 40, generator=g) * 3.7 + 1.3
    train = torch.arange(0, 16000)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 4):
            torch.set_num_threads(n)
            got.append(stdz.global_in_memory(x, train).values())
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1]
    assert torch.get_num_threads() == threads


def test_none_keeps_raw_inputs_and_copies_them(tmp_path):
    y, _, x = two_views()
    d = load_modality(save(tmp_path / "s.npz", x * 1000, y), DataConfig(cache_dir=str(tmp_path), standardize="none"))
    assert torch.equal(d.x, torch.as_tensor(x * 1000))
    assert d.meta["standardize"] == "none"


def test_unknown_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.standardize.*per_feature"):
        load_config(RunConfig, None, ["data.standardize=per-feature"])
    y, _, x = two_views()
    with pytest.raises(ConfigError, match=r"data\.standardize"):
        load_modality(save(tmp_path / "s.npz", x, y), DataConfig(cache_dir=str(tmp_path), standardize="z"))


# --------------------------------------------------------------------------- raw scales
def test_decimal_scales_and_shifts_give_the_unit_scale_inputs(tmp_path):
    """Columns multiplied by 1e-3 .. 1e3 and shifted by 5x their scale: the standardised inputs
    equal those of the unit-scale features to the float32 bound (the raw inputs' own float32
    rounding, u (|z| + 5), enters twice more through the statistics)."""
    y, _, x = two_views(d_s=7)
    scale = np.logspace(-3, 3, 7)
    raw = (x.astype(np.float64) * scale + 5 * scale).astype(np.float32)
    cfg = DataConfig(cache_dir=str(tmp_path))
    a = load_modality(save(tmp_path / "unit.npz", x, y), cfg).x.numpy().astype(np.float64)
    b = load_modality(save(tmp_path / "raw.npz", raw, y), cfg).x.numpy().astype(np.float64)
    tol = 12 * U * (np.abs(a) + 5 + 1)
    assert (np.abs(a - b) <= tol).all()
    g = load_modality(save(tmp_path / "raw.npz", raw, y), DataConfig(cache_dir=str(tmp_path), standardize="global"))
    assert float(g.x[:, 0].std()) < 1e-3          # one global scale: the small columns vanish


def _run_cfg(tmp_path, student, teacher, *extra):
    return load_config(RunConfig, None, [
        f"data.student={student}", f"data.teacher={teacher}", f"data.cache_dir={tmp_path / 'cache'}",
        "method.name=kd", "optim.epochs=6", "optim.steps_per_epoch=8", "optim.batch_size=16", "pairing.label_budget=null",
        "optim.warmup_epochs=1", "teacher.epochs=8", "teacher.batch_size=32", "model.teacher_width=16",
        "model.student_width=8", "model.teacher_feat_dim=8", "model.student_feat_dim=8", "threads=1", *extra])


def test_power_of_two_scales_give_the_same_inputs_and_the_same_trained_run(tmp_path):
    """Columns multiplied by 2^-10 .. 2^10 (six orders of magnitude): scaling by a power of two
    is exact in float32 and in every float64 step of the statistics, so the standardised inputs
    are bit-identical to the unit-scale ones, and so is the trained run."""
    y, t, x = two_views(d_s=6)
    raw = x * (2.0 ** np.linspace(-10, 10, 6)).astype(np.float32)
    teacher = save(tmp_path / "t.npz", t, y)
    unit, scaled = save(tmp_path / "unit.npz", x, y), save(tmp_path / "raw.npz", raw, y)
    cfg = DataConfig(cache_dir=str(tmp_path))
    assert torch.equal(load_modality(unit, cfg).x, load_modality(scaled, cfg).x)
    runs = [run(_run_cfg(tmp_path, s, teacher), run_dir=tmp_path / name) for s, name in ((unit, "u"), (scaled, "r"))]
    assert runs[0]["val_acc"] > 0.5                          # it learned (chance: 1/3)
    for k in ("test_acc", "val_acc", "best_epoch", "last_test_acc", "candidates"):
        assert runs[0][k] == runs[1][k], k
    off = run(_run_cfg(tmp_path, scaled, teacher, "data.standardize=global"))
    assert off["test_acc"] != runs[0]["test_acc"] or off["val_acc"] != runs[0]["val_acc"]


def test_normalisation_is_stored_with_the_run_and_loads_back(tmp_path):
    y, t, x = two_views()
    raw = x * np.logspace(-3, 3, x.shape[1]).astype(np.float32)
    student = save(tmp_path / "s.npz", raw, y)
    res = run(_run_cfg(tmp_path, student, save(tmp_path / "t.npz", t, y), "optim.epochs=1"),
              run_dir=tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "normalisation.json").read_text())
    assert stored["student"]["mode"] == "per_feature" and stored["teacher"]["mode"] == "per_feature"
    assert stored["student"]["input_shape"] == [x.shape[1]]
    st = Standardizer.load(tmp_path / "run")
    d = load_modality(student, DataConfig(cache_dir=str(tmp_path / "cache")))
    assert torch.equal(st(raw), d.x)                       # new raw inputs get exactly the run's inputs
    model = res["distiller"].student.eval()
    with torch.no_grad():
        assert torch.equal(model(st(raw[:5])), model(d.x[:5]))
