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
from ..losses.ot import FeatureAlignmentLoss
from .base import DistillOutput, Distiller, register_method


@dataclass
class OTParams:
    metric: str = "cosine"      # cosine | chordal | l2 | l1
    eps: float = 0.1            # entropic regularisation
    n_iter: int = 100           # Sinkhorn iterations
    backend: str = "pot"        # pot (ot.sinkhorn2, the authors' call) | torch (log-domain, underflow-proof) | geomloss
    grad: str = "autodiff"      # autodiff (the authors') | detach


def make_fa(p) -> FeatureAlignmentLoss:
    return FeatureAlignmentLoss(metric=p.metric, eps=p.eps, n_iter=p.n_iter, backend=p.backend, grad=p.grad)


@register_method("ucmkd-joint")
class UCMKDJoint(Distiller):
    """CE + w_fa * OT(project(f_S(x_b)), f_T(x_a)) + w_la * LA(h_S(z), h_T(z), y)."""

    projects_features = True

    @dataclass
    class Params(OTParams):
        w_fa: float = 1.0
        w_la: float = 1.0

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        self.fa = make_fa(self.params)

    def forward(self, batch):
        zt, _ = self.teacher_forward(batch.xt)
        z, logits = self.student(batch.xs, return_features=True)
        zp = self.project(z)
        t_head = self.teacher.head(zp)   # frozen head; gradient flows into zp
        p = self.params
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys),
                                      "fa": p.w_fa * self.fa(zp, zt),
                                      "la": p.w_la * label_alignment(logits, t_head, batch.ys)})


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
