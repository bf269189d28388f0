"""The OT solve's result object (``solve_sample``, ``solve``, ``FeatureAlignmentLoss.solve``) and
the route of its statistics into a method's per-step metrics."""
import copy
import math

import pytest
import torch

from ucmkd.losses.ot import (BACKENDS, STOP_THR, FeatureAlignmentLoss, OTResult, cost_matrix, sinkhorn_cost,
                             sinkhorn_plan, solve, solve_sample)
from ucmkd.methods import build_distiller

from helpers import tiny

pytestmark = pytest.mark.filterwarnings("ignore:Sinkhorn did not converge:UserWarning")

SOLVES = [(b, g) for b in BACKENDS for g in ("autodiff", "envelope") if not (b == "geomloss" and g == "autodiff")]
DTYPES = (torch.float64, torch.float32)


def clouds(dtype, seed=5, B=24, M=20, d=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(M, d, generator=g, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,grad", SOLVES)
def test_result_fields(backend, grad, dtype):
    zs, zt = clouds(dtype)
    B, M, n_iter = zs.shape[0], zt.shape[0], 50
    z = zs.clone().requires_grad_()
    res = solve_sample(z, zt, eps=0.1, n_iter=n_iter, backend=backend, grad=grad)
    assert isinstance(res, OTResult)
    assert res.value.shape == () and res.value.dtype == dtype and res.value.requires_grad
    same = sinkhorn_cost(zs, zt, eps=0.1, n_iter=n_iter, backend=backend, grad=grad)
    assert torch.equal(res.value.detach(), same)
    P = res.plan
    assert P.shape == (B, M) and P.dtype == dtype and not P.requires_grad
    assert res.plan is P                                  # formed once
    assert set(res.stats()) == {"iterations", "plan_entropy"}
    if backend == "geomloss":                             # eps-scaling steps, not Sinkhorn iterations
        assert math.isnan(res.iterations)
        return
    assert res.iterations == int(res.iterations) and 1 <= res.iterations <= n_iter
    if backend == "torch":
        assert res.iterations == n_iter
    # <P, C>: B M products of entries <= 2 (cosine) summed, each rounding relative eps
    C = cost_matrix(zs, zt)
    assert float(res.value.detach()) == pytest.approx(float((P * C).sum()), abs=B * M * 2 * torch.finfo(dtype).eps)
    # a plan with marginals 1/B, 1/M has max(log B, log M) <= H(P) <= log B + log M
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert max(math.log(B), math.log(M)) - tol <= res.plan_entropy <= math.log(B * M) + tol
    res.value.backward()                                  # the statistics do not hold up backward
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,grad", [s for s in SOLVES if s[0] != "geomloss"])
def test_the_plan_has_the_marginals(backend, grad, dtype):
    # eps 0.5 and cosine costs in [0, 2]: Sinkhorn contracts by <= tanh(2 / (4 * 0.5))^2 = 0.58
    # per iteration, so after 200 iterations only rounding is left, except where POT's stopping
    # rule ended the solve first (float64), which leaves |P^T 1 - b|_2 < STOP_THR.
    zs, zt = clouds(dtype)
    B, M, eps, n_iter = zs.shape[0], zt.shape[0], 0.5, 200
    res = solve_sample(zs.clone().requires_grad_(), zt, eps=eps, n_iter=n_iter, backend=backend, grad=grad)
    P = res.plan.double()                                 # sums of the plan's entries without new rounding
    # each entry: a few roundings, the sum behind its scaling up to max(B, M) more, and in the
    # log domain the exponent's rounding, |log P| <= log(B M) + max C / eps (max C <= 2)
    e = torch.finfo(dtype).eps
    rel = (B + M + 3 * (math.log(B * M) + 2 / eps)) * e
    assert float((P.sum(1) * B - 1).abs().max()) <= rel
    if res.iterations < n_iter:
        assert backend != "torch"
        assert res.marginal_error < STOP_THR + M * e
    else:
        assert float((P.sum(0) * M - 1).abs().max()) <= rel
    assert res.marginal_error == pytest.approx(float(torch.linalg.vector_norm(P.sum(0) - 1 / M)), abs=M * e)


@pytest.mark.parametrize("backend", ["fused", "pot", "torch"])
def test_solve_a_cost_matrix(backend):
    zs, zt = clouds(torch.float64)
    C = cost_matrix(zs, zt)
    res = solve(C, eps=0.1, n_iter=100, backend=backend)
    assert torch.equal(res.plan, sinkhorn_plan(C, 0.1, 100, backend=backend))
    assert not res.value.requires_grad and torch.equal(res.value, (res.plan * C).sum())
    assert 1 <= res.iterations <= 100


def test_the_plan_under_autocast_is_the_solves():
    # a plan formed on first access inside an autocast region is still the solve's float32 plan
    zs, zt = clouds(torch.float32)
    ref = solve_sample(zs, zt, backend="fused", grad="autodiff").plan
    res = solve_sample(zs, zt, backend="fused", grad="autodiff")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        P = res.plan
    assert P.dtype == torch.float32 and torch.equal(P, ref)


def test_the_module_solve_detaches_the_teacher():
    zs, zt = clouds(torch.float64)
    t = zt.clone().requires_grad_()
    fa = FeatureAlignmentLoss(backend="fused", grad="autodiff")
    res = fa.solve(zs.clone().requires_grad_(), t)
    res.value.backward()
    assert t.grad is None
    assert torch.equal(res.value.detach(), fa(zs, zt))


@pytest.mark.parametrize("method", ["ucmkd", "fa-only", "ucmkd-joint"])
def test_methods_report_the_solve_only_when_asked(method):
    teacher, student, batch = tiny(6)
    d = build_distiller(method, student, teacher, {"n_iter": 10})
    d.train()
    d.progress = 0.5
    twin = copy.deepcopy(d)
    twin.step_diagnostics = True
    torch.manual_seed(3)
    off = d(batch)
    assert not any("/" in k for k in off.metrics)
    torch.manual_seed(3)
    on = twin(batch)
    assert set(k for k in on.metrics if "/" in k) == {"ot/fa/iterations", "ot/fa/plan_entropy"}
    assert 1 <= on.metrics["ot/fa/iterations"] <= 10
    assert set(on.losses) == set(off.losses)
    assert all(torch.equal(on.losses[k], off.losses[k]) for k in off.losses)     # the statistics change nothing


def test_bilevel_reports_the_last_inner_solve_only_when_asked():
    from ucmkd.engine.strategies import BilevelStrategy

    teacher, student, batch = tiny(6)
    d = build_distiller("ucmkd-bilevel", student, teacher, {"n_iter": 5})
    d.step_diagnostics = True
    logs = BilevelStrategy(d, torch.optim.SGD(d.trainable_parameters(), lr=0.0), 5.0).step(batch)
    assert {"ot/fa/iterations", "ot/fa/plan_entropy"} <= set(logs)
    assert 1 <= logs["ot/fa/iterations"] <= 5
