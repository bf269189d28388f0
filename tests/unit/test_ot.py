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
    _knopp,
    _plain_kernel,
    cost_matrix,
    geomloss_schedule,
    plan_cost,
    sinkhorn_cost,
    sinkhorn_plan,
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


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("permute", [False, True])
def test_identical_or_permuted_clouds_give_zero(metric, permute, backend):
    # At eps=0.01 off-diagonal plan entries are O(exp(-min_cost / eps)) <= exp(-100)
    # ~ 4e-44 relative to diagonal ones, so <P, C> is zero up to float64 rounding of
    # the (exactly 0) diagonal costs: atol 1e-12.
    zs = _spread_cloud()
    zt = zs[torch.randperm(10, generator=torch.Generator().manual_seed(0))] if permute else zs.clone()
    grad = "autodiff" if backend == "torch" else "envelope"
    val = sinkhorn_cost(zs, zt, metric, eps=0.01, backend=backend, grad=grad)
    assert val.item() == pytest.approx(0.0, abs=1e-12)
    # At the default eps=0.1 the entropic blur is visible for cosine (exp(-10) ~ 5e-5).
    assert 0 <= sinkhorn_cost(zs, zt, metric, backend=backend, grad=grad).item() < 1e-2


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


# --------------------------------------------------------------------------- #
# The fused solver, the envelope gradient and the plan API
# --------------------------------------------------------------------------- #
def easy_and_hard(seed):
    """(easy: 64-d random features / 8, POT stops after ~10 iterations for cosine; hard:
    the small clouds, cost range 20-120 x eps, POT runs all 100)."""
    zs, zt = clouds(seed, B=40, M=32, d=64)
    return (zs / 8, zt / 8), clouds(seed)


@pytest.mark.parametrize("metric", METRICS)
def test_fused_runs_pots_iterations_and_stopping_rule(metric):
    # float64: the same iterates as POT's sinkhorn_knopp up to rounding (1e-16 per
    # operation), and the same stopping iteration (POT's log['niter'] is 0-based).
    for zs, zt in easy_and_hard(20):
        C = cost_matrix(zs, zt, metric)
        a, b = uniform(C.shape[0]), uniform(C.shape[1])
        P_ref, log = ot.sinkhorn(a, b, C, reg=0.1, numItermax=100, log=True)
        u, v, T, err, _, _ = _knopp(_plain_kernel(C, 0.1), 100, 1e-9)
        assert T == log["niter"] + 1
        torch.testing.assert_close(sinkhorn_plan(C, 0.1, 100), P_ref, rtol=1e-10, atol=1e-15)
        for grad in ("envelope", "detach", "autodiff"):
            val = sinkhorn_cost(zs, zt, metric, backend="fused", grad=grad)
            assert val.item() == pytest.approx((P_ref * C).sum().item(), rel=1e-12), grad


def test_fused_stops_early_like_pot():
    zs, zt = clouds(21, B=40, M=32, d=64)
    C = cost_matrix(zs, zt)
    _, log = ot.sinkhorn(uniform(40), uniform(32), C, reg=0.1, numItermax=100, log=True)
    T = _knopp(_plain_kernel(C, 0.1), 100, 1e-9)[2]
    assert T == log["niter"] + 1 < 100


