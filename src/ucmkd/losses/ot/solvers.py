"""Sinkhorn-Knopp plans without gradient, one solver per ``backend``.

Every plan solver takes a detached cost ``C`` [B, M] (uniform marginals ``a = 1/B``,
``b = 1/M``, ``K = exp(-C / eps)``) and returns ``(P [B, M], iterations run)``:

- ``torch``: log domain (logsumexp), exactly ``n_iter`` iterations, never underflows;
- ``fused``: POT's iterates and stopping rule, one pass over K per iteration
  (:func:`_knopp`); the log domain where the plain domain cannot hold the cost range;
- ``pot``: ``ot.sinkhorn``, guarded against its silent underflow (:func:`pot_guard`).

``geomloss`` solves from the features instead (:func:`geomloss_plan`).
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch

from ucmkd.errors import NumericalError

from .checks import PREFIX, range_msg
from .cost import pairwise_cost

STOP_THR = 1e-9  # POT's default stopThr (ot.sinkhorn, ot.sinkhorn2, ot.solve)
_CHECK_EVERY = 10  # POT checks its marginal error at iterations 0, 10, 20, ...
_BLOCK_BYTES = 1 << 19  # row block of K streamed per step of the fused solver (fits in L2)


def log_sinkhorn_plan(C: torch.Tensor, eps: float, n_iter: int,
                      stop_thr: float = 0.0) -> tuple[torch.Tensor, int]:
    """Log-domain replica of POT's ``sinkhorn_knopp`` with uniform marginals.

    POT:  u = 1/B, v = 1/M, K = exp(-C/eps); repeat: v = b / (K^T u); u = a / (K v);
    plan = diag(u) K diag(v).  Here ``log u``/``log v`` are updated with logsumexp.
    ``stop_thr > 0``: POT's stopping rule (break after iteration ``i`` with ``i % 10 == 0``
    once the column-marginal error ``|P^T 1 - b|_2 < stop_thr``); ``0``: exactly ``n_iter``.
    Returns ``(P [B, M], iterations run)``; P carries C's autograd graph.
    """
    B, M = C.shape
    log_a = -math.log(B)
    log_b = -math.log(M)
    log_k = C / (-eps)
    log_u = torch.full((B,), log_a, dtype=C.dtype, device=C.device)
    log_v = torch.full((M,), log_b, dtype=C.dtype, device=C.device)
    it = 0
    for it in range(n_iter):
        log_v = log_b - torch.logsumexp(log_k + log_u[:, None], dim=0)
        log_u = log_a - torch.logsumexp(log_k + log_v[None, :], dim=1)
        if stop_thr > 0 and it % _CHECK_EVERY == 0:
            with torch.no_grad():
                col = torch.exp(log_k + log_u[:, None] + log_v[None, :]).sum(0)
                if float(torch.linalg.vector_norm(col - 1.0 / M)) < stop_thr:
                    break
    return torch.exp(log_u[:, None] + log_k + log_v[None, :]), it + 1


def _row_blocks(K: torch.Tensor) -> list[slice]:
    """Slices of rows of K [B, M] whose blocks fit in _BLOCK_BYTES (the L2 cache) on CPU;
    one block on accelerators, where a kernel launch per block would cost more."""
    B, M = K.shape
    if K.device.type != "cpu":
        return [slice(0, B)]
    rows = max(1, _BLOCK_BYTES // (M * K.element_size()))
    return [slice(i, i + rows) for i in range(0, B, rows)]


def _plain_kernel(C: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``K = exp(-(C - min C) / eps)`` [B, M], or ``None`` if some entry would be subnormal.

    A constant factor of K rescales ``v`` only, the plan is unchanged; ``(max C - min C) /
    eps`` must stay below ``-log(tiny) - 1`` (86.3 in float32, 707 in float64).
    """
    K = torch.sub(C, C.min()).div_(-eps)                 # log K in [-(range / eps), 0]
    if float(K.min()) < math.log(torch.finfo(C.dtype).tiny) + 1.0:
        return None
    return K.exp_()


