"""Teacher-free baselines: cross-entropy, and cross-entropy with label smoothing."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import DistillOutput, Distiller, register_method


@register_method("ce")
class CE(Distiller):
    """Plain cross-entropy on the labelled student batch (no teacher)."""

    uses_teacher = False

    @dataclass
    class Params:
        label_smoothing: float = 0.0

    def forward(self, batch):
        logits = self.student(batch.xs)
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys,
                                                            label_smoothing=self.params.label_smoothing)})


@register_method("ce-ls")
class CELabelSmoothing(CE):
    """Cross-entropy with label smoothing 0.1: the control for the bilevel method's LS losses."""

    @dataclass
    class Params:
        label_smoothing: float = 0.1


@register_method("ce-aug")
class CEAugmented(CE):
    """Cross-entropy on weakly augmented labelled items (:mod:`ucmkd.augment`; the trainer applies
    it, :meth:`~ucmkd.methods.Distiller.augment_labelled`): the augmented supervised baseline."""

    labelled_augment = "weak"
