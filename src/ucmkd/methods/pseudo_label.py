"""Teacher-free semi-supervised baseline: confidence-thresholded pseudo-labelling.

It sees exactly the unlabelled student items that ``ucmkd`` sees, so a gain that comes from
the unlabelled data alone is measured without a teacher and not credited to distillation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ranged
from ..losses.semi import confident_targets, masked_ce, ramp
from .base import DistillOutput, Distiller, register_method


@dataclass
class SemiParams:
    w_u: float = ranged(1.0, 0.0)   # weight of the pseudo-label loss on unlabelled items
    threshold: float = ranged(0.95, 0.0, 1.0)   # confidence needed for a pseudo-label
    warmup: float = ranged(0.1, 0.0, 1.0)   # fraction of training over which the unlabelled weight ramps 0 -> 1


def split_forward(student, xs: torch.Tensor, xu: torch.Tensor):
    """One student forward over labelled and unlabelled items (shared batch-norm statistics):
    (z_l [B, d], logits_l [B, K], z_u [B_u, d], logits_u [B_u, K])."""
    student.check_input(xs)
    student.check_input(xu)          # named shape error before the concatenation can fail
    z, logits = student(torch.cat([xs, xu]), return_features=True)
    b = len(xs)
    return z[:b], logits[:b], z[b:], logits[b:]


@register_method("pseudo-label")
class PseudoLabel(Distiller):
    """loss = CE(s(x_l), y) + w * w_u * sum_i [max p_i >= tau] CE(s(x_u,i), argmax p_i) / B_u, with
    p = softmax(s(x_u)) detached (Lee, 2013; FixMatch's confidence mask without augmentation) and
    w ramping 0 -> 1 over ``warmup``. Logs ``ce``, ``pl`` and ``pl_mask`` (confident fraction,
    a zero-weight diagnostic)."""

    uses_teacher = False
    uses_unlabelled = True
    Params = SemiParams

    def forward(self, batch):
        p = self.params
        _, logits, _, logits_u = split_forward(self.student, batch.xs, batch.xu)
        yhat, mask = confident_targets(logits_u.softmax(1), p.threshold)
        w = ramp(self.progress, p.warmup) * p.w_u
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys),
                                      "pl": w * masked_ce(logits_u, yhat, mask)},
                             metrics={"pl_mask": float(mask.float().mean())})
