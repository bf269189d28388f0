"""FreeMatch (Wang et al., ICLR 2023): FixMatch with self-adaptive thresholds.

Why FreeMatch among FixMatch's adaptive-threshold successors: its threshold is a global EMA of
the model's confidence scaled per class by an EMA of its class probabilities, so early in
training (or with very few labels, our regime of 5-10 per class) it admits pseudo-labels a
fixed 0.95 would reject, and it tightens as the model grows confident; the paper's largest gains
are at 1-4 labels per class. FlexMatch's per-class thresholds need counts over the whole
unlabelled set (a per-item memory) and SoftMatch replaces the mask by a Gaussian weight; both
are further from a drop-in change of FixMatch's mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..config import ranged
from ..losses.semi import FreeMatchThreshold, freematch_fairness, masked_ce, ramp
from .base import DistillOutput, Distiller, register_method
from .fixmatch import views_forward


@dataclass
class FreeMatchParams:
    w_u: float = ranged(1.0, 0.0)   # lambda_u
    w_f: float = ranged(0.01, 0.0)   # lambda_f: weight of the self-adaptive fairness term (the paper's 0.01)
    momentum: float = ranged(0.999, 0.0, 1.0, hi_open=True)   # EMA momentum of the thresholds
    warmup: float = ranged(0.0, 0.0, 1.0)   # fraction of training over which w_u and w_f ramp 0 -> 1


@register_method("freematch")
class FreeMatch(Distiller):
    """loss = CE(s(weak(x_l)), y) + w_u * sum_i [max p_i >= tau_t(argmax p_i)] CE(s(strong(x_u,i)),
    argmax p_i) / B_u + w_f * L_f, p = softmax(s(weak(x_u))) detached, with the thresholds
    (``extra["threshold"]``, :class:`~ucmkd.losses.semi.FreeMatchThreshold`) updated from p
    before masking, and L_f :func:`~ucmkd.losses.semi.freematch_fairness`. Logs ``ce``, ``unsup``,
    ``fair`` and ``mask``, ``tau``."""

    uses_teacher = False
    uses_unlabelled = True
    uses_augmentation = True
    labelled_augment = "weak"
    Params = FreeMatchParams

    def __init__(self, student, teacher=None, params=None):
        super().__init__(student, teacher, params)
        self.extra["threshold"] = FreeMatchThreshold(student.num_classes, self.params.momentum)

    def forward(self, batch):
        p = self.params
        th = self.extra["threshold"]
        logits, lw, ls = views_forward(self, batch)
        probs = lw.detach().softmax(1)
        if self.training:
            th.update(probs)
        yhat, mask = th.mask(probs)
        w = ramp(self.progress, p.warmup)
        unsup = masked_ce(ls, yhat, mask)
        fair = freematch_fairness(ls, mask, th.p_model, th.label_hist)
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys), "unsup": w * p.w_u * unsup,
                                      "fair": w * p.w_f * fair},
                             metrics={"mask": float(mask.float().mean()), "tau": float(th.tau)})
