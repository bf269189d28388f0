"""The ``grad="autodiff"`` losses: ``<P_T(C), C>`` differentiated through the T iterations run.

Each takes the cost ``C`` [B, M] with its autograd graph and returns an :class:`OTResult`:

- ``torch``: autograd through the log-domain iterations (memory O(T B M));
- ``fused``: :func:`~.solvers._knopp` without autograd and :class:`_KnoppAutodiff`, a
  hand-written backward equal to autograd through POT's iterations (C, K and [T, B + M] kept);
- ``pot``: autograd through ``ot.sinkhorn2``, guarded against underflow.
"""
from __future__ import annotations

import math

import torch

from ucmkd.errors import NumericalError

from .checks import PREFIX, range_msg
from .result import OTResult
from .solvers import STOP_THR, _knopp, _plain_kernel, _row_blocks, log_sinkhorn_plan, pot_guard, uniform


class _KnoppAutodiff(torch.autograd.Function):
    """``<C, P>`` for the plan of :func:`_knopp`, with the exact reverse-mode gradient of
    POT's ``sinkhorn2`` iterations written by hand.

    Forward: ``apply(C, K, u, v, U, V, eps)`` with the solve's results (no grad).  Backward,
    with ``t_k = K v_k / a``, ``u_k = 1 / t_k``, ``s_k = K^T u_{k-1}``, ``v_k = b / s_k``:
    from ``P = diag(u_T) K diag(v_T)`` the grads of ``u_T``, ``v_T`` are ``(C*K) v_T`` and
    ``(C*K)^T u_T``; then for ``k = T..1``: ``gt_k = -gu_k u_k^2``, ``gv_k = K^T gt_k / a``
    (+ the P term at T), ``gs_k = -gv_k v_k^2 / b``, ``gu_{k-1} = K gs_k`` (one fused pass
    over K per step, as forward).  The K gradient ``C*(u_T v_T^T) + sum_k (gt_k / a) v_k^T
    + u_{k-1} gs_k^T`` is one [B, 2T] x [2T, M] product instead of 2T outer products, and
    ``dL/dC = P - K * grad_K / eps``.  Memory: C, K and T (B + M) history floats.
    """

    @staticmethod
    def forward(ctx, C, K, u, v, U, V, eps):
        blocks = _row_blocks(K)
        value = torch.stack([(K[sl] * u[sl, None] * v * C[sl]).sum() for sl in blocks]).sum()
        ctx.save_for_backward(C, K, u, v, U, V)
        ctx.eps = eps
        return value

    @staticmethod
    def backward(ctx, g):
        C, K, u, v, U, V = ctx.saved_tensors
        B, M = K.shape
        T = U.shape[0]
        blocks = _row_blocks(K)
        # Grads of u_T and v_T from L = <C, diag(u) K diag(v)>.
        gu = torch.empty_like(u)
        gvP = torch.zeros_like(v)
        for sl in blocks:
            W = K[sl] * C[sl]
            torch.mv(W, v, out=gu[sl])
            gvP.addmv_(W.T, u[sl])
        A = torch.empty_like(U)                          # A[k] = gt / a of iteration k (with V[k])
        G = torch.empty_like(V)                          # G[k] = gs of iteration k     (with U[k])
        usq = U.square().mul_(-B)                        # -u^2 / a of the u iteration k started from
        vsq = V.square().mul_(-M)                        # -v^2 / b of iteration k
        torch.mul(gu, u.square().mul_(-B), out=A[T - 1])
        gv = torch.mv(K.T, A[T - 1]).add_(gvP)
        # views made once, not per step (the reverse pass is dispatch-bound at small B)
        G_rows, vsq_rows = G.unbind(0), vsq.unbind(0)
        parts = [(K[sl], K[sl].T, A[:, sl].unbind(0), usq[:, sl].unbind(0)) for sl in blocks]
        for k in range(T - 1, -1, -1):
            gs = torch.mul(gv, vsq_rows[k], out=G_rows[k])   # gs = -gv v^2 / b
            if k == 0:
                break                                    # the starting u is a constant
            gv.zero_()
            for Kb, KbT, A_rows, usq_rows in parts:      # gu = K gs; gt = -gu u^2; gv = K^T gt / a
                ab = A_rows[k - 1]
                torch.mv(Kb, gs, out=ab).mul_(usq_rows[k])
                gv.addmv_(KbT, ab)
        W = torch.mm(torch.cat([A, U]).T, torch.cat([V, G]))   # sum of the 2T outer products
        for sl in blocks:                                # dL/dC = P - (K W + C P) / eps
            Kb, Wb = K[sl], W[sl]
            Pb = Kb * u[sl, None] * v
            Wb.mul_(Kb).addcmul_(C[sl], Pb).mul_(-1.0 / ctx.eps).add_(Pb)
        if not bool(torch.isfinite(W).all()):
            raise NumericalError(
                f"{PREFIX}: the autodiff gradient of the fused Sinkhorn-Knopp is not finite "
                f"({range_msg(C, ctx.eps)}): the iterates are too close to under/overflow for "
                f"their squares in {C.dtype}; use a larger eps, float64 or grad='envelope'"
            )
        return (W if bool(g == 1) else W.mul_(g)), None, None, None, None, None, None




