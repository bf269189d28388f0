"""Vanilla KD (Hinton et al., 2015) on the teacher item the sampler pairs with each student item."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..losses.kd import kd_kl
from .base import DistillOutput, Distiller, register_method


@register_method("kd")
class KD(Distiller):
    """loss = (1 - alpha) * CE(s, y) + alpha * T^2 KL(p_t^T || p_s^T), with teacher logits on
    the paired teacher-modality item (class-matched by default, true pair when ``paired``)."""

    @dataclass
    class Params:
        temperature: float = 4.0
        alpha: float = 0.9

    def forward(self, batch):
        logits = self.student(batch.xs)
        _, t_logits = self.teacher_forward(batch, match=len(batch.xs))
        p = self.params
        return DistillOutput(logits, {"ce": (1 - p.alpha) * F.cross_entropy(logits, batch.ys),
                                      "kd": p.alpha * kd_kl(logits, t_logits, p.temperature)})
