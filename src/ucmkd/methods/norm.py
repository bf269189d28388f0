"""NORM (Liu et al., "NORM: Knowledge Distillation via N-to-One Representation Matching", ICLR 2023)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ..config import ranged
from ..losses.feature_regression import norm_loss
from .base import DistillOutput, Distiller, register_method


@register_method("norm")
class NORM(Distiller):
    """loss = CE(s, y) + weight * MSE(E(z_s), [z_t, ..., z_t]): a learned linear expansion
    ``E = Linear(d_s, N * d_t)`` (``extra["expander"]``) whose N consecutive segments are each
    regressed onto the feature of the teacher item joined with the student item
    (class-matched by default). Only the linear expansion at the embedding is reproduced; the
    student's own head classifies the unexpanded z_s.
    """

    @dataclass
    class Params:
        n: int = ranged(4, 1)   # N: expansion factor (number of student segments per teacher feature)
        weight: float = 1.0   # weight of the N-to-one matching loss

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        self.extra["expander"] = nn.Linear(student.feat_dim, self.params.n * teacher.feat_dim)

    def forward(self, batch):
        zt, _ = self.teacher_forward(batch, match=len(batch.xs))
        z, logits = self.student(batch.xs, return_features=True)
        p = self.params
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys),
                                      "norm": p.weight * norm_loss(self.extra["expander"](z), zt, p.n)})
