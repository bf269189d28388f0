"""Tests for the feature-alignment OT loss (ucmkd.losses.ot)."""

import math
import warnings

import ot
import pytest
import torch

from ucmkd.errors import ConfigError, DataError, NumericalError
from ucmkd.losses.ot import (
    BACKENDS,
    METRICS,
    FeatureAlignmentLoss,
    cost_matrix,
    geomloss_schedule,
    sinkhorn_cost,
)

F64 = torch.float64

# POT warns whenever numItermax is reached (always, with stopThr=0): expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Sinkhorn did not converge:UserWarning")


def clouds(seed, B=12, M=9, d=5, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, dtype=dtype, generator=g), torch.randn(M, d, dtype=dtype, generator=g)


def uniform(n, dtype=F64):
    return torch.full((n,), 1.0 / n, dtype=dtype)


def pot_value(zs, zt, metric, eps=0.1, **kw):
    """The authors' computation: ot.sinkhorn2 on the torch cost matrix."""
    C = cost_matrix(zs, zt, metric)
    return ot.sinkhorn2(uniform(C.shape[0]), uniform(C.shape[1]), C, reg=eps, **kw)


def converged_value(zs, zt, metric, eps=0.1):
    C = cost_matrix(zs, zt, metric)
    return ot.sinkhorn2(
        uniform(C.shape[0]), uniform(C.shape[1]), C, reg=eps,
        method="sinkhorn_log", numItermax=100_000, stopThr=1e-13,
    )


