"""Feature-alignment (FA) loss: batch entropic optimal transport between features.

Student features ``zs`` (B x d, differentiable) are matched to teacher features
``zt`` (M x d, no gradient) with uniform marginals ``a = 1/B``, ``b = 1/M``, a
ground cost ``C[i, j] = c(zs[i], zt[j])`` and entropic regularisation ``eps``.
The loss is the transport cost ``<P, C> = sum_ij P_ij C_ij`` of the entropic plan
``P`` (the entropy term is *not* included).  It is in the units of the cost
(dimensionless for ``cosine``; feature units for ``chordal`` on unit vectors,
``l2`` and ``l1``).

Three solvers (``backend``) compute it:

* ``"pot"``: ``ot.sinkhorn2(a, b, C, reg=eps, numItermax=n_iter)``, POT's plain
  Sinkhorn-Knopp with autograd through the iterations.  This is the reference
  semantics (it is what the paper's authors run).  POT may stop early once its
  marginal error falls below ``stopThr=1e-9``; when ``exp(-C/eps)`` underflows
  (large costs / small eps) it only warns and returns an earlier iterate (possibly
  a zero plan, i.e. a loss of 0); we detect this (value outside [min C, max C]) and
  raise :class:`NumericalError`.
* ``"torch"``: our log-domain Sinkhorn.  It performs the same update sequence as
  POT's ``sinkhorn_knopp`` (``v <- b / K^T u`` then ``u <- a / K v``, starting from
  ``u = 1/B``, ``v = 1/M``, plan ``diag(u) K diag(v)``) for exactly ``n_iter``
  iterations, but with ``logsumexp`` updates, so it never underflows.
* ``"geomloss"``: GeomLoss' ``SamplesLoss("sinkhorn", debias=False,
  potentials=True)`` with eps-scaling; the plan is rebuilt from its dual
  potentials.  See :func:`sinkhorn_cost` for how it differs.

Gradient modes (``grad``):

* ``"autodiff"``: backpropagate through the Sinkhorn iterations (the authors'
  gradient; memory ``O(n_iter * B * M)``).
* ``"detach"``: compute the plan without autograd and return
  ``(P.detach() * C).sum()``; the gradient flows through ``C`` only
  (``sum_ij P_ij dC_ij/dzs``, the envelope gradient of the entropic OT value).
  Much cheaper in time and memory.
"""

from __future__ import annotations

import math

import torch

from ucmkd.errors import ConfigError, DataError, NumericalError

__all__ = [
    "METRICS",
    "BACKENDS",
    "GRADS",
    "cost_matrix",
    "geomloss_schedule",
    "sinkhorn_cost",
    "FeatureAlignmentLoss",
]

METRICS = ("cosine", "chordal", "l2", "l1")
BACKENDS = ("torch", "pot", "geomloss")
GRADS = ("autodiff", "detach")

_NORM_FLOOR = 1e-12  # norms are clamped to this (in feature units) before dividing
_PREFIX = "feature alignment"


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #
def _check_choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(
            f"{_PREFIX}: unknown {name} {value!r}; valid {name}s are {', '.join(map(repr, valid))}"
        )


