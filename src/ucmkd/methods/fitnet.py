"""FitNets-style feature regression (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ..losses.feature_regression import fitnet_loss
from .base import DistillOutput, Distiller, register_method


@register_method("fitnet")
class FitNet(Distiller):
    """loss = CE(s, y) + weight * MSE(r(z_s), z_t): a learned linear regressor
    ``r = Linear(d_s, d_t)`` (``extra["regressor"]``, present even when d_s == d_t) maps the
    student feature onto the feature of the teacher item joined with each student item
    (class-matched by default). Single hint at the penultimate (embedding) layer.
    """

    @dataclass
    class Params:
        weight: float = 1.0   # weight of the hint (feature-regression) loss

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        self.extra["regressor"] = nn.Linear(student.feat_dim, teacher.feat_dim)

    def forward(self, batch):
        zt, _ = self.teacher_forward(batch, match=len(batch.xs))
        z, logits = self.student(batch.xs, return_features=True)
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys),
                                      "fitnet": self.params.weight * fitnet_loss(self.extra["regressor"](z), zt)})
