"""The paper's two algorithms, reproduced as its authors' scripts compute them.

- ``ucmkd-joint`` ("sumall"): loss = CE + w_fa * FA + w_la * LA.
- ``ucmkd-bilevel``: the paper's main algorithm. Its losses are defined here; the stepping
  (inner steps on a functional copy of the student, first-order outer update) is the
  ``bilevel`` training strategy in :mod:`ucmkd.engine.strategies`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..losses.label_alignment import label_alignment
from .base import DistillOutput, Distiller, register_method
from .fa_only import FAOnly, OTParams, make_fa


@register_method("ucmkd-joint")
class UCMKDJoint(FAOnly):
    """CE + w_fa * OT(project(f_S(x_b)), f_T(x_a)) + w_la * LA(h_S(z), h_T(z), y)."""

    @dataclass
    class Params(FAOnly.Params):
        w_la: float = 1.0

    def forward(self, batch):
        logits, zp, losses = self.feature_terms(batch)
        t_head = self.teacher.head(zp)   # frozen head; gradient flows into zp
        losses["la"] = self.params.w_la * label_alignment(logits, t_head, batch.ys)
        return DistillOutput(logits, losses)


@register_method("ucmkd-bilevel")
class UCMKDBilevel(Distiller):
    """Bilevel UCMKD. Per batch: copy theta -> theta' with a fresh AdamW(inner_lr, inner_wd);
    n1 steps on FA; n2 steps on the head only (CE-LS on detached features); the outer CE-LS
    gradient at theta' updates theta (first order); batch-norm statistics come back from theta'.

    ``forward`` (used for logging/evaluation only) returns the outer loss at theta.
    """

    projects_features = True

    strategy = "bilevel"

    @dataclass
    class Params(OTParams):
        inner_lr: float = 5e-5
        inner_wd: float = 0.05
        n1: int = 1
        n2: int = 1
        label_smoothing: float = 0.1

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        self.fa = make_fa(self.params)

    def outer_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.params.label_smoothing)

    head_loss = outer_loss

    def forward(self, batch):
        logits = self.student(batch.xs)
        return DistillOutput(logits, {"outer_ce_ls": self.outer_loss(logits, batch.ys)})
