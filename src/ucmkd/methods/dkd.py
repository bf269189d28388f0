"""Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..config import ranged
from ..losses.dkd import dkd_terms
from .base import DistillOutput, Distiller, register_method


@register_method("dkd")
class DKD(Distiller):
    """loss = CE(s, y) + w * (alpha * TCKD + beta * NCKD), T^2-scaled, target class = the
    student label y for both distributions; teacher logits on the teacher item the sampler
    joins with each student item (same class under ``class-matched``; under ``unpaired`` its
    class may differ from y). ``w = min(1, progress / warmup)`` ramps the KD weight linearly
    from 0 over the first ``warmup`` fraction of training (the paper's warm-up, per epoch).

    Logged as ``ce``, ``tckd`` and ``nckd`` (each already weighted).
    """

    @dataclass
    class Params:
        alpha: float = 1.0          # weight of the target-class term (TCKD)
        beta: float = 8.0           # weight of the non-target-class term (NCKD)
        temperature: float = ranged(4.0, 0.0, lo_open=True)
        warmup: float = ranged(0.1, 0.0, 1.0)   # fraction of training over which the KD weight ramps 0 -> 1

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)

    def kd_weight(self) -> float:
        w = self.params.warmup
        return 1.0 if w <= 0 else min(1.0, self.progress / w)

    def forward(self, batch):
        logits = self.student(batch.xs)
        _, t_logits = self.teacher_forward(batch, match=len(batch.xs))
        p = self.params
        tckd, nckd = dkd_terms(logits, t_logits, batch.ys, p.temperature)
        w = self.kd_weight()
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys),
                                      "tckd": w * p.alpha * tckd,
                                      "nckd": w * p.beta * nckd})