def _knopp(K: torch.Tensor, n_iter: int, stop_thr: float, history: bool = False):
    """POT's ``sinkhorn_knopp`` iterations on a kernel K [B, M] with one pass over K each.

    POT (uniform a = 1/B, b = 1/M): ``u = 1/B, v = 1/M``; repeat ``v = b / (K^T u)``,
    ``u = a / (K v)``; at iterations 0, 10, 20, ... stop once ``|v * (K^T u) - b|_2 <
    stop_thr`` (the column-marginal error of ``diag(u) K diag(v)``).  Here row blocks of K
    small enough for the L2 cache are streamed once per iteration: ``u_I = a_I / (K_I v)``
    and, while the block is hot, ``s += K_I^T u_I``, which is both the next ``v = b / s``
    and the marginal that the stopping rule needs.

    Returns ``(u [B], v [M], iterations run, last error, U, V)`` with ``U[k]`` the u that
    iteration k started from and ``V[k]`` its v ([T, B], [T, M]; ``None`` unless
    ``history``), or ``None`` when u, v or K^T u leave the normal floating-point range.
    """
    B, M = K.shape
    info = torch.finfo(K.dtype)
    b = torch.full((M,), 1.0 / M, dtype=K.dtype, device=K.device)
    u = torch.full((B,), 1.0 / B, dtype=K.dtype, device=K.device)
    vB = torch.empty_like(b)                             # B * v, so that u = 1 / (K vB)
    U = V = None
    if history:
        U = torch.empty(n_iter, B, dtype=K.dtype, device=K.device)
        V = torch.empty(n_iter, M, dtype=K.dtype, device=K.device)
        U_rows, V_rows = U.unbind(0), V.unbind(0)       # row views made once, not per iteration
    s = torch.mv(K.T, u)                                 # K^T u
    # B as a 0-dim tensor: a Python number would be converted to a tensor in every call (the
    # same value, exactly: B < 2^24); the loop is dispatch-bound at small B
    B_t = torch.tensor(float(B), dtype=K.dtype, device=K.device)
    # (block, its transpose, its u rows): views made once
    blocks = [(K[sl], K[sl].T, u[sl]) for sl in _row_blocks(K)]
    err, it = math.inf, 0
    for it in range(n_iter):
        torch.div(b, s, out=vB).mul_(B_t)                # v = b / K^T u
        if history:
            U_rows[it].copy_(u)
            torch.div(vB, B_t, out=V_rows[it])
        check = it % _CHECK_EVERY == 0
        accumulate = check or it + 1 < n_iter            # s is needed next iteration or now
        if accumulate:
            s.zero_()
        for Kb, KbT, ub in blocks:
            torch.mv(Kb, vB, out=ub).reciprocal_()       # u_I = a_I / (K_I v)
            if accumulate:
                s.addmv_(KbT, ub)                        # s += K_I^T u_I while K_I is cached
        if check:
            err = float(torch.linalg.vector_norm(vB * s / B - b))
            if not math.isfinite(err):
                return None
            if err < stop_thr:
                break
    v = vB.div_(B)
    for x in (u, v, s):
        if not bool(((x >= info.tiny) & (x <= info.max)).all()):
            return None
    T = it + 1
    return u, v, T, err, (U[:T] if history else None), (V[:T] if history else None)


def fused_plan(C: torch.Tensor, eps: float, n_iter: int, stop_thr: float,
               context: str = "") -> tuple[torch.Tensor, int]:
    """``(plan diag(u) K diag(v) [B, M], iterations)`` from :func:`_knopp`, built in K's buffer;
    from the log domain (:func:`log_sinkhorn_plan`) if the plain domain cannot hold the problem."""
    K = _plain_kernel(C, eps)
    res = None if K is None else _knopp(K, n_iter, stop_thr)
    if res is None:  # the plain domain cannot hold this cost range: log domain
        return log_sinkhorn_plan(C, eps, n_iter, stop_thr)
    u, v = res[0], res[1]
    for sl in _row_blocks(K):
        K[sl].mul_(u[sl, None]).mul_(v)
    return K, res[2]


