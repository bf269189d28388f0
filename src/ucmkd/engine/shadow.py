"""A validation-gated plain-CE shadow of the student: a trainer-side component any method enables
from its params (:class:`FallbackParams` mixed into its ``Params``, ``fallback: true``).

The shadow is a copy of the untrained student trained with plain cross-entropy on the same
labelled batches (the items as the strategy gets them, before any augmentation the method
applies inside its forward), in the same optimiser step with its own gradient-clipping group, so
it never changes the distilled student's update. The trainer validates it after every epoch as
candidate ``"fallback"`` and returns it instead of the student when its best validation accuracy
beats the student's by more than ``gate_z`` standard errors of the difference (distillation
that only looks worse by noise is kept). Once ``retire_after`` of training is done, if the
student leads it by more than ``retire_z`` standard errors in ``retire_epochs`` consecutive
epochs, the shadow retires: it stops training and being validated and the student is final.

Its modules live in the distiller's ``extra`` (``extra["fallback"]``: the model,
``extra["gate"]``: :class:`ShadowGate`), so the optimiser, checkpoints, DDP and device moves
cover them like any trainable module of the method.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.fallback import FallbackParams

NAME = "fallback"


class ShadowGate(nn.Module):
    """The shadow's state, checkpointed with the method: ``active`` (still training), ``lead``
    (consecutive epochs in which the student led it clearly) and ``n_val`` (validation items
    behind the accuracies compared)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("active", torch.tensor(True))
        self.register_buffer("lead", torch.tensor(0))
        self.register_buffer("n_val", torch.tensor(0))


class CEShadow:
    """The shadow of ``distiller`` (module docstring); build it with :meth:`attach`."""

    def __init__(self, distiller, params: FallbackParams):
        self.distiller, self.params = distiller, params

    @classmethod
    def attach(cls, distiller) -> Optional["CEShadow"]:
        """The shadow of ``distiller`` if its params enable one (adding its modules to
        ``distiller.extra`` unless a previous attach did), else None."""
        p = getattr(distiller, "params", None)
        if not (isinstance(p, FallbackParams) and p.fallback):
            return None
        if NAME not in distiller.extra:
            distiller.extra[NAME] = copy.deepcopy(distiller.student)
            distiller.extra["gate"] = ShadowGate()
        return cls(distiller, p)

    @property
    def model(self) -> nn.Module:
        return self.distiller.extra[NAME]

    @property
    def gate(self) -> ShadowGate:
        return self.distiller.extra["gate"]

    @property
    def active(self) -> bool:
        return bool(self.gate.active)

    def losses(self, batch) -> dict:
        """``{"ce_fallback": CE(shadow(x_l), y_l)}`` while it trains, else ``{}``."""
        return {"ce_fallback": F.cross_entropy(self.model(batch.xs), batch.ys)} if self.active else {}

    def candidates(self) -> dict:
        return {NAME: self.model} if self.active else {}

    def parameters(self) -> list:
        return list(self.model.parameters())

    def select(self, records: dict, chosen: str) -> str:
        """``"fallback"`` when the shadow is active and validates better than the student by more
        than ``gate_z`` standard errors, else the method's own ``chosen``."""
        fb = records.get(NAME)
        if fb is None or not self.active:
            return chosen
        a, b = records["student"]["val_acc"], fb["val_acc"]
        return NAME if b - a > self.params.gate_z * self._se(a, b) else chosen

    def _se(self, a: float, b: float) -> float:
        """Standard error of a difference of two accuracies a, b on the n validation items (the
        binomial variance of each; at least 1/n, so one item always counts)."""
        n = max(1, int(self.gate.n_val))
        return max(math.sqrt(max(a * (1 - a) + b * (1 - b), 0.0) / n), 1.0 / n)

    def end_epoch(self, n_val: int, progress: float, row: dict) -> dict:
        """Decide whether the shadow retires, from the epoch's row (``val_acc``,
        ``fallback_val_acc``) on ``n_val`` validation items at ``progress`` (fraction of
        training done). Returns ``{"shadow_active": 0/1}`` while it was validated this epoch."""
        if not self.active or f"{NAME}_val_acc" not in row:
            return {}
        p, gate = self.params, self.gate
        gate.n_val.fill_(n_val)
        a, b = row["val_acc"], row[f"{NAME}_val_acc"]
        lead = progress >= p.retire_after and a - b > p.retire_z * self._se(a, b)
        gate.lead.fill_(int(gate.lead) + 1 if lead else 0)
        if int(gate.lead) >= p.retire_epochs:
            gate.active.fill_(False)
        return {"shadow_active": float(gate.active)}


__all__ = ["FallbackParams", "ShadowGate", "CEShadow", "NAME"]