def torch_autodiff(C: torch.Tensor, eps: float, n_iter: int, context: str = "") -> OTResult:
    """Exactly ``n_iter`` log-domain iterations, autograd through them."""
    P, iterations = log_sinkhorn_plan(C, eps, n_iter)
    return OTResult.of_plan((P * C).sum(), P.detach(), iterations)


def fused_autodiff(C: torch.Tensor, eps: float, n_iter: int, context: str = "") -> OTResult:
    """POT's ``sinkhorn2`` value and autodiff gradient from :func:`_knopp` and a hand-written
    backward; the log domain (autograd through logsumexp, same stopping rule) when the
    plain domain cannot hold the problem. The plan is formed only if read."""
    with torch.no_grad():
        K = _plain_kernel(C.detach(), eps)
        res = None if K is None else _knopp(K, n_iter, STOP_THR, history=True)
    if res is None:
        P, iterations = log_sinkhorn_plan(C, eps, n_iter, STOP_THR)
        return OTResult.of_plan((P * C).sum(), P.detach(), iterations)
    u, v, T, _, U, V = res
    return OTResult(_KnoppAutodiff.apply(C, K, u, v, U, V, eps), T, lambda: u[:, None] * K * v)


def pot_autodiff(C: torch.Tensor, eps: float, n_iter: int, context: str = "") -> OTResult:
    """``ot.sinkhorn2`` with autograd through the iterations, guarded against underflow; the
    iterations and the plan from POT's own log (which does not change the value)."""
    import ot  # POT

    B, M = C.shape
    with pot_guard(C, eps, context):
        out, log = ot.sinkhorn2(uniform(B, C), uniform(M, C), C, reg=eps, numItermax=n_iter, log=True)
    # A plan with unit mass has min C <= <P, C> <= max C.  When exp(-C/eps) underflows,
    # POT only warns and falls back to an earlier iterate (e.g. P = K / (B M) = 0, so
    # the "loss" is 0): turn that silent failure into an error.
    value = float(out.detach())
    lo, hi = float(C.detach().min()), float(C.detach().max())
    tol = 1e-4 * max(abs(lo), abs(hi), 1e-30)
    if math.isfinite(value) and not (lo - tol <= value <= hi + tol):
        raise NumericalError(
            f"{PREFIX}: POT's Sinkhorn-Knopp returned <P, C> = {value:.6g} outside "
            f"[min C, max C] = [{lo:.6g}, {hi:.6g}]: exp(-C/eps) underflowed "
            f"({context}); use backend='fused' or 'torch' (log-domain) or a larger eps"
        )
    if C.requires_grad and hi / eps > 0.25 * math.log(torch.finfo(C.dtype).max):
        # Entries of K near the underflow threshold give a finite value but the u^2, v^2
        # of POT's backward overflow: catch the NaN where it is made, not at clipping.
        # The scalings reach ~exp(max C / eps), so below a quarter of the exp range
        # (max C / eps <= 22 in float32, 177 in float64; cosine at eps 0.1 is <= 20)
        # their squares cannot overflow and the hook (~0.1 ms) is skipped.
        # (The hook holds no reference to C: a cycle would keep the [B, M] tensor alive.)
        msg = f"{context}, {range_msg(C, eps, lo, hi)}): exp(-C/eps) is near underflow in {C.dtype}"

        def check_grad(g):
            if not bool(torch.isfinite(g).all()):
                raise NumericalError(
                    f"{PREFIX}: the gradient of POT's Sinkhorn-Knopp (autodiff) is not finite "
                    f"({msg}; use a larger eps, float64, or backend='fused'"
                )

        C.register_hook(check_grad)
    u, v, Cd = log["u"].detach(), log["v"].detach(), C.detach()
    return OTResult(out, int(log["niter"]) + 1, lambda: u[:, None] * torch.exp(-Cd / eps) * v)

