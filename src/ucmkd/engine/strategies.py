"""Training strategies: how one batch updates the student (what to minimise is the distiller's).

- ``standard``: backpropagate the sum of the distiller's losses, clip, step.
- ``bilevel``: a first-order bilevel step driven by hooks the method provides
  (:class:`BilevelHooks`): inner steps of a functional AdamW on a dict of the parameters,
  forwards through ``torch.func.functional_call`` (no ``deepcopy``, no optimiser object per
  batch), then the outer loss's gradient at the inner solution updates the real parameters.

Both run the distiller's forwards under the run's precision (:class:`~ucmkd.engine.precision.Precision`).

Data parallelism (``dist``, :mod:`ucmkd.engine.distributed`): ``standard`` runs the forward
through ``DistributedDataParallel`` over the distiller's trainable modules, whose backward
averages the gradients across ranks; ``bilevel`` takes its gradients with
``torch.autograd.grad``, which DDP's hooks never see, so it averages every gradient it takes
(inner and outer) explicitly, in :meth:`BilevelStrategy._grads`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError, NumericalError
from ..registry import Registry
from ..methods.bilevel import BilevelHooks, InnerAdamW  # noqa: F401  (re-exported)
from . import distributed
from .precision import Precision

STRATEGIES: Registry[type] = Registry("training strategy")


def _check_finite(losses: dict, where: str) -> None:
    for name, v in losses.items():
        if isinstance(v, torch.Tensor) and not torch.isfinite(v).all():
            raise NumericalError(f"{where}: loss {name!r} is {float(v.detach())} (non-finite)")


def is_diagnostic(name: str) -> bool:
    """Whether the step log ``name`` is a per-step diagnostic (a TensorBoard tag with a ``/``, e.g.
    ``ot/fa/iterations``, see :class:`~ucmkd.methods.base.DistillOutput`): the trainer leaves it
    out of the epoch's averages."""
    return "/" in name


def _floats(d: dict) -> dict:
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in d.items()}


