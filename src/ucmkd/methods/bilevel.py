"""What a method trained by the ``bilevel`` strategy (:class:`ucmkd.engine.strategies.BilevelStrategy`)
provides: the settings of its inner optimiser and its hooks. They live beside the methods, which
implement them; the engine's strategy calls them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class InnerAdamW:
    """Settings of the inner optimiser: AdamW started fresh for every batch (zero moments)."""

    lr: float
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8


class BilevelHooks(Protocol):
    """What a method with ``strategy = "bilevel"`` provides. Parameter names are those of
    ``distiller.named_parameters()``; every hook runs under ``torch.func.functional_call`` with
    the inner parameters replaced by the current inner values, so the method writes plain
    module calls (``self.student(x)``), and under the run's autocast."""

    def bilevel_parameters(self) -> list[str]:
        """Names of the parameters the inner steps update (theta')."""

    def bilevel_optimizer(self) -> InnerAdamW:
        """Settings of the inner AdamW (fresh for every batch)."""

    def bilevel_stages(self) -> list[tuple[str, int]]:
        """Inner stages in order, each ``(stage name, number of steps)``."""

    def bilevel_inner_loss(self, stage: str, batch, cache: dict) -> tuple[torch.Tensor, dict]:
        """(scalar loss whose gradient steps theta', {name: value to log}) for one inner step;
        ``cache`` is a dict that lives for one batch (e.g. the teacher's features)."""

    def bilevel_outer_loss(self, batch, cache: dict) -> tuple[torch.Tensor, dict]:
        """(scalar outer loss at theta', {name: value to log}); its gradient with respect to
        theta' is applied to theta (first-order approximation)."""

    def bilevel_persistent(self) -> list[str]:
        """Names of inner parameters whose inner-updated values are copied back into the real
        parameters after the step (parameters the outer loss does not reach)."""
