"""Ablation of the paper's joint objective: feature alignment (OT) without label alignment."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import DistillOutput, Distiller, register_method
from .ucmkd_paper import OTParams, make_fa


@register_method("fa-only")
class FAOnly(Distiller):
    """loss = CE(s, y) + w_fa * OT(project(f_S(x_b)), f_T(x_a)): ``ucmkd-joint`` with w_la = 0
    (same FA loss and OT options, :class:`~ucmkd.methods.ucmkd_paper.OTParams`)."""

    projects_features = True

    @dataclass
    class Params(OTParams):
        w_fa: float = 1.0   # weight of the feature-alignment (entropic OT) loss

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        self.fa = make_fa(self.params)

    def forward(self, batch):
        zt, _ = self.teacher_forward(batch.xt)
        z, logits = self.student(batch.xs, return_features=True)
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys),
                                      "fa": self.params.w_fa * self.fa(self.project(z), zt)})
