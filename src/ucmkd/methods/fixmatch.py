"""FixMatch (Sohn et al., NeurIPS 2020): a teacher-free semi-supervised baseline.

Labelled items are weakly augmented (by the trainer, ``labelled_augment = "weak"``); each
unlabelled item gets a weak and a strong view (:mod:`ucmkd.augment`, the student modality's
policy); the weak view's prediction, where confident, is the strong view's hard target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ranged
from ..losses.semi import fixmatch_unlabelled_loss, ramp
from .base import DistillOutput, Distiller, register_method


@dataclass
class FixMatchParams:
    threshold: float = ranged(0.95, 0.0, 1.0)   # tau: confidence needed for a pseudo-label
    w_u: float = ranged(1.0, 0.0)   # lambda_u: weight of the unlabelled loss
    warmup: float = ranged(0.0, 0.0, 1.0)   # fraction of training over which w_u ramps 0 -> 1 (the paper: none)


def views_forward(d: Distiller, batch):
    """One student forward over the labelled items and the weak and strong views of the
    unlabelled ones (shared batch-norm statistics, as in FixMatch): (logits_l [B, K],
    logits_weak [B_u, K], logits_strong [B_u, K]). The views come from stream 1 of the batch's
    augmentation generator (weak first, then strong)."""
    xs, xu = batch.xs, batch.xu
    d.student.check_input(xs)
    d.student.check_input(xu)
    gen = d.augment_generator(batch, 1)
    xw, xst = d.augment(xu, "weak", gen), d.augment(xu, "strong", gen)
    logits = d.student(torch.cat([xs, xw, xst]))
    b, bu = len(xs), len(xu)
    return logits[:b], logits[b:b + bu], logits[b + bu:]


@register_method("fixmatch")
class FixMatch(Distiller):
    """loss = CE(s(weak(x_l)), y) + w_u * sum_i [max p_i >= tau] CE(s(strong(x_u,i)), argmax p_i) / B_u,
    p = softmax(s(weak(x_u))) detached. B_u = mu B (``pairing.unlabelled_ratio``). Logs ``ce``,
    ``unsup`` and ``mask`` (confident fraction)."""

    uses_teacher = False
    uses_unlabelled = True
    uses_augmentation = True
    labelled_augment = "weak"
    Params = FixMatchParams

    def forward(self, batch):
        p = self.params
        logits, lw, ls = views_forward(self, batch)
        unsup, mask = fixmatch_unlabelled_loss(lw, ls, p.threshold)
        w = p.w_u * ramp(self.progress, p.warmup)
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys), "unsup": w * unsup},
                             metrics={"mask": float(mask.float().mean())})
