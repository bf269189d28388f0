"""The OT solve's metadata (Sinkhorn iterations run, plan entropy) for logging: against POT, and
without changing values or gradients."""
import math

import numpy as np
import ot
import pytest
import torch

from ucmkd.losses.ot import FeatureAlignmentLoss, cost_matrix, plan_entropy, sinkhorn_cost, solve_sample

CASES = [("fused", "envelope"), ("fused", "autodiff"), ("pot", "envelope"), ("pot", "autodiff"),
         ("torch", "envelope"), ("torch", "autodiff")]


def clouds(seed=0, B=24, M=20, d=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g, dtype=dtype), torch.randn(M, d, generator=g, dtype=dtype)


def pot_reference(zs, zt, eps, n_iter):
    """(iterations run, entropy of the plan) from POT's own Sinkhorn-Knopp in float64."""
    C = cost_matrix(zs, zt, "cosine").numpy()
    a, b = np.full(len(zs), 1 / len(zs)), np.full(len(zt), 1 / len(zt))
    P, log = ot.sinkhorn(a, b, C, reg=eps, numItermax=n_iter, stopThr=1e-9, log=True)
    return log["niter"] + 1, float(-(P[P > 0] * np.log(P[P > 0])).sum())


@pytest.mark.parametrize("backend,grad", CASES)
def test_stats_leave_values_and_gradients_unchanged(backend, grad):
    zs, zt = clouds()
    outs = []
    for stats in (None, {}):
        z = zs.clone().requires_grad_(True)
        res = solve_sample(z, zt, eps=0.1, n_iter=50, backend=backend, grad=grad)
        if stats is not None:            # the statistics read before backward
            stats.update(res.stats())
        v = res.value
        v.backward()
        outs.append((v.detach(), z.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("backend,grad", CASES)
@pytest.mark.parametrize("eps,n_iter", [(0.1, 1000), (0.02, 30)])   # converged early / capped
def test_iterations_and_entropy_match_pot(backend, grad, eps, n_iter):
    zs, zt = clouds(1)
    stats = solve_sample(zs, zt, eps=eps, n_iter=n_iter, backend=backend, grad=grad).stats()
    it, ent = pot_reference(zs, zt, eps, n_iter)
    if backend == "torch":            # no stopping rule: exactly n_iter
        assert stats["iterations"] == n_iter
    else:
        assert stats["iterations"] == it
    if backend != "torch" or it == n_iter:
        # float64 plans of the same iterates: relative differences of a few ulps per iteration
        assert stats["plan_entropy"] == pytest.approx(ent, rel=1e-9)


def test_entropy_known_values():
    B = 8
    assert plan_entropy(torch.full((B, B), 1 / B ** 2, dtype=torch.float64)) == pytest.approx(math.log(B * B), rel=1e-14)
    assert plan_entropy(torch.eye(B, dtype=torch.float64) / B) == pytest.approx(math.log(B), rel=1e-14)


def test_the_loss_module_exposes_the_solve():
    zs, zt = clouds(2, dtype=torch.float32)
    fa = FeatureAlignmentLoss(eps=0.1, n_iter=100, backend="fused", grad="envelope")
    res = fa.solve(zs, zt)
    v = res.value
    last_stats = res.stats()
    assert set(last_stats) == {"iterations", "plan_entropy"}
    assert 1 <= last_stats["iterations"] <= 100
    # the entropic plan lies between a permutation-like plan and the independent one
    assert math.log(20) <= last_stats["plan_entropy"] <= math.log(24 * 20) + 1e-5
    assert torch.equal(v, sinkhorn_cost(zs, zt, eps=0.1, n_iter=100, backend="fused", grad="envelope"))
    assert torch.equal(fa(zs, zt), v)
