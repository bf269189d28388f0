"""The table of backends (:data:`SOLVERS`) and the entry points that dispatch through it.

:func:`solve_sample` (features -> :class:`OTResult`) and :func:`solve` (a cost matrix ->
:class:`OTResult` without gradient) are named after POT's ``ot.solve_sample`` / ``ot.solve``;
:func:`sinkhorn_cost` and :func:`sinkhorn_plan` return their ``value`` / ``plan``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ucmkd.errors import ConfigError, DataError, NumericalError

from .backward import fused_autodiff, pot_autodiff, torch_autodiff
from .checks import PREFIX, check_choice, check_extra, check_features, check_finite
from .cost import METRICS, pairwise_cost
from .envelope import envelope_of, geomloss_envelope
from .result import OTResult
from .solvers import STOP_THR, fused_plan, pot_plan, solve_plan, torch_plan

GRADS = ("autodiff", "detach", "envelope")   # "detach" is an alias of "envelope"


@dataclass(frozen=True)
class Backend:
    """What one ``backend`` can do; every entry returns an :class:`OTResult`.

    envelope: ``(zs [B, d], zt [M, d], metric, eps, n_iter, extra [B, M] | None, context)``, the
        ``grad="envelope"`` loss.
    autodiff: ``(C [B, M] with grad, eps, n_iter, context)``, the ``grad="autodiff"`` loss;
        None where there is none (``why_no_autodiff`` says why).
    plan: ``(C [B, M] detached, eps, n_iter, stop_thr, context) -> (P [B, M], iterations)``
        for a given cost matrix; None for a solver of the features only, which then takes
        no ``extra_cost`` and no :func:`sinkhorn_plan`.
    """

    envelope: Callable[..., OTResult]
    autodiff: Optional[Callable[..., OTResult]] = None
    plan: Optional[Callable] = None
    why_no_autodiff: str = ""


def _given_cost(plan, autodiff) -> Backend:
    """A backend that solves a given cost matrix: its envelope loss is that of its plan."""
    return Backend(envelope=envelope_of(plan), autodiff=autodiff, plan=plan)


SOLVERS: dict[str, Backend] = {
    "torch": _given_cost(torch_plan, torch_autodiff),
    "pot": _given_cost(pot_plan, pot_autodiff),
    "geomloss": Backend(envelope=geomloss_envelope,
                        why_no_autodiff="GeomLoss does not unroll its iterations, so there is no autodiff "
                                        "gradient of <P, C>"),
    "fused": _given_cost(fused_plan, fused_autodiff),
}
BACKENDS = tuple(SOLVERS)
PLAN_BACKENDS = tuple(sorted(name for name, b in SOLVERS.items() if b.plan is not None))


def _check_config(metric, eps, n_iter, backend, grad) -> None:
    check_choice("metric", metric, METRICS)
    check_choice("backend", backend, BACKENDS)
    check_choice("grad", grad, GRADS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"{PREFIX}: eps must be a finite float > 0, got {eps!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ConfigError(f"{PREFIX}: n_iter must be an int >= 1, got {n_iter!r}")
    if grad == "autodiff" and SOLVERS[backend].autodiff is None:
        raise ConfigError(
            f"{PREFIX}: backend={backend!r} supports only grad='detach' / 'envelope' (the same "
            f"gradient; {SOLVERS[backend].why_no_autodiff}); got grad={grad!r}"
        )


def _check_extra(extra_cost, shape: tuple, dtype, backend: str) -> torch.Tensor | None:
    if extra_cost is not None and SOLVERS[backend].plan is None:
        names = [repr(n) for n, b in SOLVERS.items() if b.plan is not None]
        raise ConfigError(f"{PREFIX}: extra_cost (label-aware OT) needs backend "
                          f"{', '.join(names[:-1])} or {names[-1]}")
    return check_extra(extra_cost, shape, dtype)


def solve_sample(
    zs: torch.Tensor,
    zt: torch.Tensor,
    metric: str = "cosine",
    eps: float = 0.1,
    n_iter: int = 100,
    backend: str = "torch",
    grad: str = "autodiff",
    extra_cost: torch.Tensor | None = None,
) -> OTResult:
    """Entropic OT between ``zs`` [B, d] and ``zt`` [M, d]: its :class:`OTResult`, whose
    ``value`` is :func:`sinkhorn_cost` (same arguments, same value and gradient)."""
    _check_config(metric, eps, n_iter, backend, grad)
    zs, zt = check_features(zs, zt)
    eps = float(eps)
    shape = (zs.shape[0], zt.shape[0])
    extra = _check_extra(extra_cost, shape, zs.dtype, backend)
    context = f"backend={backend!r}, metric={metric!r}, eps={eps}"
    solver = SOLVERS[backend]
    if grad == "autodiff":
        C = pairwise_cost(zs, zt, metric)
        res = solver.autodiff(C if extra is None else C + extra, eps, n_iter, context)
    else:  # envelope / detach
        res = solver.envelope(zs, zt, metric, eps, n_iter, extra, context)
    if not bool(torch.isfinite(res.value.detach())):
        raise NumericalError(
            f"{PREFIX}: Sinkhorn transport cost is {res.value.item()} ({context}, B={shape[0]}, "
            f"M={shape[1]}); exp(-C/eps) may underflow: use backend='fused' or 'torch' "
            f"(log-domain) or a larger eps"
        )
    return res


def sinkhorn_cost(
    zs: torch.Tensor,
    zt: torch.Tensor,
    metric: str = "cosine",
    eps: float = 0.1,
    n_iter: int = 100,
    backend: str = "torch",
    grad: str = "autodiff",
    extra_cost: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropic OT transport cost ``<P, C>`` between ``zs`` [B, d] and ``zt`` [M, d].

    Args:
        zs: student features [B, d]; gradients flow into it.
        zt: teacher features [M, d] (same d); use ``zt.detach()`` for no teacher gradient.
        metric: ground cost, one of :data:`METRICS` (see :func:`cost_matrix`).
        eps: entropic regularisation, in cost units (``K = exp(-C / eps)``).
        n_iter: Sinkhorn iterations (``torch``: exactly this many; ``pot`` and ``fused``:
            at most this many, stopping by POT's rule (``docs/ot.md``); ``geomloss``:
            about this many eps-scaling steps).
        backend: ``"torch"`` (log domain, exactly ``n_iter``), ``"pot"`` (POT, the
            reference), ``"fused"`` (POT's iterates, one pass over K per iteration, log
            domain beyond the float range) or ``"geomloss"``.
        grad: ``"autodiff"``: the gradient of the returned ``<P, C>`` through the
            iterations (the authors'; ``pot``, ``fused``, ``torch``).  ``"envelope"``
            (alias ``"detach"``): ``sum_ij P_ij dC_ij`` with P fixed, the gradient of the
            regularised objective ``<P, C> - eps H(P)`` at convergence, not of ``<P, C>``
            (21-28 % away from autodiff on clustered features, ``docs/ot.md``); no
            memory per iteration.  ``geomloss`` supports only the envelope gradient.
        extra_cost: optional [B, M] cost added to the ground cost, e.g. a label cost
            ``lam * [y_i != y_j]`` that makes transport across classes expensive (joint
            feature-label OT). Not supported by ``geomloss`` (its cost is a function of
            the points only).

    Returns:
        0-dim tensor, ``sum_ij P_ij C_ij`` in cost units, dtype of ``zs`` promoted to
        at least float32. :func:`solve_sample` returns it with the plan, the iterations run
        and the plan's entropy.

    Note:
        ``geomloss`` anneals the temperature from ``max C`` down to ``eps`` in about ``n_iter``
        steps and rebuilds P from its potentials: it approximates the converged plan and
        underestimates its value by roughly ``1/n_iter`` (``docs/ot.md``).

    Raises:
        ConfigError: unknown metric/backend/grad, bad eps or n_iter.
        DataError: inputs not 2-D, empty, non-float, or with different feature dims.
        NumericalError: NaN/inf in the inputs or in the result; with ``pot``, underflow
            of ``exp(-C/eps)`` (stale iterate, plan rows without mass, or, raised from
            backward, a non-finite autodiff gradient), naming metric, eps and cost range.
    """
    return solve_sample(zs, zt, metric, eps, n_iter, backend, grad, extra_cost).value