def _check_config(metric, eps, n_iter, backend, grad) -> None:
    _check_choice("metric", metric, METRICS)
    _check_choice("backend", backend, BACKENDS)
    _check_choice("grad", grad, GRADS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"{_PREFIX}: eps must be a finite float > 0, got {eps!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ConfigError(f"{_PREFIX}: n_iter must be an int >= 1, got {n_iter!r}")
    if backend == "geomloss" and grad != "detach":
        raise ConfigError(
            f"{_PREFIX}: backend='geomloss' supports only grad='detach' (GeomLoss does not "
            f"unroll its iterations, so there is no autodiff gradient of <P, C>); got grad={grad!r}"
        )


def _check_finite(x: torch.Tensor, who: str) -> None:
    if not bool(torch.isfinite(x).all()):
        kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise NumericalError(f"{_PREFIX}: {who} contain {kind} (shape {tuple(x.shape)})")


def _check_features(zs, zt) -> tuple[torch.Tensor, torch.Tensor]:
    for who, z in (("student features zs", zs), ("teacher features zt", zt)):
        if not isinstance(z, torch.Tensor):
            raise DataError(f"{_PREFIX}: {who} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise DataError(
                f"{_PREFIX}: {who} must be 2-D (n x d), got shape {tuple(z.shape)}"
            )
        if z.shape[0] == 0 or z.shape[1] == 0:
            raise DataError(f"{_PREFIX}: {who} are empty, shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise DataError(f"{_PREFIX}: {who} must be floating point, got dtype {z.dtype}")
    if zs.shape[1] != zt.shape[1]:
        raise DataError(
            f"{_PREFIX}: feature dims differ: student zs {tuple(zs.shape)} vs teacher zt "
            f"{tuple(zt.shape)} (need the same d)"
        )
    if zs.device != zt.device:
        raise DataError(
            f"{_PREFIX}: student zs is on {zs.device} but teacher zt is on {zt.device}"
        )
    _check_finite(zs.detach(), "student features")
    _check_finite(zt.detach(), "teacher features")
    # Solve in at least float32 (float16/bfloat16 logsumexp is too coarse).
    dtype = torch.promote_types(zs.dtype, torch.float32)
    return zs.to(dtype), zt.to(dtype)


# --------------------------------------------------------------------------- #
# Cost
# --------------------------------------------------------------------------- #
def _normalize(x: torch.Tensor) -> torch.Tensor:
    # sqrt of a clamped squared norm: a zero vector maps to 0 with a finite gradient.
    sq = (x * x).sum(-1, keepdim=True)
    return x / sq.clamp_min(_NORM_FLOOR**2).sqrt()


def _pairwise_cost(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Cost between ``x`` [..., N, d] and ``y`` [..., M, d] -> [..., N, M] (no validation)."""
    if metric == "cosine":
        return 1.0 - _normalize(x) @ _normalize(y).transpose(-1, -2)
    if metric == "chordal":
        x, y = _normalize(x), _normalize(y)
        p = 2.0
    elif metric == "l2":
        p = 2.0
    elif metric == "l1":
        p = 1.0
    else:  # pragma: no cover - guarded by _check_choice
        raise ConfigError(f"{_PREFIX}: unknown metric {metric!r}; valid metrics are {METRICS}")
    # Direct differences (no |x|^2 + |y|^2 - 2xy expansion, so coincident points give
    # exactly 0); torch's cdist backward returns a zero (sub)gradient where the distance
    # is 0, so coincident points have a finite gradient.
    return torch.cdist(x, y, p=p, compute_mode="donot_use_mm_for_euclid_dist")


def cost_matrix(zs: torch.Tensor, zt: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Ground-cost matrix ``C`` [B, M] between ``zs`` [B, d] and ``zt`` [M, d].

    ``cosine``: ``1 - cos(zs_i, zt_j)`` in [0, 2]; ``chordal``: ``|zs_i/|zs_i| - zt_j/|zt_j||_2``
    in [0, 2]; ``l2``: ``|zs_i - zt_j|_2`` (not squared); ``l1``: ``|zs_i - zt_j|_1``.
    Norms are clamped at 1e-12 so zero vectors are allowed (cost 1 under ``cosine``);
    all metrics have finite gradients at coincident points and zero vectors.
    """
    _check_choice("metric", metric, METRICS)
    zs, zt = _check_features(zs, zt)
    return _pairwise_cost(zs, zt, metric)


# --------------------------------------------------------------------------- #
# Solvers
# --------------------------------------------------------------------------- #
def _log_sinkhorn_plan(C: torch.Tensor, eps: float, n_iter: int) -> torch.Tensor:
    """Log-domain replica of POT's ``sinkhorn_knopp`` with uniform marginals.

    POT:  u = 1/B, v = 1/M, K = exp(-C/eps); repeat: v = b / (K^T u); u = a / (K v);
    plan = diag(u) K diag(v).  Here ``log u``/``log v`` are updated with logsumexp.
    """
    B, M = C.shape
    log_a = -math.log(B)
    log_b = -math.log(M)
    log_k = C / (-eps)
    log_u = torch.full((B,), log_a, dtype=C.dtype, device=C.device)
    log_v = torch.full((M,), log_b, dtype=C.dtype, device=C.device)
    for _ in range(n_iter):
        log_v = log_b - torch.logsumexp(log_k + log_u[:, None], dim=0)
        log_u = log_a - torch.logsumexp(log_k + log_v[None, :], dim=1)
    return torch.exp(log_u[:, None] + log_k + log_v[None, :])


def _torch_cost(C: torch.Tensor, eps: float, n_iter: int, grad: str) -> torch.Tensor:
    if grad == "detach":
        with torch.no_grad():
            P = _log_sinkhorn_plan(C.detach(), eps, n_iter)
        return (P * C).sum()
    return (_log_sinkhorn_plan(C, eps, n_iter) * C).sum()


def _pot_cost(C: torch.Tensor, eps: float, n_iter: int, grad: str) -> torch.Tensor:
    import ot  # POT

    B, M = C.shape
    a = torch.full((B,), 1.0 / B, dtype=C.dtype, device=C.device)
    b = torch.full((M,), 1.0 / M, dtype=C.dtype, device=C.device)
    if grad == "detach":
        with torch.no_grad():
            P = ot.sinkhorn(a, b, C.detach(), reg=eps, numItermax=n_iter)
        out = (P * C).sum()
    else:
        out = ot.sinkhorn2(a, b, C, reg=eps, numItermax=n_iter)
    # A plan with unit mass has min C <= <P, C> <= max C.  When exp(-C/eps) underflows,
    # POT only warns and falls back to an earlier iterate (e.g. P = K / (B M) = 0, so
    # the "loss" is 0): turn that silent failure into an error.
    value = float(out.detach())
    lo, hi = float(C.detach().min()), float(C.detach().max())
    tol = 1e-4 * max(abs(lo), abs(hi), 1e-30)
    if math.isfinite(value) and not (lo - tol <= value <= hi + tol):
        raise NumericalError(
            f"{_PREFIX}: POT's Sinkhorn-Knopp returned <P, C> = {value:.6g} outside "
            f"[min C, max C] = [{lo:.6g}, {hi:.6g}]: exp(-C/eps) underflowed "
            f"(eps={eps}); use backend='torch' (log-domain) or a larger eps"
        )
    return out


def geomloss_schedule(diameter: float, eps: float, n_iter: int) -> tuple[float, float]:
    """``(diameter, scaling)`` for GeomLoss' eps-scaling with ``p=1``.

    The temperature decreases geometrically from ``diameter`` (= max C, cost units) to
    ``eps`` in about ``n_iter`` steps: ``scaling = (eps / diameter) ** (1 / n_iter)``.
    """
    diameter = max(diameter, eps)
    scaling = min((eps / diameter) ** (1.0 / n_iter), 0.999)
    return diameter, scaling


def _geomloss_cost(
    zs: torch.Tensor, zt: torch.Tensor, C: torch.Tensor, metric: str, eps: float, n_iter: int
) -> torch.Tensor:
    import geomloss

    # p=1: GeomLoss' temperature is blur**p = eps and its eps-scaling schedule runs
    # geometrically from diameter**p down to blur**p, so with p=1 both are in cost
    # units.  The custom cost replaces GeomLoss' |x-y|^p/p.  diameter = max C_ij is
    # the right starting temperature for every metric (GeomLoss' own estimate is a
    # Euclidean bounding box, wrong for cosine/chordal/l1).  scaling is chosen so the
    # annealing takes about n_iter steps (one symmetric Sinkhorn update per step).
    diameter, scaling = geomloss_schedule(float(C.detach().max()), eps, n_iter)
    solver = geomloss.SamplesLoss(
        "sinkhorn",
        p=1,
        blur=eps,
        diameter=diameter,
        scaling=scaling,
        debias=False,
        potentials=True,
        backend="tensorized",
        cost=lambda x, y: _pairwise_cost(x, y, metric),
    )
    prev = torch.is_grad_enabled()
    try:  # GeomLoss toggles the global grad mode inside its loop: restore it.
        with torch.no_grad():
            f, g = solver(zs.detach(), zt.detach())
    finally:
        torch.set_grad_enabled(prev)
    B, M = C.shape
    f, g = f.detach().reshape(B), g.detach().reshape(M)  # GeomLoss returns [1, B], [1, M]
    log_p = (f[:, None] + g[None, :] - C.detach()) / eps - math.log(B * M)
    return (torch.exp(log_p) * C).sum()


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
        n_iter: Sinkhorn iterations (``torch``: exactly this many; ``pot``: at most
            this many, POT stops once its marginal error < 1e-9; ``geomloss``: about
            this many eps-scaling steps).
        backend: ``"torch"`` (log-domain, same iterates as POT), ``"pot"``
            (``ot.sinkhorn2``, the reference) or ``"geomloss"``.
        grad: ``"autodiff"`` (through the iterations) or ``"detach"`` (plan detached,
            gradient through C only).  ``geomloss`` supports only ``"detach"``.
        extra_cost: optional [B, M] cost added to the ground cost, e.g. a label cost
            ``lam * [y_i != y_j]`` that makes transport across classes expensive (joint
            feature-label OT). Not supported by ``geomloss`` (its cost is a function of
            the points only).

    Returns:
        0-dim tensor, ``sum_ij P_ij C_ij`` in cost units, dtype of ``zs`` promoted to
        at least float32.

    Note:
        GeomLoss does not run ``n_iter`` plain Sinkhorn iterations: it uses
        eps-scaling (annealing the temperature geometrically from ``max C`` down to
        ``eps`` in about ``n_iter`` steps, see :func:`geomloss_schedule`) with
        symmetric averaged updates, then rebuilds ``P_ij = a_i b_j exp((f_i + g_j -
        C_ij) / eps)`` from its dual potentials.  Its value therefore approximates
        the *converged* entropic plan, not the plan after ``n_iter`` plain
        Sinkhorn-Knopp iterations; the two differ when those are not converged
        (small eps, large cost range).  The annealing lags behind the schedule (one
        averaged update per temperature), so the rebuilt ``<P, C>`` underestimates the
        converged value: measured -10% at ``n_iter=100``, -1% at 1000 on clustered
        64-d features (B=256, cost range [0.08, 1.46]), up to 2.5% at 100 on small
        random clouds; error roughly proportional to ``1/n_iter``.  On
        near-constant costs (random high-dim features, cosine) it agrees to ~1e-4.

    Raises:
        ConfigError: unknown metric/backend/grad, bad eps or n_iter.
        DataError: inputs not 2-D, empty, non-float, or with different feature dims.
        NumericalError: NaN/inf in the inputs or in the result.
    """
    _check_config(metric, eps, n_iter, backend, grad)
    zs, zt = _check_features(zs, zt)
    eps = float(eps)
    C = _pairwise_cost(zs, zt, metric)
    if extra_cost is not None:
        if backend == "geomloss":
            raise ConfigError(f"{_PREFIX}: extra_cost (label-aware OT) needs backend 'pot' or 'torch'")
        if tuple(extra_cost.shape) != tuple(C.shape):
            raise DataError(f"{_PREFIX}: extra_cost {list(extra_cost.shape)} must be [B, M] = {list(C.shape)}")
        C = C + extra_cost.to(C.dtype).detach()
    if backend == "torch":
        out = _torch_cost(C, eps, n_iter, grad)
    elif backend == "pot":
        out = _pot_cost(C, eps, n_iter, grad)
    else:
        out = _geomloss_cost(zs, zt, C, metric, eps, n_iter)
    if not bool(torch.isfinite(out.detach())):
        raise NumericalError(
            f"{_PREFIX}: Sinkhorn transport cost is {out.item()} (backend={backend!r}, "
            f"metric={metric!r}, eps={eps}, B={C.shape[0]}, M={C.shape[1]}, "
            f"max cost {float(C.detach().max()):.4g}); exp(-C/eps) may underflow: "
            f"use backend='torch' (log-domain) or a larger eps"
        )
    return out


class FeatureAlignmentLoss(torch.nn.Module):
    """FA loss module: ``forward(zs [B, d], zt [M, d]) -> <P, C>`` (0-dim tensor).

    The teacher features are detached, so only the student receives gradients.
    Arguments are those of :func:`sinkhorn_cost` and are validated at construction.
    """

    def __init__(
        self,
        metric: str = "cosine",
        eps: float = 0.1,
        n_iter: int = 100,
        backend: str = "torch",
        grad: str = "autodiff",
    ) -> None:
        super().__init__()
        _check_config(metric, eps, n_iter, backend, grad)
        self.metric = metric
        self.eps = float(eps)
        self.n_iter = n_iter
        self.backend = backend
        self.grad = grad

    def forward(self, zs: torch.Tensor, zt: torch.Tensor, extra_cost: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(zt, torch.Tensor):
            zt = zt.detach()
        return sinkhorn_cost(
            zs, zt, metric=self.metric, eps=self.eps, n_iter=self.n_iter,
            backend=self.backend, grad=self.grad, extra_cost=extra_cost,
        )

    def extra_repr(self) -> str:
        return (
            f"metric={self.metric!r}, eps={self.eps}, n_iter={self.n_iter}, "
            f"backend={self.backend!r}, grad={self.grad!r}"
        )
