"""Training strategies: how one batch updates the student (what to minimise is the distiller's).

- ``standard``: backpropagate the sum of the distiller's losses, clip, step.
- ``bilevel``: the paper's algorithm, with inner steps on a functional copy of the
  parameters (``torch.func.functional_call``), never a ``deepcopy`` of the model.
"""
from __future__ import annotations

import math

import torch
from torch.func import functional_call

from ..errors import NumericalError
from ..registry import Registry

STRATEGIES: Registry[type] = Registry("training strategy")


def _check_finite(losses: dict, where: str) -> None:
    for name, v in losses.items():
        if not torch.isfinite(v).all():
            raise NumericalError(f"{where}: loss {name!r} is {float(v.detach())} (non-finite)")


def _clip(params, max_norm: float, where: str) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if not math.isfinite(float(norm)):
        raise NumericalError(f"{where}: gradient norm is {float(norm)} (non-finite)")
    return float(norm)


class Strategy:
    """``step(batch) -> {loss name: float}``; raises :class:`NumericalError` on NaN/inf."""

    def __init__(self, distiller, optimizer: torch.optim.Optimizer, clip_norm: float = 5.0):
        self.distiller, self.optimizer, self.clip_norm = distiller, optimizer, clip_norm

    def step(self, batch) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


@STRATEGIES.register("standard")
class StandardStrategy(Strategy):
    def step(self, batch) -> dict:
        out = self.distiller(batch)
        _check_finite(out.losses, f"method {self.distiller.name!r}")
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        for group in self.distiller.clip_groups():
            _clip(group, self.clip_norm, f"method {self.distiller.name!r}")
        self.optimizer.step()
        return {**{k: float(v.detach()) for k, v in out.losses.items()}, **out.metrics}


def _sub(d: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in d.items() if k.startswith(prefix)}


@STRATEGIES.register("bilevel")
class BilevelStrategy(Strategy):
    """One bilevel step (semantics of the paper's scripts, see docs/method semantics):

    1. theta' <- detached clones of the trainable parameters (student + projector) and of the
       student's buffers; a FRESH AdamW(lr=inner_lr, weight_decay=inner_wd) on theta'.
    2. n1 inner steps on FA(project(f_S(x_b; theta')), f_T(x_a)).
    3. n2 inner steps on the head only: head_loss(h_S(f_S(x_b; theta').detach()), y).
    4. outer loss = outer_loss(S(x_b; theta'), y); its gradient w.r.t. theta' is used as the
       gradient of theta (first order), clipped, applied by the outer optimizer; the batch-norm
       buffers of theta' are copied back into the student.
    Every student forward runs in train mode, so BN statistics move once per forward.
    """

    def step(self, batch) -> dict:
        d = self.distiller
        p = d.params
        named = [(f"student.{n}", q) for n, q in d.student.named_parameters()]
        named += [(f"extra.{n}", q) for n, q in d.extra.named_parameters()]
        theta = {n: q.detach().clone().requires_grad_(True) for n, q in named}
        bufs = {n: b.detach().clone() for n, b in d.student.named_buffers()}
        s_params = _sub(theta, "student.")
        s_state = {**s_params, **bufs}
        proj = d.extra["projector"] if "projector" in d.extra else None
        proj_params = _sub(theta, "extra.projector.")

        def features(x):
            z = functional_call(d.student.encoder, {**_sub(s_params, "encoder."), **_sub(bufs, "encoder.")}, (x,))
            return z

        def project(z):
            return z if proj is None else functional_call(proj, proj_params, (z,))

        inner = torch.optim.AdamW(list(theta.values()), lr=p.inner_lr, weight_decay=p.inner_wd)
        zt, _ = d.teacher_forward(batch)
        d.student.check_input(batch.xs)
        logs = {}
        for _ in range(p.n1):
            inner.zero_grad(set_to_none=True)
            fa = d.fa(project(features(batch.xs)), zt)
            _check_finite({"fa_inner": fa}, "ucmkd-bilevel inner step")
            fa.backward()
            inner.step()
            logs["fa_inner"] = float(fa.detach())
        for _ in range(p.n2):
            inner.zero_grad(set_to_none=True)
            with torch.no_grad():
                z = features(batch.xs)
            head = d.head_loss(functional_call(d.student.head, _sub(s_params, "head."), (z,)), batch.ys)
            _check_finite({"head_inner": head}, "ucmkd-bilevel inner step")
            head.backward()
            inner.step()
            logs["head_inner"] = float(head.detach())
        logits = functional_call(d.student, s_state, (batch.xs,))
        outer = d.outer_loss(logits, batch.ys)
        _check_finite({"outer_ce_ls": outer}, "ucmkd-bilevel outer step")
        grads = torch.autograd.grad(outer, list(theta.values()), allow_unused=True)
        self.optimizer.zero_grad(set_to_none=True)
        for (_, q), g in zip(named, grads):
            q.grad = None if g is None else g.detach()
        _clip([q for _, q in named], self.clip_norm, "ucmkd-bilevel outer step")
        self.optimizer.step()
        with torch.no_grad():
            for n, b in d.student.named_buffers():
                b.copy_(bufs[n])
        logs["outer_ce_ls"] = float(outer.detach())
        return logs
