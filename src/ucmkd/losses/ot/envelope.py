"""The ``grad="envelope"`` loss: ``<P, C>`` with the gradient ``sum_ij P_ij dC_ij`` (plan P fixed).

P [B, M] is solved without gradient; nothing is kept per iteration, and for ``cosine`` only
[B, d] tensors are kept for backward. :func:`plan_cost` is this loss for a given plan (e.g.
rows of a global plan under data parallelism).
"""
from __future__ import annotations

import functools

import torch

from ucmkd.errors import DataError

from .checks import PREFIX, check_choice, check_extra, check_features, check_finite
from .cost import METRICS, normalize, pairwise_cost
from .result import NO_ITERATIONS, OTResult
from .solvers import STOP_THR, geomloss_plan, solve_plan


class _PlanDot(torch.autograd.Function):
    """``<P, C>`` with ``P`` constant: backward gives ``dL/dC = g * P`` and saves only P."""

    @staticmethod
    def forward(ctx, C, P):
        ctx.save_for_backward(P)
        return (C * P).sum()  # cascade summation (float32 torch.dot drifts at B * M ~ 1e7)

    @staticmethod
    def backward(ctx, g):
        (P,) = ctx.saved_tensors
        return g * P, None


def envelope_cost_matrix(zs, zt, metric: str, extra: torch.Tensor | None) -> torch.Tensor:
    """Cost [B, M] for :func:`plan_loss`: cosine without autograd (its gradient comes from
    a [B, d] surrogate), the other metrics with autograd (cdist's backward needs it)."""
    if metric == "cosine":
        with torch.no_grad():
            C = torch.mm(normalize(zs), normalize(zt).T).neg_().add_(1.0)
            return C if extra is None else C.add_(extra)
    C = pairwise_cost(zs, zt, metric)
    return C if extra is None else C + extra


def plan_loss(P, zs, zt, metric: str, C) -> torch.Tensor:
    """``<P, C>`` whose gradient is ``sum_ij P_ij dC_ij`` (P held fixed); consumes a cosine C."""
    if metric != "cosine":
        return _PlanDot.apply(C, P)
    # Sum of the products (cascade summation; a float32 torch.dot over B*M terms drifts by
    # ~1e-4 at 4096 x 4096), written into C's buffer: the cosine gradient does not need C.
    value = C.mul_(P).sum()
    zs_n, zt_n = normalize(zs), normalize(zt)
    if not (zs_n.requires_grad or zt_n.requires_grad):
        return value
    # C = 1 - zs_n zt_n^T, so sum_ij P_ij dC_ij = -d<zs_n, P zt_n>: a [B, d] surrogate with
    # this gradient; the value stays the exact dot product (s - s.detach() is exactly 0).
    s = -(zs_n * (P @ zt_n)).sum()
    return value + (s - s.detach())


def plan_envelope(plan, zs, zt, metric: str, eps: float, n_iter: int, extra: torch.Tensor | None,
                  context: str) -> OTResult:
    """The envelope loss with P from the plan solver ``plan`` (:mod:`.solvers`) of the cost."""
    C = envelope_cost_matrix(zs, zt, metric, extra)
    P, iterations = solve_plan(plan, C.detach(), eps, n_iter, STOP_THR, context)
    return OTResult.of_plan(plan_loss(P, zs, zt, metric, C), P, iterations)


def envelope_of(plan):
    """The envelope loss of the plan solver ``plan``, as a backend's ``envelope`` entry."""
    return functools.partial(plan_envelope, plan)


def geomloss_envelope(zs, zt, metric: str, eps: float, n_iter: int, extra: torch.Tensor | None,
                      context: str) -> OTResult:
    """``<P, C>`` with GeomLoss' plan P (no label cost): autograd through C with P fixed."""
    C = pairwise_cost(zs, zt, metric)
    P = geomloss_plan(zs, zt, C, metric, eps, n_iter)
    return OTResult.of_plan((P * C).sum(), P, NO_ITERATIONS)   # eps-scaling, no Sinkhorn-Knopp iterations


def plan_cost(
    P: torch.Tensor,
    zs: torch.Tensor,
    zt: torch.Tensor,
    metric: str = "cosine",
    extra_cost: torch.Tensor | None = None,
) -> torch.Tensor:
    """Transport cost ``<P, C(zs, zt) + extra_cost>`` of a given plan ``P`` [B, M].

    The gradient is ``sum_ij P_ij dC_ij / dzs`` (and ``/ dzt`` if it requires grad) with
    P held fixed: with P from :func:`sinkhorn_plan` this is the envelope gradient of
    :func:`sinkhorn_cost`.  ``P`` may be some rows of a larger (e.g. global) plan: the rows
    of ``zs`` they belong to.  Memory kept for backward: [B, d] tensors for ``cosine``, P and
    cdist's buffers otherwise; never anything per Sinkhorn iteration.

    Returns:
        0-dim tensor in cost units, dtype of the features promoted to at least float32.
    """
    check_choice("metric", metric, METRICS)
    zs, zt = check_features(zs, zt)
    shape = (zs.shape[0], zt.shape[0])
    if not isinstance(P, torch.Tensor) or tuple(P.shape) != shape:
        got = tuple(P.shape) if isinstance(P, torch.Tensor) else type(P).__name__
        raise DataError(f"{PREFIX}: plan P must be [B, M] = {list(shape)} (rows of zs, rows of zt), got {got}")
    P = P.detach().to(zs.dtype)
    check_finite(P, "plan P")
    C = envelope_cost_matrix(zs, zt, metric, check_extra(extra_cost, shape, zs.dtype))
    return plan_loss(P, zs, zt, metric, C)