# --------------------------------------------------------------------------- #
# Cost matrix
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("metric", METRICS)
def test_cost_matrix_matches_definition(metric):
    zs, zt = clouds(0)
    C = cost_matrix(zs, zt, metric)
    assert C.shape == (12, 9)
    xs, xt = zs[:, None, :], zt[None, :, :]
    if metric == "cosine":
        ref = 1 - torch.nn.functional.cosine_similarity(xs, xt, dim=-1)
    elif metric == "chordal":
        ref = (xs / xs.norm(dim=-1, keepdim=True) - xt / xt.norm(dim=-1, keepdim=True)).norm(dim=-1)
    elif metric == "l2":
        ref = (xs - xt).norm(dim=-1)
    else:
        ref = (xs - xt).abs().sum(-1)
    torch.testing.assert_close(C, ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- #
# Values against POT
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n_iter", [1, 7, 100])
def test_torch_matches_pot_iteration_for_iteration(metric, n_iter):
    # stopThr=0: POT runs exactly n_iter iterations, as our torch backend does.
    zs, zt = clouds(1)
    ref = pot_value(zs, zt, metric, numItermax=n_iter, stopThr=0.0)
    for grad in ("autodiff", "detach"):
        val = sinkhorn_cost(zs, zt, metric, n_iter=n_iter, backend="torch", grad=grad)
        assert abs(val.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("metric", METRICS)
def test_pot_backend_is_sinkhorn2(metric):
    zs, zt = clouds(2)
    ref = pot_value(zs, zt, metric, numItermax=100)  # the authors' call, default stopThr
    for grad in ("autodiff", "detach"):
        val = sinkhorn_cost(zs, zt, metric, backend="pot", grad=grad)
        assert val.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)


def test_backends_agree_on_random_64d_cosine():
    # Random high-dim features have near-constant cosine cost (~1 +- 0.15): at eps=0.1
    # Sinkhorn converges in ~10 iterations, so all backends agree with the converged plan.
    zs, zt = clouds(3, B=32, M=32, d=64)
    conv = converged_value(zs, zt, "cosine").item()
    for backend in BACKENDS:
        val = sinkhorn_cost(zs, zt, backend=backend, grad="detach").item()
        assert val == pytest.approx(conv, rel=1e-3), backend
    assert sinkhorn_cost(zs, zt, backend="torch").item() == pytest.approx(conv, rel=1e-10)


@pytest.mark.parametrize("metric", METRICS)
def test_geomloss_matches_converged_pot(metric):
    # GeomLoss anneals eps from max C to eps in ~n_iter steps (one symmetric update each)
    # and we rebuild P from its potentials.  The annealing lags behind, so <P, C> is not
    # exactly converged.  Measured over 8 seeds on these 12 x 10, d=5 clouds (cost range
    # 20-120 x eps, a hard problem): max relative error 1.5% (cosine), 1.0% (chordal),
    # 2.3% (l2), 2.5% (l1) at n_iter=100 and <= 0.36% at n_iter=1000.  Tolerances are
    # twice/three times those, and the error must shrink with n_iter.
    zs, zt = clouds(4, B=12, M=10)
    conv = converged_value(zs, zt, metric).item()
    err100 = abs(sinkhorn_cost(zs, zt, metric, backend="geomloss", grad="detach").item() / conv - 1)
    err1000 = abs(
        sinkhorn_cost(zs, zt, metric, n_iter=1000, backend="geomloss", grad="detach").item() / conv - 1
    )
    assert err100 < 5e-2
    assert err1000 < 1e-2
    assert err1000 < err100


def test_geomloss_backend_restores_grad_mode():
    # GeomLoss switches the global grad mode off and on inside its loop.
    zs, zt = clouds(16)
    with torch.no_grad():
        sinkhorn_cost(zs, zt, backend="geomloss", grad="detach")
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_geomloss_schedule():
    diameter, scaling = geomloss_schedule(2.0, 0.1, 100)
    assert diameter == 2.0 and scaling == pytest.approx(20 ** (-1 / 100))
    diameter, scaling = geomloss_schedule(0.01, 0.1, 100)  # all costs below eps
    assert diameter == 0.1 and 0 < scaling < 1


def test_small_eps_approaches_emd():
    # Two well-separated clouds (~10 apart) with l2 cost: exp(-C/eps) underflows in
    # float64 for eps=0.01, so only the log-domain solver works.  For the entropic plan,
    # 0 <= <P_eps, C> - OT <= eps * (H(P_eps) - H(P_0)) <= eps * log(min(B, M)).
    g = torch.Generator().manual_seed(5)
    zs = 0.5 * torch.randn(10, 2, dtype=F64, generator=g)
    zt = 0.5 * torch.randn(12, 2, dtype=F64, generator=g) + torch.tensor([10.0, 0.0], dtype=F64)
    C = cost_matrix(zs, zt, "l2")
    emd = ot.emd2(uniform(10), uniform(12), C).item()
    gaps = []
    for eps in (0.03, 0.01, 0.003):
        val = sinkhorn_cost(zs, zt, "l2", eps=eps, n_iter=2000).item()
        gap = val - emd
        assert -1e-9 <= gap <= eps * math.log(10), eps
        gaps.append(gap)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[-1] / emd < 1e-3


def test_pot_underflow_is_an_error_not_a_zero_loss():
    # Same clouds: POT's kernel exp(-C/0.01) ~ exp(-1000) is all zeros; POT only warns and
    # returns a zero plan (loss 0).  We turn that into a NumericalError.
    g = torch.Generator().manual_seed(5)
    zs = 0.5 * torch.randn(10, 2, dtype=F64, generator=g)
    zt = 0.5 * torch.randn(12, 2, dtype=F64, generator=g) + torch.tensor([10.0, 0.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NumericalError, match="underflow"):
            sinkhorn_cost(zs, zt, "l2", eps=0.01, backend="pot")
    assert sinkhorn_cost(zs, zt, "l2", eps=0.01, backend="torch").item() > 9.0


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("metric", METRICS)
def test_autodiff_gradient_matches_pot(metric):
    zs, zt = clouds(6)
    zs1 = zs.clone().requires_grad_()
    C = cost_matrix(zs1, zt, metric)
    ot.sinkhorn2(uniform(12), uniform(9), C, reg=0.1, numItermax=100, stopThr=0.0).backward()
    zs2 = zs.clone().requires_grad_()
    sinkhorn_cost(zs2, zt, metric, backend="torch", grad="autodiff").backward()
    torch.testing.assert_close(zs2.grad, zs1.grad, rtol=1e-5, atol=1e-5)
    zs3 = zs.clone().requires_grad_()
    sinkhorn_cost(zs3, zt, metric, backend="pot", grad="autodiff").backward()
    torch.testing.assert_close(zs3.grad, zs1.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_detach_gradient_is_plan_weighted_cost_gradient(metric):
    # grad="detach": d/dzs sum_ij P_ij C_ij with P held fixed (same for torch and pot).
    zs, zt = clouds(7)
    C0 = cost_matrix(zs, zt, metric)
    P = ot.sinkhorn(uniform(12), uniform(9), C0, reg=0.1, numItermax=100, stopThr=0.0)
    zs1 = zs.clone().requires_grad_()
    (P * cost_matrix(zs1, zt, metric)).sum().backward()
    for backend in ("torch", "pot"):
        zs2 = zs.clone().requires_grad_()
        sinkhorn_cost(zs2, zt, metric, backend=backend, grad="detach").backward()
        torch.testing.assert_close(zs2.grad, zs1.grad, rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient():
    zs, zt = clouds(8)
    zs.requires_grad_()
    zt.requires_grad_()
    for backend, grad in (("torch", "autodiff"), ("torch", "detach"), ("pot", "autodiff"),
                          ("geomloss", "detach")):
        zs.grad = None
        FeatureAlignmentLoss(backend=backend, grad=grad)(zs, zt).backward()
        assert zt.grad is None, backend
        assert zs.grad is not None and torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0


@pytest.mark.parametrize("metric", ["l2", "l1", "chordal", "cosine"])
@pytest.mark.parametrize("grad", ["autodiff", "detach"])
def test_finite_gradient_at_coincident_points(metric, grad):
    zs, zt = clouds(9)
    zt[0] = zs[0]
    zt[3] = zs[5]
    zs.requires_grad_()
    loss = sinkhorn_cost(zs, zt, metric, grad=grad)
    (g,) = torch.autograd.grad(loss, zs)
    assert torch.isfinite(g).all()
    assert cost_matrix(zs, zt, metric)[0, 0].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("grad", ["autodiff", "detach"])
def test_finite_gradient_with_zero_feature_vector(grad):
    zs, zt = clouds(10)
    zs[2] = 0.0
    zt[4] = 0.0
    zs.requires_grad_()
    for metric in ("cosine", "chordal"):
        C = cost_matrix(zs, zt, metric)
        assert torch.isfinite(C).all()
        (g,) = torch.autograd.grad(sinkhorn_cost(zs, zt, metric, grad=grad), zs)
        assert torch.isfinite(g).all(), metric
    assert cost_matrix(zs, zt, "cosine")[2, 0].item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- #
# Known answers
# --------------------------------------------------------------------------- #
def _spread_cloud():
    # +-3 e_k in R^5: pairwise cost >= 1 (cosine), sqrt(2) (chordal), 3 sqrt(2) (l2), 6 (l1).
    eye = 3.0 * torch.eye(5, dtype=F64)
    return torch.cat([eye, -eye])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("permute", [False, True])
def test_identical_or_permuted_clouds_give_zero(metric, permute):
    # At eps=0.01 off-diagonal plan entries are O(exp(-min_cost / eps)) <= exp(-100)
    # ~ 4e-44 relative to diagonal ones, so <P, C> is zero up to float64 rounding of
    # the (exactly 0) diagonal costs: atol 1e-12.
    zs = _spread_cloud()
    zt = zs[torch.randperm(10, generator=torch.Generator().manual_seed(0))] if permute else zs.clone()
    val = sinkhorn_cost(zs, zt, metric, eps=0.01)
    assert val.item() == pytest.approx(0.0, abs=1e-12)
    # At the default eps=0.1 the entropic blur is visible for cosine (exp(-10) ~ 5e-5).
    assert 0 <= sinkhorn_cost(zs, zt, metric).item() < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "metric,x,y,expected",
    [
        ("l2", (0.0, 0.0), (3.0, 4.0), 5.0),
        ("l1", (0.0, 0.0), (3.0, 4.0), 7.0),
        ("cosine", (1.0, 0.0), (0.0, 2.0), 1.0),
        ("cosine", (1.0, 0.0), (3.0, 4.0), 0.4),
        ("cosine", (1.0, 0.0), (-5.0, 0.0), 2.0),
        ("chordal", (1.0, 0.0), (0.0, 2.0), math.sqrt(2.0)),
        ("chordal", (2.0, 0.0), (-1.0, 0.0), 2.0),
    ],
)
def test_two_diracs_give_their_distance(backend, metric, x, y, expected):
    zs = torch.tensor([x], dtype=F64)
    zt = torch.tensor([y], dtype=F64)
    val = sinkhorn_cost(zs, zt, metric, backend=backend, grad="detach")
    assert val.item() == pytest.approx(expected, rel=1e-12)


def test_float32_and_half_inputs():
    zs, zt = clouds(11)
    ref = sinkhorn_cost(zs, zt).item()
    v32 = sinkhorn_cost(zs.float(), zt.float())
    assert v32.dtype == torch.float32 and v32.item() == pytest.approx(ref, rel=1e-4)
    vh = sinkhorn_cost(zs.half(), zt.float())
    assert vh.dtype == torch.float32 and vh.item() == pytest.approx(ref, rel=1e-2)


def test_module_repr_and_defaults():
    loss = FeatureAlignmentLoss()
    assert (loss.metric, loss.eps, loss.n_iter, loss.backend, loss.grad) == (
        "cosine", 0.1, 100, "torch", "autodiff")
    assert "metric='cosine'" in repr(loss)
    zs, zt = clouds(12)
    assert loss(zs, zt).item() == pytest.approx(sinkhorn_cost(zs, zt).item(), rel=1e-14)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def test_wrong_shapes():
    zs, zt = clouds(13)
    with pytest.raises(DataError, match=r"student features zs must be 2-D.*\(12, 5, 1\)"):
        sinkhorn_cost(zs[..., None], zt)
    with pytest.raises(DataError, match=r"teacher features zt must be 2-D.*\(9,\)"):
        sinkhorn_cost(zs, zt[:, 0])
    with pytest.raises(DataError, match=r"feature dims differ.*\(12, 5\).*\(9, 4\)"):
        sinkhorn_cost(zs, zt[:, :4])
    with pytest.raises(DataError, match=r"student features zs are empty.*\(0, 5\)"):
        sinkhorn_cost(zs[:0], zt)
    with pytest.raises(DataError, match=r"teacher features zt must be floating point"):
        sinkhorn_cost(zs, zt.long())
    with pytest.raises(DataError, match=r"student features zs must be a torch.Tensor"):
        sinkhorn_cost(zs.numpy(), zt)


def test_unknown_names():
    zs, zt = clouds(14)
    with pytest.raises(ConfigError, match=r"unknown metric 'cos'.*'cosine', 'chordal', 'l2', 'l1'"):
        sinkhorn_cost(zs, zt, metric="cos")
    with pytest.raises(ConfigError, match=r"unknown metric 'l3'.*'cosine'"):
        cost_matrix(zs, zt, "l3")
    with pytest.raises(ConfigError, match=r"unknown backend 'keops'.*'torch', 'pot', 'geomloss'"):
        sinkhorn_cost(zs, zt, backend="keops")
    with pytest.raises(ConfigError, match=r"unknown grad 'implicit'.*'autodiff', 'detach'"):
        sinkhorn_cost(zs, zt, grad="implicit")
    with pytest.raises(ConfigError, match=r"geomloss.*only grad='detach'"):
        FeatureAlignmentLoss(backend="geomloss")
    with pytest.raises(ConfigError, match=r"unknown metric 'bad'"):
        FeatureAlignmentLoss(metric="bad")
    with pytest.raises(ConfigError, match=r"eps must be a finite float > 0, got 0"):
        sinkhorn_cost(zs, zt, eps=0)
    with pytest.raises(ConfigError, match=r"n_iter must be an int >= 1, got 0"):
        FeatureAlignmentLoss(n_iter=0)


def test_non_finite_inputs():
    zs, zt = clouds(15)
    bad = zs.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(NumericalError, match="feature alignment: student features contain NaN"):
        sinkhorn_cost(bad, zt)
    bad = zt.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="feature alignment: teacher features contain inf"):
        FeatureAlignmentLoss()(zs, bad)
