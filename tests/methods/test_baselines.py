"""Baseline distillers (dkd, fitnet, fa-only, mmd, norm, paired-kd) and their loss functions."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ucmkd.methods.dkd  # noqa: F401  (registration, also when ucmkd.methods does not list them)
import ucmkd.methods.fa_only  # noqa: F401
import ucmkd.methods.fitnet  # noqa: F401
import ucmkd.methods.mmd  # noqa: F401
import ucmkd.methods.norm  # noqa: F401
import ucmkd.methods.paired_kd  # noqa: F401
from ucmkd.api import run
from ucmkd.config import RunConfig, SyntheticConfig
from ucmkd.data.pairing import Batch
from ucmkd.engine.strategies import STRATEGIES
from ucmkd.errors import ConfigError
from ucmkd.losses.dkd import dkd_loss, dkd_terms
from ucmkd.losses.feature_regression import fitnet_loss, norm_loss
from ucmkd.losses.kd import kd_kl
from ucmkd.losses.mmd import mmd2
from ucmkd.losses.ot import sinkhorn_cost
from ucmkd.methods import METHODS, build_distiller
from ucmkd.models import build_classifier

import references as ref
from helpers import tiny

BASELINES = ["dkd", "fitnet", "fa-only", "mmd", "norm", "paired-kd"]

# regression pins (6 decimals); each is also checked against an independent NumPy computation
DKD_GOLDEN = 3.624204   # float64 (the float32 result printed 3.624205)
MMD_GOLDEN = 0.347918
FITNET_GOLDEN = 1.083333
NORM_GOLDEN = 0.500000




def _params(name):
    return {"n_iter": 10} if name == "fa-only" else {}


def test_registration_flags():
    assert all(n in METHODS for n in BASELINES)
    assert METHODS.get("paired-kd").needs_pairs
    assert not any(METHODS.get(n).needs_pairs for n in BASELINES if n != "paired-kd")
    assert all(METHODS.get(n).uses_teacher for n in BASELINES)


def test_default_params():
    P = {n: METHODS.get(n).Params() for n in BASELINES}
    assert (P["dkd"].alpha, P["dkd"].beta, P["dkd"].temperature, P["dkd"].warmup) == (1.0, 8.0, 4.0, 0.1)
    assert P["fitnet"].weight == 1.0 and P["fa-only"].w_fa == 1.0
    assert P["mmd"].weight == 1.0 and list(P["mmd"].factors) == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert (P["norm"].n, P["norm"].weight) == (4, 1.0)
    assert (P["paired-kd"].temperature, P["paired-kd"].alpha) == (4.0, 0.9)


# ----------------------------------------------------------------------------- DKD
DKD_S = [[1.0, 0.0, -1.0, 0.5], [0.5, 0.5, 0.0, -0.5], [2.0, -1.0, 0.0, 1.0]]
DKD_T = [[2.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, -1.0]]
DKD_Y = [0, 1, 2]


def _kl_scale(s, t, T):
    """T^2 * mean_i sum_k p_t (|log p_t| + |log p_s|): the size of the terms a KL sums."""
    lt, ls = ref.log_softmax(np.asarray(t) / T), ref.log_softmax(np.asarray(s) / T)
    return T * T * float(np.mean((np.exp(lt) * (np.abs(lt) + np.abs(ls))).sum(1)))


def test_dkd_golden_value():
    tckd, nckd = ref.dkd_terms(DKD_S, DKD_T, DKD_Y, 4.0)
    expected = tckd + 8.0 * nckd
    assert abs(expected - DKD_GOLDEN) <= 5e-7                 # the pin: 6 decimals
    s64, t64, y = torch.tensor(DKD_S, dtype=torch.float64), torch.tensor(DKD_T, dtype=torch.float64), torch.tensor(DKD_Y)
    assert float(dkd_loss(s64, t64, y, alpha=1.0, beta=8.0, temperature=4.0)) == pytest.approx(expected, rel=ref.REL64)
    a, b = dkd_terms(s64, t64, y, 4.0)
    assert float(0.5 * a + 2.0 * b) == pytest.approx(float(dkd_loss(s64, t64, y, 0.5, 2.0, 4.0)), rel=ref.REL64)
    # float32: ~20 roundings (log-sum-exps, differences, products, sums) on terms of size _kl_scale,
    # for TCKD and for NCKD (weight 8)
    got32 = float(dkd_loss(torch.tensor(DKD_S), torch.tensor(DKD_T), y, 1.0, 8.0, 4.0))
    assert abs(got32 - expected) <= ref.f32_bound(20, 9.0 * _kl_scale(DKD_S, DKD_T, 4.0))


def test_dkd_decomposes_kd_and_vanishes_on_equal_logits():
    # per item (Zhao et al., Eq. 7): KD = TCKD + (1 - p_t[y]) * NCKD
    # An identity between two formulas: checked in float64, where both sides agree to ~1e-15 relative
    # (a KL of ~0.09 is a difference of O(1) log terms, so float32 gives only ~1e-5: CPU-dependent).
    T = 4.0
    for si, ti, yi in zip(DKD_S, DKD_T, DKD_Y):
        s, t = torch.tensor([si], dtype=torch.float64), torch.tensor([ti], dtype=torch.float64)
        y = torch.tensor([yi])
        pt_y = float(torch.softmax(t / T, 1)[0, yi])
        assert float(dkd_loss(s, t, y, 1.0, 1.0 - pt_y, T)) == pytest.approx(float(kd_kl(s, t, T)), rel=1e-12)
    s = torch.tensor(DKD_S, dtype=torch.float64)
    tckd, nckd = dkd_terms(s, s.clone(), torch.tensor(DKD_Y), T)
    assert abs(float(tckd)) < 1e-13 and abs(float(nckd)) < 1e-13


def test_dkd_warmup_ramps_the_kd_weight():
    teacher, student, batch = tiny()
    d = build_distiller("dkd", student, teacher).eval()
    with torch.no_grad():
        t_logits = teacher(batch.xt)
    full = None
    for progress, w in [(0.0, 0.0), (0.05, 0.5), (0.1, 1.0), (0.7, 1.0)]:
        d.progress = progress
        out = d(batch)
        kd = (out.losses["tckd"] + out.losses["nckd"]).detach()
        if full is None:
            full = dkd_loss(out.logits, t_logits, batch.ys, 1.0, 8.0, 4.0).detach()
            assert float(full) > 0
        # the same float32 terms, weighted before or after their sum: 4 roundings of positive terms
        assert float(kd) == pytest.approx(w * float(full), rel=4 * ref.EPS32)
        assert torch.equal(out.losses["ce"], F.cross_entropy(out.logits, batch.ys))
    with pytest.raises(ConfigError, match="warmup"):
        build_distiller("dkd", student, teacher, {"warmup": 2.0})


# ----------------------------------------------------------------------------- MMD
MMD_X = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
MMD_Y = [[1.0, 1.0], [2.0, 0.5], [0.5, 3.0], [1.5, 2.0]]


def test_mmd2_golden_value():
    """float64 against the NumPy reference (the float32 path is the same dtype-generic code)."""
    x, y = torch.tensor(MMD_X, dtype=torch.float64), torch.tensor(MMD_Y, dtype=torch.float64)
    expected = ref.mmd2(MMD_X, MMD_Y, (0.25, 0.5, 1.0, 2.0, 4.0))
    assert abs(expected - MMD_GOLDEN) <= 5e-7
    assert float(mmd2(x, y)) == pytest.approx(expected, rel=ref.REL64)
    assert float(mmd2(x, y, [1.0])) == pytest.approx(ref.mmd2(MMD_X, MMD_Y, (1.0,)), rel=ref.REL64)


def test_mmd2_zero_on_same_sample_and_grows_with_a_mean_shift():
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
    assert float(mmd2(x, x)) == 0.0          # the three kernel blocks hold the same numbers: exact
    vals = [float(mmd2(x, x + s)) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(vals, vals[1:])), vals
    xr = x.clone().requires_grad_(True)
    mmd2(xr, x + 1.0).backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all() and float(xr.grad.abs().sum()) > 0
    same = torch.ones(4, 3, requires_grad=True)   # identical points: median 0 is floored, no NaN
    v = mmd2(same, torch.ones(4, 3))
    v.backward()
    assert float(v.detach()) == 0.0 and torch.isfinite(same.grad).all()


def test_mmd_rejects_empty_factors():
    teacher, student, _ = tiny(6)
    with pytest.raises(ConfigError, match="factors"):
        build_distiller("mmd", student, teacher, {"factors": []})


# ----------------------------------------------------------------------------- FitNet / NORM
FR_PRED = [[1.0, 2.0, 0.0], [0.0, -1.0, 0.5]]
FR_TGT = [[0.5, 1.0, 1.0], [1.0, 0.0, -1.0]]
NORM_EXP = [[1.0, 2.0, 0.0, 1.0], [0.0, -1.0, 0.5, 0.5]]   # N = 2 segments of d = 2
NORM_TGT = [[0.5, 1.0], [1.0, 0.0]]


def test_fitnet_and_norm_golden_values():
    """Exactly representable inputs: differences, squares and sums are exact in float32, and the
    final division by the count rounds once (relative error <= eps32 / 2)."""
    expected = ref.mse(FR_PRED, FR_TGT)
    assert abs(expected - FITNET_GOLDEN) <= 5e-7
    assert float(fitnet_loss(torch.tensor(FR_PRED), torch.tensor(FR_TGT))) == pytest.approx(expected, rel=ref.EPS32)
    e = np.array(NORM_EXP)
    expected = np.mean([ref.mse(e[:, k * 2:(k + 1) * 2], NORM_TGT) for k in range(2)])
    assert abs(expected - NORM_GOLDEN) <= 5e-7
    got = float(norm_loss(torch.tensor(NORM_EXP), torch.tensor(NORM_TGT), 2))
    assert got == pytest.approx(expected, rel=2 * ref.EPS32)      # two means: two roundings
    with pytest.raises(ValueError, match="N = 3"):
        norm_loss(torch.tensor(NORM_EXP), torch.tensor(NORM_TGT), 3)


def _twin():
    """Student and teacher of the same architecture and weights, xt = xs: z_t == z_s in eval."""
    torch.manual_seed(0)
    student = build_classifier((1, 12), "signal", 3, width=4, feat_dim=8)
    teacher = copy.deepcopy(student)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 1, 12, generator=g), torch.randint(0, 3, (10,), generator=g)
    return student, teacher, Batch(x, y, x.clone(), y)


def test_fitnet_zero_when_the_regressor_maps_exactly():
    student, teacher, batch = _twin()
    d = build_distiller("fitnet", student, teacher).eval()
    with torch.no_grad():
        d.extra["regressor"].weight.copy_(torch.eye(8))
        d.extra["regressor"].bias.zero_()
    # z @ I^T is exact (products by 0 and 1, sums with zeros) and z_t == z_s bit for bit
    assert float(d(batch).losses["fitnet"].detach()) == 0.0
    with torch.no_grad():
        d.extra["regressor"].bias.fill_(0.5)     # a constant offset of 0.5: MSE = 0.25
        zmax = float(student.features(batch.xs).abs().max())
    # each (z + 0.5) - z is 0.5 within eps32 (|z| + 0.5); squared, averaged: a few roundings more
    assert float(d(batch).losses["fitnet"].detach()) == pytest.approx(0.25, abs=ref.f32_bound(4, zmax + 1.0))


def test_norm_zero_when_the_expansion_tiles_exactly():
    student, teacher, batch = _twin()
    d = build_distiller("norm", student, teacher, {"weight": 3.0}).eval()
    assert d.extra["expander"].weight.shape == (4 * 8, 8)
    with torch.no_grad():
        d.extra["expander"].weight.copy_(torch.eye(8).repeat(4, 1))
        d.extra["expander"].bias.zero_()
    assert float(d(batch).losses["norm"].detach()) == 0.0        # exact, as for fitnet above
    with torch.no_grad():
        d.extra["expander"].bias[:8].fill_(1.0)  # one of 4 segments off by 1: MSE = 1/4, x weight 3
        zmax = float(student.features(batch.xs).abs().max())
    assert float(d(batch).losses["norm"].detach()) == pytest.approx(0.75, abs=ref.f32_bound(4, 3 * (zmax + 2.0)))


@pytest.mark.parametrize("name,key,shape", [("fitnet", "regressor", (8, 6)), ("norm", "expander", (32, 6))])
@pytest.mark.parametrize("student_feat", [8, 6])
def test_extras_are_trained_and_checkpointed(name, key, shape, student_feat):
    teacher, student, batch = tiny(student_feat)
    d = build_distiller(name, student, teacher)
    assert "projector" not in d.extra   # replaced by the method's own map
    mod = d.extra[key]
    assert mod.weight.shape == (shape[0], student_feat)
    ids = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in ids for p in mod.parameters())
    state = d.trainable_state_dict()
    assert {f"{key}.weight", f"{key}.bias"} <= set(state["extra"])
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    before = mod.weight.detach().clone()
    STRATEGIES.get(d.strategy)(d, opt, 5.0).step(batch)
    assert not torch.equal(before, mod.weight), "the extra module was not optimised"
    d2 = build_distiller(name, copy.deepcopy(student), teacher)
    d2.load_trainable_state_dict(d.trainable_state_dict())
    assert torch.equal(d2.extra[key].weight, mod.weight)


# ----------------------------------------------------------------------------- FA only
@pytest.mark.parametrize("student_feat", [8, 6])
def test_fa_only_is_ce_plus_fa(student_feat):
    teacher, student, batch = tiny(student_feat)
    d = build_distiller("fa-only", student, teacher, {"n_iter": 10, "w_fa": 2.5})
    out = d(batch)
    assert set(out.losses) == {"ce", "fa"}
    with torch.no_grad():
        z, logits = student(batch.xs, return_features=True)
        zt = teacher.features(batch.xt)
        fa = sinkhorn_cost(d.project(z), zt, metric="cosine", eps=0.1, n_iter=10, backend="pot")
        expected = F.cross_entropy(logits, batch.ys) + 2.5 * fa
    assert torch.equal(out.total.detach(), expected)          # the same float32 arithmetic


# ----------------------------------------------------------------------------- paired KD
def _paired_cfg(mode):
    cfg = RunConfig()
    cfg.data.teacher, cfg.data.student = "synthetic/a", "synthetic/b"
    cfg.data.synthetic = SyntheticConfig(n_items=300, num_classes=3)
    cfg.pairing.mode = mode
    cfg.teacher.epochs = 1
    cfg.teacher.batch_size = 32
    cfg.optim.epochs = 1
    cfg.optim.steps_per_epoch = 2
    cfg.optim.batch_size = 16
    cfg.optim.warmup_epochs = 0
    cfg.model.teacher_width = cfg.model.student_width = 8
    cfg.model.teacher_feat_dim = cfg.model.student_feat_dim = 8
    cfg.method.name = "paired-kd"
    return cfg


def test_paired_kd_runs_on_true_pairs_and_rejects_other_pairings():
    res = run(_paired_cfg("paired"))
    assert res["method"] == "paired-kd" and res["epochs"] == 1
    assert 0.0 <= res["test_acc"] <= 1.0
    for mode in ("class-matched", "unpaired"):
        with pytest.raises(ConfigError, match=r"pairing\.mode"):
            run(_paired_cfg(mode))


@pytest.mark.parametrize("name", ["kd", "dkd", "fitnet", "norm", "c2kd"])
def test_item_for_item_methods_reject_a_mismatched_teacher_batch(name):
    from ucmkd.errors import DataError

    teacher, student, batch = tiny()
    d = build_distiller(name, student, teacher)
    batch.xt = batch.xt[:7]
    with pytest.raises(DataError, match="teacher batch of 7 items must match the student batch of 10"):
        d(batch)