@pytest.mark.parametrize("metric", METRICS)
def test_envelope_gradient_is_pots_envelope(metric):
    # Oracle: ot.solve(..., grad="envelope") sets dValue/dC to its plan (log-domain
    # Sinkhorn, same iterates and stopping rule).  float64, so rounding is ~1e-15.
    for zs, zt in easy_and_hard(22):
        z1 = zs.clone().requires_grad_()
        C = cost_matrix(z1, zt, metric)
        res = ot.solve(C, uniform(C.shape[0]), uniform(C.shape[1]), reg=0.1, max_iter=100, grad="envelope")
        res.value.backward()
        for backend in ("fused", "pot"):
            z2 = zs.clone().requires_grad_()
            val = sinkhorn_cost(z2, zt, metric, backend=backend, grad="envelope")
            val.backward()
            assert val.item() == pytest.approx(res.value_linear.item(), rel=1e-10), backend
            torch.testing.assert_close(z2.grad, z1.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sinkhorn_plan(C.detach(), 0.1, 100), res.plan, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("backend", ["torch", "pot", "fused", "geomloss"])
def test_detach_is_an_alias_of_envelope(backend):
    zs, zt = clouds(23)
    grads = []
    for grad in ("detach", "envelope"):
        z = zs.clone().requires_grad_()
        sinkhorn_cost(z, zt, backend=backend, grad=grad).backward()
        grads.append(z.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("metric", METRICS)
def test_envelope_gradient_wrt_teacher_features(metric):
    # If zt requires grad, it gets sum_ij P_ij dC_ij/dzt too (cosine goes through a surrogate).
    zs, zt = clouds(24)
    C = cost_matrix(zs, zt, metric)
    P = ot.sinkhorn(uniform(12), uniform(9), C, reg=0.1, numItermax=100)
    z1, t1 = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    (P * cost_matrix(z1, t1, metric)).sum().backward()
    z2, t2 = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    sinkhorn_cost(z2, t2, metric, backend="fused", grad="envelope").backward()
    torch.testing.assert_close(z2.grad, z1.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(t2.grad, t1.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_fused_autodiff_is_pots_autodiff(metric):
    # The hand-written backward of backend='fused' against autograd through POT's
    # ot.sinkhorn2 (default stopThr, so the stopping rule is exercised on the easy pair).
    for zs, zt in easy_and_hard(25):
        z1 = zs.clone().requires_grad_()
        C = cost_matrix(z1, zt, metric)
        ref = ot.sinkhorn2(uniform(C.shape[0]), uniform(C.shape[1]), C, reg=0.1, numItermax=100)
        ref.backward()
        z2 = zs.clone().requires_grad_()
        val = sinkhorn_cost(z2, zt, metric, backend="fused", grad="autodiff")
        val.backward()
        assert val.item() == pytest.approx(ref.item(), rel=1e-12)
        torch.testing.assert_close(z2.grad, z1.grad, rtol=1e-9, atol=1e-12)


def test_fused_autodiff_float32_and_upstream_scale():
    # float32: ~200 sequential matvec/divide steps, each with relative rounding <= M u
    # (M = 9, u = 6e-8), bound the gradient difference by ~1e-4 relative.
    zs, zt = clouds(26, dtype=torch.float32)
    z1 = zs.clone().requires_grad_()
    C = cost_matrix(z1, zt)
    (3.0 * ot.sinkhorn2(uniform(12, torch.float32), uniform(9, torch.float32), C, reg=0.1,
                        numItermax=100)).backward()
    z2 = zs.clone().requires_grad_()
    (3.0 * sinkhorn_cost(z2, zt, backend="fused", grad="autodiff")).backward()
    torch.testing.assert_close(z2.grad, z1.grad, rtol=1e-4, atol=1e-6)


def test_fused_falls_back_to_log_domain_beyond_float_range():
    # The clouds of test_small_eps_approaches_emd at eps=0.003: (max C - min C) / eps ~ 2e3
    # exceeds float64's exp range (707), so the plain kernel is refused and the log domain
    # (same iterates, same stopping rule) gives POT's log-domain result.
    g = torch.Generator().manual_seed(5)
    zs = 0.5 * torch.randn(10, 2, dtype=F64, generator=g)
    zt = 0.5 * torch.randn(12, 2, dtype=F64, generator=g) + torch.tensor([10.0, 0.0], dtype=F64)
    C = cost_matrix(zs, zt, "l2")
    assert _plain_kernel(C, 0.003) is None
    ref = ot.sinkhorn2(uniform(10), uniform(12), C, reg=0.003, numItermax=2000, method="sinkhorn_log")
    z = zs.clone().requires_grad_()
    for grad in ("envelope", "autodiff"):
        val = sinkhorn_cost(z, zt, "l2", eps=0.003, n_iter=2000, backend="fused", grad=grad)
        assert val.item() == pytest.approx(ref.item(), rel=1e-10), grad
    # eps=0.01: POT's plain kernel exp(-C/eps) ~ exp(-1000) is all zeros, but the range
    # (max C - min C) / eps ~ 600 fits once min C is taken out: plain domain, POT's value.
    ref = ot.sinkhorn2(uniform(10), uniform(12), C, reg=0.01, numItermax=100, method="sinkhorn_log")
    assert _plain_kernel(C, 0.01) is not None
    assert sinkhorn_cost(zs, zt, "l2", eps=0.01, backend="fused").item() == pytest.approx(ref.item(), rel=1e-10)


def test_fused_with_label_cost():
    zs, zt = clouds(27)
    ys, yt = torch.arange(12) % 3, torch.arange(9) % 3
    E = 1.0 * (ys[:, None] != yt[None, :]).to(F64)
    C = cost_matrix(zs, zt) + E
    ref = ot.sinkhorn2(uniform(12), uniform(9), C, reg=0.1, numItermax=100)
    for grad in ("envelope", "autodiff"):
        val = sinkhorn_cost(zs, zt, backend="fused", grad=grad, extra_cost=E)
        assert val.item() == pytest.approx(ref.item(), rel=1e-12), grad
    val = plan_cost(sinkhorn_plan(C), zs, zt, extra_cost=E)
    assert val.item() == pytest.approx(ref.item(), rel=1e-12)


def _saved_bytes(fn):
    """(number, total bytes) of the tensors autograd saves for backward while fn() runs."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return len(saved), sum(saved)


def test_envelope_memory_does_not_grow_with_iterations():
    # eps = 0.01 on these clouds: far from the stopping rule, so n_iter iterations really run.
    zs, zt = clouds(28, B=64, M=48, d=4)
    assert _knopp(_plain_kernel(cost_matrix(zs, zt), 0.01), 60, 1e-9)[2] == 60
    zs.requires_grad_()

    def run(backend, grad, n_iter, metric="cosine"):
        return _saved_bytes(lambda: sinkhorn_cost(zs, zt, metric, eps=0.01, n_iter=n_iter, backend=backend,
                                                  grad=grad))

    for backend in ("fused", "pot", "torch"):
        for metric in METRICS:
            assert run(backend, "envelope", 5, metric) == run(backend, "envelope", 60, metric)
    # cosine envelope saves only [B, d]-sized tensors, nothing [B, M]
    count, nbytes = run("fused", "envelope", 60)
    assert nbytes <= 8 * (3 * 64 * 4 + 2 * 48 * 4 + 64 + 48)
    # fused autodiff: a fixed set of tensors (C, K and the u/v history, [n_iter, B + M]).
    n5, b5 = run("fused", "autodiff", 5)
    n60, b60 = run("fused", "autodiff", 60)
    assert n5 == n60 and b60 - b5 <= 8 * 55 * (64 + 48)
    # ... whereas autograd through the log-domain iterations keeps [B, M] tensors per
    # iteration (the check can fail):
    assert run("torch", "autodiff", 60)[1] > 5 * run("torch", "autodiff", 5)[1]


# --------------------------------------------------------------------------- #
# Partial underflow (float32, l1, eps 0.05)
# --------------------------------------------------------------------------- #
def partial_underflow_clouds(offset):
    # One student point far from every teacher point: row 3 of C / eps is 80-110
    # (offset 4.0; exp(-80) ~ 2e-35 is still a normal float32) or 98-128 (offset 4.9,
    # exp(-98) ~ 3e-43 is subnormal, the rest 0); the other rows are within ~0.1-2 / 0.05.
    zs = torch.tensor([[0.1], [0.6], [1.1], [1.5 + offset]])
    zt = torch.tensor([[0.0], [0.5], [1.0], [1.5]])
    return zs, zt


def _f64_reference(zs, zt, metric="l1", eps=0.05):
    z = zs.double().requires_grad_()
    C = cost_matrix(z, zt.double(), metric)
    val = ot.sinkhorn2(uniform(C.shape[0]), uniform(C.shape[1]), C, reg=eps, numItermax=100)
    val.backward()
    return val.item(), z.grad


def test_partial_underflow_pot_stale_iterate_is_an_error():
    # POT meets u = inf at its second iteration, warns, and returns the first iterate:
    # <P, C> inside [min C, max C] but a few percent off the float64 value.
    zs, zt = partial_underflow_clouds(4.9)
    with pytest.raises(NumericalError, match=r"metric='l1', eps=0\.05.*cost range \[min C, max C\] = "
                                             r"\[0\.1, 6\.4\].*underflow"):
        sinkhorn_cost(zs.clone().requires_grad_(), zt, "l1", eps=0.05, backend="pot")
    with pytest.raises(NumericalError, match=r"metric='l1', eps=0\.05.*cost range"):
        sinkhorn_cost(zs, zt, "l1", eps=0.05, backend="pot", grad="envelope")


def test_partial_underflow_pot_nan_gradient_is_caught_in_backward():
    # offset 4.0: POT's value is right, but its backward overflows (1/x^2 of the tiny row
    # sums) into a NaN gradient; the guard raises where that gradient is made.
    zs, zt = partial_underflow_clouds(4.0)
    ref, _ = _f64_reference(zs, zt)
    z = zs.clone().requires_grad_()
    val = sinkhorn_cost(z, zt, "l1", eps=0.05, backend="pot")
    assert val.item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(NumericalError, match=r"gradient.*not finite.*metric='l1', eps=0\.05.*cost range"):
        val.backward()


@pytest.mark.parametrize("offset", [4.0, 4.9])
@pytest.mark.parametrize("grad", ["envelope", "autodiff"])
def test_partial_underflow_fused_switches_to_log_domain(offset, grad):
    # (max C - min C) / eps = 90 / 126 > 86.3 (float32's exp range): the log domain.  Its
    # float32 rounding: log-kernel entries |C/eps| <= 130 carry absolute error <= 130 u
    # ~ 8e-6, i.e. relative ~1e-5 on each plan entry: rel 5e-5 on the value.
    zs, zt = partial_underflow_clouds(offset)
    assert _plain_kernel(cost_matrix(zs, zt, "l1"), 0.05) is None
    ref, ref_grad = _f64_reference(zs, zt)
    z = zs.clone().requires_grad_()
    val = sinkhorn_cost(z, zt, "l1", eps=0.05, backend="fused", grad=grad)
    val.backward()
    assert val.item() == pytest.approx(ref, rel=5e-5)
    assert torch.isfinite(z.grad).all()
    if grad == "autodiff":
        torch.testing.assert_close(z.grad.double(), ref_grad, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- #
# Low-precision inputs, the plan API for distributed training
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_solved_in_float32(dtype):
    zs, zt = clouds(29, dtype=torch.float32)
    zs, zt = zs.to(dtype), zt.to(dtype)
    # Oracle: POT in float32 on the same (rounded) features.
    C = cost_matrix(zs.float(), zt.float())
    ref = ot.sinkhorn2(uniform(12, torch.float32), uniform(9, torch.float32), C, reg=0.1, numItermax=100)
    for backend, grad in (("fused", "envelope"), ("fused", "autodiff"), ("pot", "autodiff")):
        z = zs.clone().requires_grad_()
        val = sinkhorn_cost(z, zt, backend=backend, grad=grad)
        assert val.dtype == torch.float32
        assert val.item() == pytest.approx(ref.item(), rel=1e-5)
        val.backward()
        assert z.grad.dtype == dtype and torch.isfinite(z.grad.float()).all()
    P = sinkhorn_plan(C.to(dtype))
    assert P.dtype == torch.float32


def test_global_plan_split_over_ranks_gives_the_full_loss():
    # Two "ranks" of 7 and 5 student rows: one global plan, each rank's loss from its rows.
    zs, zt = clouds(30)
    z = zs.clone().requires_grad_()
    full = sinkhorn_cost(z, zt, backend="fused", grad="envelope")
    full.backward()
    P = sinkhorn_plan(cost_matrix(zs, zt), eps=0.1, n_iter=100)
    parts, grads = [], []
    for rows in (slice(0, 7), slice(7, 12)):
        zr = zs[rows].clone().requires_grad_()
        part = plan_cost(P[rows], zr, zt)
        part.backward()
        parts.append(part.item())
        grads.append(zr.grad)
    assert sum(parts) == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(torch.cat(grads), z.grad, rtol=1e-12, atol=1e-14)


def test_plan_api_errors():
    zs, zt = clouds(31)
    C = cost_matrix(zs, zt)
    with pytest.raises(DataError, match=r"plan P must be \[B, M\] = \[12, 9\].*\(9, 12\)"):
        plan_cost(C.T, zs, zt)
    with pytest.raises(DataError, match=r"cost C must be a non-empty 2-D.*\(12, 9, 1\)"):
        sinkhorn_plan(C[..., None])
    with pytest.raises(ConfigError, match=r"unknown backend 'geomloss'.*'fused', 'pot', 'torch'"):
        sinkhorn_plan(C, backend="geomloss")
    with pytest.raises(ConfigError, match=r"stop_thr must be a float >= 0"):
        sinkhorn_plan(C, stop_thr=-1.0)
    bad = C.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NumericalError, match="cost C contain NaN"):
        sinkhorn_plan(bad)


def test_benchmark_table_is_importable_and_complete():
    # benchmarks/cost.py builds on ot_table: every variant gets a row, values agree with POT.
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "ot_solvers.py"
    spec = importlib.util.spec_from_file_location("ot_solvers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = mod.ot_table(batch_sizes=(8,), dim=4, repeats=1, memory=False)
    rows = [line for line in table.splitlines() if line.startswith("| 8 |")]
    assert [r.split(" | ")[1] for r in rows] == [label for label, _ in mod.VARIANTS.values()]
    for r in rows:
        assert float(r.rstrip(" |").split(" | ")[-1]) < 1e-5
    mem = mod.measure_memory("fused-envelope", 8, mod.parse_args(["--dim", "4"]))
    assert mem is None or mem >= 0
