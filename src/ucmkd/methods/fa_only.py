"""Ablation of the paper's joint objective: feature alignment (OT) without label alignment."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..losses.ot import FeatureAlignmentLoss
from .base import DistillOutput, Distiller, register_method


@dataclass
class OTParams:
    metric: str = "cosine"      # cosine | chordal | l2 | l1
    eps: float = 0.1            # entropic regularisation
    n_iter: int = 100           # Sinkhorn iterations
    backend: str = "fused"      # fused (POT's iterates and stopping rule, faster; tested against POT) | pot (ot.sinkhorn2, the authors' call) | torch (log-domain) | geomloss
    # autodiff: gradient of the transport cost <P, C> through the Sinkhorn iterations (the
    # authors'; the paper methods keep it unless a recipe says otherwise) | envelope (alias
    # detach): plan held fixed, i.e. the gradient of the REGULARISED objective <P, C> - eps H(P)
    # (envelope theorem), not of <P, C>: cheaper, 21-28 % away from autodiff on clustered
    # features (docs/ot.md), 38-90 % in an independent check on other features
    grad: str = "autodiff"


class FullPrecisionFA(FeatureAlignmentLoss):
    """The FA loss with autocast switched off around the solve: under a bf16/fp16 run the
    features arrive in low precision and ``ot.py`` promotes them to float32, but an active
    autocast would run the cost matmul and the Sinkhorn products in low precision again."""

    def forward(self, zs: torch.Tensor, zt: torch.Tensor, extra_cost=None) -> torch.Tensor:
        with torch.autocast(zs.device.type, enabled=False):
            return super().forward(zs, zt, extra_cost)


def make_fa(p) -> FeatureAlignmentLoss:
    return FullPrecisionFA(metric=p.metric, eps=p.eps, n_iter=p.n_iter, backend=p.backend, grad=p.grad)


@register_method("fa-only")
class FAOnly(Distiller):
    """loss = CE(s, y) + w_fa * OT(project(f_S(x_b)), f_T(x_a)): ``ucmkd-joint`` with w_la = 0
    (same FA loss and OT options, :class:`OTParams`)."""

    projects_features = True

    @dataclass
    class Params(OTParams):
        w_fa: float = 1.0   # weight of the feature-alignment (entropic OT) loss

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        self.fa = make_fa(self.params)

    def feature_terms(self, batch):
        """(student logits [B, K], projected student features [B, d_t], {"ce", "fa"} losses)."""
        zt, _ = self.teacher_forward(batch)
        z, logits = self.student(batch.xs, return_features=True)
        zp = self.project(z)
        return logits, zp, {"ce": F.cross_entropy(logits, batch.ys), "fa": self.params.w_fa * self.fa(zp, zt)}

    def forward(self, batch):
        logits, _, losses = self.feature_terms(batch)
        return DistillOutput(logits, losses)