def _plan_of_cost(C, eps, n_iter, backend, stop_thr) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(C checked [B, M], P [B, M], iterations) for :func:`solve` / :func:`sinkhorn_plan`."""
    check_choice("backend", backend, PLAN_BACKENDS)
    _check_config("cosine", eps, n_iter, backend, "envelope")
    if isinstance(stop_thr, bool) or not isinstance(stop_thr, (int, float)) or not stop_thr >= 0:
        raise ConfigError(f"{PREFIX}: stop_thr must be a float >= 0, got {stop_thr!r}")
    if not isinstance(C, torch.Tensor) or C.dim() != 2 or 0 in C.shape or not C.is_floating_point():
        what = f"shape {tuple(C.shape)}, dtype {C.dtype}" if isinstance(C, torch.Tensor) else type(C).__name__
        raise DataError(f"{PREFIX}: cost C must be a non-empty 2-D floating-point tensor [B, M], got {what}")
    C = C.detach().to(torch.promote_types(C.dtype, torch.float32))
    check_finite(C, "cost C")
    eps = float(eps)
    P, iterations = solve_plan(SOLVERS[backend].plan, C, eps, n_iter, float(stop_thr),
                               f"backend={backend!r}, eps={eps}")
    return C, P, iterations


def solve(
    C: torch.Tensor,
    eps: float = 0.1,
    n_iter: int = 100,
    backend: str = "fused",
    stop_thr: float = STOP_THR,
) -> OTResult:
    """The entropic plan of a cost ``C`` [B, M] as an :class:`OTResult` without gradient: its
    ``plan`` is :func:`sinkhorn_plan` (same arguments), ``value`` is ``<P, C>`` (detached)."""
    C, P, iterations = _plan_of_cost(C, eps, n_iter, backend, stop_thr)
    return OTResult.of_plan((P * C).sum(), P, iterations)


def sinkhorn_plan(
    C: torch.Tensor,
    eps: float = 0.1,
    n_iter: int = 100,
    backend: str = "fused",
    stop_thr: float = STOP_THR,
) -> torch.Tensor:
    """Entropic transport plan ``P`` [B, M] for a cost ``C`` [B, M], without gradient.

    Uniform marginals ``a = 1/B``, ``b = 1/M``; ``K = exp(-C / eps)`` (``eps`` in cost units).
    The plan is what :func:`plan_cost` needs, e.g. one global plan over the features of all
    ranks (``docs/ot.md``).  ``C`` is solved in its dtype promoted to at least float32.

    Args:
        C: cost matrix [B, M] (detached here).
        eps, n_iter: as in :func:`sinkhorn_cost`.
        backend: one of :data:`PLAN_BACKENDS`: ``"fused"`` (default; plain-domain
            Sinkhorn-Knopp, log domain when the cost range needs it), ``"pot"``
            (``ot.sinkhorn``) or ``"torch"`` (log domain, exactly ``n_iter`` iterations,
            ``stop_thr`` unused).
        stop_thr: POT's stopping threshold on the column-marginal error (``fused``,
            ``pot``); checked at iterations 0, 10, 20, ... as POT does.

    Raises:
        ConfigError: bad eps, n_iter, stop_thr or backend.
        DataError: C not a 2-D, non-empty floating-point tensor.
        NumericalError: NaN/inf in C, or a plan with wrong row masses (underflow, ``pot``).
    """
    return _plan_of_cost(C, eps, n_iter, backend, stop_thr)[1]
