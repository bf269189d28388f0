"""Feature-alignment (FA) loss: batch entropic optimal transport between features.

Student features ``zs`` [B, d] (differentiable) are matched to teacher features ``zt``
[M, d] with uniform marginals ``a = 1/B``, ``b = 1/M``, a ground cost ``C`` [B, M]
(:func:`cost_matrix`, ``metric`` in :data:`METRICS`) and entropic regularisation ``eps``
(cost units). The loss is the transport cost ``<P, C> = sum_ij P_ij C_ij`` of the entropic
plan ``P`` [B, M] (no entropy term), a 0-dim tensor in cost units, solved in the features'
dtype promoted to at least float32. Every ``backend`` runs POT's Sinkhorn-Knopp iterates;
``grad`` is ``autodiff`` (through the iterations) or ``envelope`` (plan held fixed).
Backends, gradients, underflow and distributed use: ``docs/ot.md``.

Modules: :mod:`.cost` (ground costs), :mod:`.solvers` (plans without gradient),
:mod:`.backward` (autodiff losses, the fused solver's hand-written backward),
:mod:`.envelope` (envelope losses, :func:`plan_cost`), :mod:`.dispatch` (the backend table
:data:`SOLVERS` and the entry points), :mod:`.result` (:class:`OTResult`), :mod:`.module`
(:class:`FeatureAlignmentLoss`), :mod:`.checks` (validation).
"""
from .cost import METRICS, cost_matrix
from .dispatch import (BACKENDS, GRADS, PLAN_BACKENDS, SOLVERS, Backend, sinkhorn_cost, sinkhorn_plan, solve,
                       solve_sample)
from .envelope import plan_cost
from .module import FeatureAlignmentLoss
from .result import OTResult, plan_entropy
from .solvers import STOP_THR, geomloss_schedule
from .solvers import _knopp, _plain_kernel  # noqa: F401  (the fused solver's pieces, tested against POT)

__all__ = [
    "METRICS",
    "BACKENDS",
    "PLAN_BACKENDS",
    "GRADS",
    "STOP_THR",
    "SOLVERS",
    "Backend",
    "OTResult",
    "cost_matrix",
    "geomloss_schedule",
    "solve",
    "solve_sample",
    "sinkhorn_plan",
    "plan_cost",
    "sinkhorn_cost",
    "plan_entropy",
    "FeatureAlignmentLoss",
]
