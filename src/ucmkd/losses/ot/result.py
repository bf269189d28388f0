"""The result of an OT solve (after POT's ``ot.utils.OTResult``): value, plan and statistics."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

NO_ITERATIONS = math.nan   # ``iterations`` of a solver without Sinkhorn-Knopp iterations (GeomLoss)


def plan_entropy(P: torch.Tensor) -> float:
    """Shannon entropy ``-sum_ij P_ij log P_ij`` of a plan (nats; 0 log 0 = 0): ``log(B M)`` for
    the independent plan ``1 / (B M)``, ``log B`` for a permutation (B = M)."""
    with torch.no_grad():
        return float(torch.special.entr(P.detach()).sum())


@dataclass(eq=False)
class OTResult:
    """One entropic OT solve between B student and M teacher points.

    Attributes:
        value: 0-dim tensor, the transport cost ``<P, C>`` in cost units; it carries the
            gradient of the solve's ``grad`` mode (detached for :func:`solve`).
        iterations: Sinkhorn-Knopp iterations run (int); NaN for ``geomloss`` (its
            eps-scaling steps are not Sinkhorn-Knopp iterations).
        plan: the transport plan P [B, M], detached; built on first access where the solver
            does not form it (``fused``/``pot`` autodiff keep only its scalings), then kept.
        plan_entropy: ``-sum_ij P_ij log P_ij`` of :attr:`plan` (nats), on first access.
        marginal_error: ``|P^T 1 - b|_2`` with ``b = 1/M``, the column-marginal error of POT's
            stopping rule (the row marginals are exact after the last iteration).
    """

    value: torch.Tensor
    iterations: float
    make_plan: Callable[[], torch.Tensor] = field(repr=False)

    @functools.cached_property
    def plan(self) -> torch.Tensor:
        # in the solve's dtype also where the caller runs under autocast
        with torch.no_grad(), torch.autocast(self.value.device.type, enabled=False):
            return self.make_plan().detach()

    @functools.cached_property
    def plan_entropy(self) -> float:
        return plan_entropy(self.plan)

    @property
    def marginal_error(self) -> float:
        P = self.plan
        return float(torch.linalg.vector_norm(P.sum(0) - 1.0 / P.shape[1]))

    def stats(self) -> dict:
        """``{"iterations", "plan_entropy"}``: the statistics logged per training step."""
        return {"iterations": self.iterations, "plan_entropy": self.plan_entropy}

    @classmethod
    def of_plan(cls, value: torch.Tensor, P: torch.Tensor, iterations: float) -> "OTResult":
        """A result whose plan ``P`` [B, M] is already formed."""
        return cls(value, iterations, lambda: P)