def torch_plan(C: torch.Tensor, eps: float, n_iter: int, stop_thr: float = 0.0,
               context: str = "") -> tuple[torch.Tensor, int]:
    """``(plan [B, M], n_iter)``: exactly ``n_iter`` log-domain iterations (``stop_thr`` unused)."""
    return log_sinkhorn_plan(C, eps, n_iter)


@contextlib.contextmanager
def pot_guard(C: torch.Tensor, eps: float, context: str):
    """Turn POT's 'numerical errors' warning (it then returns an earlier iterate) into an error.

    Other warnings (e.g. 'Sinkhorn did not converge') are re-issued unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if "numerical errors" in str(w.message):
            raise NumericalError(
                f"{PREFIX}: POT's Sinkhorn-Knopp stopped on '{w.message}' ({context}, "
                f"{range_msg(C.detach(), eps)}): exp(-C/eps) underflowed for some rows or "
                f"columns and POT returned a stale earlier iterate; use backend='fused' (it "
                f"switches to the log domain), backend='torch', a larger eps or float64"
            )
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def uniform(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def pot_plan(C: torch.Tensor, eps: float, n_iter: int, stop_thr: float,
             context: str = "") -> tuple[torch.Tensor, int]:
    """``(ot.sinkhorn's plan [B, M], iterations)``; its log does not change the plan."""
    import ot  # POT

    B, M = C.shape
    with pot_guard(C, eps, context):
        P, log = ot.sinkhorn(uniform(B, C), uniform(M, C), C, reg=eps, numItermax=n_iter, stopThr=stop_thr,
                             log=True)
    return P, int(log["niter"]) + 1      # POT records the index of its last iteration


def check_plan(P: torch.Tensor, C: torch.Tensor, eps: float, context: str) -> None:
    """A plan must be finite with row masses 1/B (every solver makes the rows exact last)."""
    B = P.shape[0]
    rows = P.sum(1)
    bad = ~torch.isfinite(rows) | ((rows * B - 1.0).abs() > 1e-3)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise NumericalError(
            f"{PREFIX}: the transport plan's row {i} has mass {float(rows[i]):.4g} instead of "
            f"1/B = {1.0 / B:.4g} ({int(bad.sum())} of {B} rows wrong; {context}, "
            f"{range_msg(C, eps)}): exp(-C/eps) underflowed; use backend='fused' or a larger eps"
        )


def solve_plan(plan, C: torch.Tensor, eps: float, n_iter: int, stop_thr: float,
               context: str) -> tuple[torch.Tensor, int]:
    """``(P [B, M], iterations)`` of the plan solver ``plan`` for a detached cost ``C`` (no
    validation), checked by :func:`check_plan`."""
    with torch.no_grad():
        P, iterations = plan(C, eps, n_iter, stop_thr, context)
        check_plan(P, C, eps, context)
    return P, iterations


def geomloss_schedule(diameter: float, eps: float, n_iter: int) -> tuple[float, float]:
    """``(diameter, scaling)`` for GeomLoss' eps-scaling with ``p=1``.

    The temperature decreases geometrically from ``diameter`` (= max C, cost units) to
    ``eps`` in about ``n_iter`` steps: ``scaling = (eps / diameter) ** (1 / n_iter)``.
    """
    diameter = max(diameter, eps)
    scaling = min((eps / diameter) ** (1.0 / n_iter), 0.999)
    return diameter, scaling


def geomloss_plan(zs: torch.Tensor, zt: torch.Tensor, C: torch.Tensor, metric: str, eps: float,
                  n_iter: int) -> torch.Tensor:
    """Plan [B, M] of GeomLoss' eps-scaling solver for ``zs`` [B, d], ``zt`` [M, d] with cost
    ``C`` [B, M] (theirs), rebuilt from its potentials ``P_ij = exp((f_i + g_j - C_ij) / eps) / (B M)``."""
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
        cost=lambda x, y: pairwise_cost(x, y, metric),
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
    return torch.exp(log_p)


