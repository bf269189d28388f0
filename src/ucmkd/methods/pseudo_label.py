"""Teacher-free semi-supervised baseline: confidence-thresholded pseudo-labelling.

It sees exactly the unlabelled student items that ``ucmkd`` sees, so a gain that comes from
the unlabelled data alone is measured without a teacher and not credited to distillation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..losses.semi import confident_targets, masked_ce, ramp
from .base import DistillOutput, Distiller, register_method


@dataclass
class SemiParams:
    w_u: float = 1.0            # weight of the pseudo-label loss on unlabelled items
    threshold: float = 0.95     # confidence needed for a pseudo-label
    warmup: float = 0.1         # fraction of training over which the unlabelled weight ramps 0 -> 1


def check_semi(name: str, p) -> None:
    if not 0.0 <= p.threshold <= 1.0:
        raise ConfigError(f"method {name!r}: threshold must be in [0, 1], got {p.threshold}")
    if not 0.0 <= p.warmup <= 1.0:
        raise ConfigError(f"method {name!r}: warmup must be a fraction of training in [0, 1], got {p.warmup}")
    if p.w_u < 0:
        raise ConfigError(f"method {name!r}: w_u must be >= 0, got {p.w_u}")


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

    def __init__(self, student, teacher=None, params=None):
        super().__init__(student, teacher, params)
        check_semi(self.name, self.params)

    def forward(self, batch):
        p = self.params
        _, logits, _, logits_u = split_forward(self.student, batch.xs, batch.xu)
        yhat, mask = confident_targets(logits_u.softmax(1), p.threshold)
        w = ramp(self.progress, p.warmup) * p.w_u
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys),
                                      "pl": w * masked_ce(logits_u, yhat, mask)},
                             metrics={"pl_mask": float(mask.float().mean())})
