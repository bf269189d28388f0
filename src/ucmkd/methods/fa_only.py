"""Ablation of the paper's joint objective: feature alignment (OT) without label alignment."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import ranged
from .. import collectives
from ..errors import NumericalError
from ..losses.ot import BACKENDS, GRADS, METRICS, PLAN_BACKENDS, FeatureAlignmentLoss, OTResult, cost_matrix, plan_cost, solve
from .base import DistillOutput, Distiller, register_method


@dataclass
class OTParams:
    metric: str = "cosine"      # cosine | chordal | l2 | l1
    eps: float = ranged(0.1, 0.0, lo_open=True)   # entropic regularisation
    n_iter: int = ranged(100, 1)   # Sinkhorn iterations
    backend: str = "fused"      # fused (POT's iterates and stopping rule, faster; tested against POT) | pot (ot.sinkhorn2, the authors' call) | torch (log-domain) | geomloss
    # autodiff: gradient of the transport cost <P, C> through the Sinkhorn iterations (the
    # authors'; the paper methods keep it unless a recipe says otherwise) | envelope (alias
    # detach): plan held fixed, i.e. the gradient of the REGULARISED objective <P, C> - eps H(P)
    # (envelope theorem), not of <P, C>: cheaper, 21-28 % away from autodiff on clustered
    # features (docs/ot.md), 38-90 % in an independent check on other features
    grad: str = "autodiff"

    CHOICES: ClassVar[dict] = {"metric": METRICS, "backend": BACKENDS, "grad": GRADS}


class FullPrecisionFA(FeatureAlignmentLoss):
    """The FA loss with autocast switched off around the solve: under a bf16/fp16 run the
    features arrive in low precision and :mod:`ucmkd.losses.ot` promotes them to float32, but an active
    autocast would run the cost matmul and the Sinkhorn products in low precision again.

    Under data parallelism (:mod:`ucmkd.engine.distributed`) the transport problem is the
    GLOBAL batch's, as in one process: ``zs`` are this rank's rows of the student features
    [b, d], while ``zt`` [M, d] and ``extra_cost`` [B, M] are the global batch's (gathered by
    the method). Every rank solves the same global problem (one solve per rank: it is not split):

    - ``grad: autodiff``: the student features are gathered with their gradient and the
      gradient is taken through the iterations of the global solve;
    - ``grad: envelope`` (``detach``): the global plan P is solved from the gathered features
      without gradient, and each rank returns N times the cost of its own rows of P
      (:func:`ucmkd.losses.ot.plan_cost`), whose gradient reaches its own features only: the
      mean over ranks (DDP's) is the global ``<P, C>`` and its gradient; nothing but DDP's
      all-reduce carries gradients across ranks. (A backend outside
      :data:`~ucmkd.losses.ot.PLAN_BACKENDS`, i.e. ``geomloss``, takes the autodiff route:
      :func:`ucmkd.losses.ot.solve` does not solve a given cost with it.)
    """

    def solve(self, zs: torch.Tensor, zt: torch.Tensor, extra_cost=None) -> OTResult:
        with torch.autocast(zs.device.type, enabled=False):
            if collectives.world_size() == 1 or self.grad == "autodiff" or self.backend not in PLAN_BACKENDS:
                return super().solve(collectives.gather_with_grad(zs), zt, extra_cost)
            return self._global_plan_rows(zs, zt.detach(), extra_cost)

    def _global_plan_rows(self, zs: torch.Tensor, zt: torch.Tensor, extra_cost) -> OTResult:
        """N x <P[rows], C[rows]> for this rank's rows of the global plan P (envelope gradient);
        the result's plan is the global P."""
        cost = cost_matrix(collectives.gather(zs.detach()), zt, self.metric)
        if extra_cost is not None:
            cost = cost + extra_cost.to(cost.dtype)
        glob = solve(cost, self.eps, self.n_iter, backend=self.backend)
        rows = collectives.local_rows
        out = collectives.world_size() * plan_cost(rows(glob.plan), zs, zt, self.metric,
                                                   None if extra_cost is None else rows(extra_cost))
        if not bool(torch.isfinite(out.detach())):
            raise NumericalError(f"feature alignment: transport cost of this rank's rows is {float(out)} "
                                 f"(backend={self.backend!r}, metric={self.metric!r}, eps={self.eps})")
        return OTResult.of_plan(out, glob.plan, glob.iterations)


def ot_metrics(distiller, res: OTResult, name: str = "fa") -> dict:
    """``{"ot/<name>/iterations", "ot/<name>/plan_entropy"}`` of the solve ``res`` (the OT loss
    ``distiller.<name>``) where the distiller reports per-step diagnostics
    (:attr:`~ucmkd.methods.base.Distiller.step_diagnostics`), else ``{}``; a statistic that
    does not apply (GeomLoss' iterations, NaN) is left out."""
    if not distiller.step_diagnostics:
        return {}
    return {f"ot/{name}/{k}": v for k, v in res.stats().items() if not math.isnan(v)}


def make_fa(p) -> FeatureAlignmentLoss:
    return FullPrecisionFA(metric=p.metric, eps=p.eps, n_iter=p.n_iter, backend=p.backend, grad=p.grad)


@register_method("fa-only")
class FAOnly(Distiller):
    """loss = CE(s, y) + w_fa * OT(project(f_S(x_b)), f_T(x_a)): ``ucmkd-joint`` with w_la = 0
    (same FA loss and OT options, :class:`OTParams`)."""

    projects_features = True

    @dataclass
    class Params(OTParams):
        w_fa: float = 1.0   # weight of the feature-alignment (entropic OT) loss

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        self.fa = make_fa(self.params)

    def feature_terms(self, batch):
        """(student logits [B, K], projected student features [B, d_t], {"ce", "fa"} losses,
        metrics: :func:`ot_metrics`); the OT sees the global batch under data parallelism."""
        zt, _ = self.teacher_forward(batch)
        z, logits = self.student(batch.xs, return_features=True)
        zp = self.project(z)
        fa = self.fa.solve(zp, collectives.gather(zt))
        losses = {"ce": F.cross_entropy(logits, batch.ys), "fa": self.params.w_fa * fa.value}
        return logits, zp, losses, ot_metrics(self, fa)

    def forward(self, batch):
        logits, _, losses, metrics = self.feature_terms(batch)
        return DistillOutput(logits, losses, metrics)