class Strategy:
    """``step(batch) -> {name: float}`` (losses and metrics to log); raises
    :class:`NumericalError` on NaN/inf (under fp16 an overflowing step is skipped by the
    gradient scaler instead, and logged as ``skipped_step``)."""

    def __init__(self, distiller, optimizer: torch.optim.Optimizer, clip_norm: float = 5.0,
                 precision: Optional[Precision] = None, dist: Optional[distributed.DataParallel] = None,
                 shadow=None):
        self.distiller, self.optimizer, self.clip_norm = distiller, optimizer, clip_norm
        self.precision = precision if precision is not None else Precision()
        self.dist = dist
        self.shadow = shadow     # the trainer's CE shadow (ucmkd.engine.shadow), trained in the same step

    def clip_groups(self) -> list:
        """The distiller's clip groups, with the shadow's parameters in a group of their own (so
        it never changes the distilled student's update)."""
        groups = self.distiller.clip_groups()
        if self.shadow is None:
            return groups
        own = {id(q) for q in self.shadow.parameters()}
        return [[q for q in g if id(q) not in own] for g in groups] + [self.shadow.parameters()]

    def step(self, batch) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What an exact resume needs besides the model and optimiser (the fp16 loss scale)."""
        return self.precision.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.precision.load_state_dict(state)

    def _clip_and_step(self, where: str) -> dict:
        """Unscale (fp16), clip each of the distiller's clip groups, step the optimiser.
        Returns ``{"skipped_step": 1.0}`` when fp16 gradients overflowed (the scaler skips the
        step and lowers its scale), else ``{}``."""
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        finite = True
        for group in self.clip_groups():
            group = [q for q in group if q.grad is not None]
            if not group:
                continue
            max_norm = self.clip_norm if self.clip_norm > 0 else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(group, max_norm))
            if not math.isfinite(norm):
                if scaler is None:
                    raise NumericalError(f"{where}: gradient norm is {norm} (non-finite)")
                finite = False
        if scaler is None:
            self.optimizer.step()
            return {}
        scaler.step(self.optimizer)
        scaler.update()
        return {} if finite else {"skipped_step": 1.0}


@STRATEGIES.register("standard")
class StandardStrategy(Strategy):
    def __init__(self, distiller, optimizer, clip_norm: float = 5.0, precision: Optional[Precision] = None,
                 dist: Optional[distributed.DataParallel] = None, shadow=None):
        super().__init__(distiller, optimizer, clip_norm, precision, dist, shadow)
        # the forward goes through DDP under data parallelism (its backward averages the
        # gradients); the view adds the shadow's loss inside that forward
        if dist is not None:
            self.model = distributed.wrap_ddp(distiller, dist, shadow)
        else:
            self.model = distiller if shadow is None else distributed.TrainableView(distiller, shadow)

    def step(self, batch) -> dict:
        where = f"method {self.distiller.name!r}"
        with self.precision.autocast():
            out = self.model(batch)
        _check_finite(out.losses, where)
        self.optimizer.zero_grad(set_to_none=True)
        total = out.total
        (total if self.precision.scaler is None else self.precision.scaler.scale(total)).backward()
        skipped = self._clip_and_step(where)
        return {**_floats(out.losses), **out.metrics, **skipped}


# --------------------------------------------------------------------------- bilevel
class FunctionalAdamW:
    """``torch.optim.AdamW``'s update (amsgrad and maximize off) on a dict of tensors, with no
    optimiser object: ``step(params, grads) -> new params``.

    As in ``torch.optim.AdamW``, a tensor whose gradient is None is left untouched and its step
    count does not advance; the others get decoupled weight decay ``p <- p (1 - lr wd)``, then
    ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` with the moments
    ``m <- b1 m + (1 - b1) g`` and ``v <- b2 v + (1 - b2) g^2`` (same operation order). The
    updated tensors are new leaves that require grad; the inputs are never written to.
    """

    def __init__(self, cfg: InnerAdamW):
        self.cfg = cfg
        self.state: dict = {}   # name -> (t, m, v)

    def step(self, params: dict, grads: dict) -> dict:
        lr, wd, (b1, b2), eps = self.cfg.lr, self.cfg.weight_decay, self.cfg.betas, self.cfg.eps
        out = dict(params)
        with torch.no_grad():
            for n, g in grads.items():
                if g is None:
                    continue
                t, m, v = self.state.get(n) or (0, torch.zeros_like(g), torch.zeros_like(g))
                t += 1
                p = params[n].detach() * (1 - lr * wd)
                m = m.lerp(g, 1 - b1)
                v = (v * b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(eps)
                p.addcdiv_(m, denom, value=-(lr / (1 - b1 ** t)))
                self.state[n] = (t, m, v)
                out[n] = p.requires_grad_(True)
        return out


_HOOKS = [name for name in BilevelHooks.__dict__ if name.startswith("bilevel_")]


class _HookCall(nn.Module):
    """``forward(hook, *args) = distiller.<hook>(*args)``: lets ``functional_call`` run any
    hook with the distiller's parameters replaced (keys prefixed ``d.``)."""

    def __init__(self, distiller):
        super().__init__()
        self.d = distiller

    def forward(self, hook: str, *args):
        return getattr(self.d, hook)(*args)


@STRATEGIES.register("bilevel")
class BilevelStrategy(Strategy):
    """One first-order bilevel step (the paper's algorithm; the method supplies the losses
    through :class:`BilevelHooks`):

    1. theta' <- the inner parameters (no copy: the first inner update makes new tensors);
       a fresh functional AdamW on theta'.
    2. For each stage, its steps: gradient of the stage's inner loss at theta', AdamW step.
    3. Outer loss at theta'; its gradient with respect to theta' is the gradient of theta,
       clipped and applied by the outer optimiser (:meth:`_apply_gradients`). The batch-norm
       running statistics that the forwards at theta' updated are the real buffers (functional
       calls leave buffers in place), so they persist, as the scripts' copy-back does.
    4. The persistent inner parameters (e.g. a module the outer loss does not reach) take
       their inner-updated values.
    Every forward runs in train mode, so batch-norm statistics move once per forward.
    """

    def __init__(self, distiller, optimizer, clip_norm: float = 5.0, precision: Optional[Precision] = None,
                 dist: Optional[distributed.DataParallel] = None, shadow=None):
        missing = [h for h in _HOOKS if not callable(getattr(distiller, h, None))]
        if missing:
            raise ConfigError(f"method {distiller.name!r} uses the bilevel strategy but lacks the hooks "
                              f"{', '.join(missing)} (ucmkd.engine.strategies.BilevelHooks)")
        super().__init__(distiller, optimizer, clip_norm, precision, dist, shadow)
        self._call = _HookCall(distiller)
        self._names = None

    def _run(self, theta: dict, hook: str, *args):
        with self.precision.autocast():
            return functional_call(self._call, {f"d.{n}": t for n, t in theta.items()}, (hook, *args))

    def _grads(self, loss: torch.Tensor, inputs: list, unscale: bool = True) -> Optional[list]:
        """Gradients of ``loss`` with respect to ``inputs`` (None where unused), averaged over
        the ranks under data parallelism (as DDP averages: every rank then takes the same inner
        and outer steps, those of one process on the global batch). Under fp16 the loss is
        scaled first; with ``unscale`` the gradients are divided back and None is returned when
        they overflowed (the scale is halved and the caller skips the batch); without it they
        stay scaled, for the scaler's own unscale and overflow check."""
        scaler = self.precision.scaler
        if scaler is None:
            return distributed.average_param_grads(self.dist, inputs,
                                                   torch.autograd.grad(loss, inputs, allow_unused=True))
        grads = distributed.average_param_grads(
            self.dist, inputs, torch.autograd.grad(scaler.scale(loss), inputs, allow_unused=True))
        if not unscale:
            return list(grads)
        scale = float(scaler.get_scale())
        grads = [None if g is None else g / scale for g in grads]
        if all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            return grads
        scaler.update(scale / 2)
        return None

    def _layout(self) -> tuple:
        """(name -> real parameter, inner names, outer names, persistent names), read from the
        distiller's hooks once: the module structure does not change during training."""
        if self._names is None:
            d = self.distiller
            real = dict(d.named_parameters())
            trainable = {id(q) for q in d.trainable_parameters()}
            self._names = (real, list(d.bilevel_parameters()), [n for n, q in real.items() if id(q) in trainable],
                           list(d.bilevel_persistent()))
        return self._names

    def step(self, batch) -> dict:
        d = self.distiller
        where = f"method {d.name!r}"
        real, inner_names, outer_names, persistent = self._layout()
        theta = {n: real[n].detach().requires_grad_(True) for n in inner_names}
        inner = FunctionalAdamW(d.bilevel_optimizer())
        cache, logs = {}, {}
        for stage, n_steps in d.bilevel_stages():
            for _ in range(n_steps):
                loss, extra = self._run(theta, "bilevel_inner_loss", stage, batch, cache)
                _check_finite({**extra, "inner_loss": loss}, f"{where} inner stage {stage!r}")
                grads = self._grads(loss, list(theta.values()))
                if grads is None:
                    return {**_floats(logs), "skipped_step": 1.0}
                theta = inner.step(theta, dict(zip(theta, grads)))
                logs.update(extra)
        loss, extra = self._run(theta, "bilevel_outer_loss", batch, cache)
        if self.shadow is not None:       # the shadow's CE joins the outer loss (its parameters are outer ones)
            with self.precision.autocast():
                shadow = self.shadow.losses(batch)
            extra = {**extra, **shadow}
            loss = loss + sum(shadow.values())
        _check_finite({**extra, "outer_loss": loss}, f"{where} outer step")
        logs.update(extra)
        grads = self._grads(loss, [theta[n] if n in theta else real[n] for n in outer_names], unscale=False)
        skipped = self._apply_gradients([real[n] for n in outer_names], grads, where)
        with torch.no_grad():
            for n in persistent:
                real[n].copy_(theta[n])
        return {**_floats(logs), **skipped}

    def _apply_gradients(self, params: list, grads: list, where: str) -> dict:
        """The one place where a bilevel step sets gradients and steps the outer optimiser.

        The gradients are set by hand (they were taken at theta', not at theta), so DDP's
        reducer hooks never see them: under data parallelism they arrive averaged over the
        ranks already (:meth:`_grads`, which also averages the inner steps' gradients)."""
        self.optimizer.zero_grad(set_to_none=True)
        for q, g in zip(params, grads):
            q.grad = None if g is None else g.detach()
        return self._clip_and_step(f"{where} outer step")
