"""Bit identity of the OT loss with the values recorded in ``tests/support/data/ot_bits.npz``.

The fixture holds, for the seeded cases of :mod:`ot_bits_cases` (every backend and gradient
mode, four metrics, float64 and float32, a label cost, a cost range beyond the plain domain),
the value and the gradients w.r.t. both feature sets, the iterations run and the plan's entropy,
and the plans of :func:`sinkhorn_plan` with :func:`plan_cost`'s value and gradients, as the code
before the ``ucmkd.losses.ot`` package split computed them (single-file ``ot.py``). A
refactoring that leaves the arithmetic alone must reproduce them exactly (``torch.equal``).

Bits are a property of the numeric path (torch version, CPU capability, oneMKL's kernels): on
the path the fixture was recorded on, the test asks for bit identity; on any other (another CPU,
``MKL_CBWR=AVX``) it asks for agreement within a bound from the arithmetic, :func:`bound`.
``python tests/unit/test_ot_bits.py --write`` records the fixture anew from the current code,
only for a commit whose arithmetic is the reference.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ot_bits_cases import cases, inputs, plan_cases
from ucmkd.errors import NumericalError
from ucmkd.losses.ot import cost_matrix, plan_cost, sinkhorn_cost, sinkhorn_plan, solve, solve_sample

FIXTURE = Path(__file__).parents[1] / "support" / "data" / "ot_bits.npz"
pytestmark = pytest.mark.filterwarnings("ignore:Sinkhorn did not converge:UserWarning")


def environment() -> dict:
    return {"torch": str(torch.__version__), "cpu": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


def _load():
    z = np.load(FIXTURE)
    index = json.loads(bytes(z["index"]))
    flat = {dt: z[dt] for dt in ("float64", "float32")}

    def value(x):
        if isinstance(x, list):              # [dtype, offset, shape] into the flat array of dtype
            dt, off, shape = x
            return torch.from_numpy(flat[dt][off:off + math.prod(shape)].reshape(shape).copy())
        return x
    return index["env"], {k: {f: value(x) for f, x in e.items()} for k, e in index["entries"].items()}


ENV, EXPECTED = _load()


#: bit identity where the fixture's numeric path is this one; a bound elsewhere
EXACT = ENV == environment() and not os.environ.get("MKL_CBWR")


def bound(prob, dtype) -> float:
    """Relative bound (to the largest magnitude of a recorded tensor) on another numeric path:
    every Sinkhorn iteration reduces at most n = max(B, M) terms, whose sum moves by at most
    (n - 1) eps relative when the summation order changes; the iterations contract, so the
    perturbations add up at most linearly over n_iter iterations, and the backward pass through
    them (autodiff) or through the plan (envelope) at most doubles it:
    2 (n - 1) n_iter eps. (Measured under MKL_CBWR=AVX against the default path on an AMD EPYC:
    at most 4.2 n_iter eps.)"""
    name, seed, B, M, d, scale, eps, n_iter, label_cost = prob
    return 2 * (max(B, M) - 1) * n_iter * torch.finfo(dtype).eps


def _same(got, want, tol: float = 0.0) -> bool:
    if want is None or got is None:
        return got is None and want is None
    if isinstance(want, torch.Tensor):
        if got.dtype != want.dtype or got.shape != want.shape:
            return False
        if EXACT:
            return torch.equal(got, want)
        return bool((got - want).abs().max() <= tol * float(want.abs().max()))
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return got == want if EXACT or isinstance(want, str) else abs(got - want) <= tol * abs(want)


def compute(prob, metric, backend, grad, dtype) -> dict:
    """What the fixture records for one case (``{"error": name}`` if it raises)."""
    name, seed, B, M, d, scale, eps, n_iter, label_cost = prob
    zs, zt, extra = inputs(seed, B, M, d, scale, dtype, label_cost)
    zs.requires_grad_()
    zt.requires_grad_()
    try:
        res = solve_sample(zs, zt, metric, eps=eps, n_iter=n_iter, backend=backend, grad=grad, extra_cost=extra)
        gs, gt = torch.autograd.grad(res.value, (zs, zt), allow_unused=True)
    except NumericalError as e:
        return {"error": type(e).__name__}
    return {"value": res.value.detach(), "grad_zs": gs, "grad_zt": gt, "iterations": float(res.iterations),
            "plan_entropy": res.plan_entropy}


def compute_plan(prob, metric, backend, dtype) -> dict:
    name, seed, B, M, d, scale, eps, n_iter, label_cost = prob
    zs, zt, extra = inputs(seed, B, M, d, scale, dtype, label_cost)
    C = cost_matrix(zs, zt, metric)
    if extra is not None:
        C = C + extra
    try:
        P = solve(C, eps, n_iter, backend=backend).plan
    except NumericalError as e:
        return {"error": type(e).__name__}
    z1, z2 = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    v = plan_cost(P, z1, z2, metric, extra_cost=extra)
    gs, gt = torch.autograd.grad(v, (z1, z2))
    return {"plan": P, "value": v.detach(), "grad_zs": gs, "grad_zt": gt}


SOLVE_CASES = list(cases())
PLAN_CASES = list(plan_cases())


@pytest.mark.parametrize("key,prob,metric,backend,grad,dtype", SOLVE_CASES, ids=[c[0] for c in SOLVE_CASES])
def test_loss_values_gradients_and_statistics_are_bit_identical(key, prob, metric, backend, grad, dtype):
    want = EXPECTED[key]
    for g in (grad, "detach") if grad == "envelope" else (grad,):     # detach: an alias, the same bits
        got = compute(prob, metric, backend, g, dtype)
        assert set(got) == set(want), (key, g)
        for field, x in want.items():
            if field == "iterations" and not EXACT:
                continue          # another rounding may stop a converged solve a check earlier or later
            assert _same(got[field], x, bound(prob, dtype)), (key, g, field)
    if "error" not in want:       # the thin wrapper returns the result's value
        zs, zt, extra = inputs(*prob[1:6], dtype, prob[-1])
        assert _same(sinkhorn_cost(zs, zt, metric, eps=prob[6], n_iter=prob[7], backend=backend, grad=grad,
                                   extra_cost=extra), want["value"], bound(prob, dtype))


@pytest.mark.parametrize("key,prob,metric,backend,dtype", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plans_and_plan_costs_are_bit_identical(key, prob, metric, backend, dtype):
    want = EXPECTED[key]
    got = compute_plan(prob, metric, backend, dtype)
    assert set(got) == set(want), key
    for field, x in want.items():
        assert _same(got[field], x, bound(prob, dtype)), (key, field)
    if "error" not in want:
        zs, zt, extra = inputs(*prob[1:6], dtype, prob[-1])
        C = cost_matrix(zs, zt, metric)
        assert _same(sinkhorn_plan(C if extra is None else C + extra, prob[6], prob[7], backend=backend),
                     want["plan"], bound(prob, dtype))


def write(path: Path) -> None:
    """Record the fixture from the current code (see the module docstring)."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    entries = {c[0]: compute(*c[1:]) for c in SOLVE_CASES}
    entries.update({c[0]: compute_plan(*c[1:]) for c in PLAN_CASES})
    flat, size, index = {"float64": [], "float32": []}, {"float64": 0, "float32": 0}, {}
    for key, e in entries.items():
        index[key] = {}
        for field, x in e.items():
            if isinstance(x, torch.Tensor):
                dt = str(x.dtype)[6:]
                index[key][field] = [dt, size[dt], list(x.shape)]
                flat[dt].append(x.reshape(-1).numpy())
                size[dt] += x.numel()
            else:
                index[key][field] = x
    meta = json.dumps({"env": environment(), "entries": index}, sort_keys=True).encode()
    np.savez_compressed(path, index=np.frombuffer(meta, dtype=np.uint8),
                        **{dt: np.concatenate(parts) for dt, parts in flat.items()})


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: PYTHONPATH=src:tests/support python tests/unit/test_ot_bits.py --write")
    write(FIXTURE)
