"""Teacher-free baseline that learns from both modalities' labels through shared weights.

In the spirit of "Better Together: Leveraging Unpaired Multimodal Data for Stronger Unimodal
Models" (Gupta et al., 2025): no teacher model and no pairs; the student's linear head is
shared by the two modalities and trained on both labelled batches, so the teacher modality's
labelled data shapes the student's decision boundaries. Each modality has its own encoder when
their input shapes differ; with equal input shapes the student's encoder is the shared trunk.
Only the student (its encoder and the shared head) is validated and exported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ranged
from ..errors import ConfigError, DataError
from .base import DistillOutput, Distiller, register_method


@register_method("better-together")
class BetterTogether(Distiller):
    """loss = CE(h(f_s(x_s)), y_s) + w_other * CE(h(f_o(x_t)), y_t), with h the student head
    (shared), f_s the student encoder and f_o the teacher-modality encoder
    (``extra["other_encoder"]``; f_s itself when ``share_trunk`` and the input shapes agree).
    Logs ``ce``, ``ce_other`` and ``other_acc`` (training accuracy on the teacher-modality batch)."""

    uses_teacher = False
    uses_other_modality = True

    @dataclass
    class Params:
        w_other: float = ranged(1.0, 0.0)   # weight of the CE on the teacher-modality labelled batch
        share_trunk: bool = True    # equal input shapes: one encoder for both modalities

    def __init__(self, student, teacher=None, params=None):
        super().__init__(student, teacher, params)
        self.other_shape = None        # input shape of the teacher modality, set by attach_other_modality

    def attach_other_modality(self, model) -> None:
        """Take ``model``'s encoder (teacher-modality input -> [B, d_s]) as ``extra["other_encoder"]``,
        unless ``share_trunk`` and its input shape is the student's (the student's encoder is then
        used for both). ``model``'s own head is dropped: the student's head is the shared one."""
        if model.feat_dim != self.student.feat_dim:
            raise ConfigError(f"method 'better-together': the teacher-modality encoder gives {model.feat_dim}-d "
                              f"features, the shared head takes {self.student.feat_dim}")
        self.other_shape = tuple(model.input_shape)
        if not (self.params.share_trunk and self.other_shape == tuple(self.student.input_shape)):
            self.extra["other_encoder"] = model.encoder

    def other_features(self, xt: torch.Tensor) -> torch.Tensor:
        """Teacher-modality items [B', ...] -> features [B', d_s] for the shared head."""
        if self.other_shape is None:
            raise ConfigError("method 'better-together': no teacher-modality encoder attached "
                              "(call attach_other_modality; ucmkd.api.prepare does)")
        if tuple(xt.shape[1:]) != self.other_shape:
            raise DataError(f"better-together: expected teacher-modality input [B, "
                            f"{', '.join(map(str, self.other_shape))}], got {list(xt.shape)}")
        enc = self.extra["other_encoder"] if "other_encoder" in self.extra else self.student.encoder
        return enc(xt)

    def forward(self, batch):
        if batch.xt is None or batch.yt is None:
            raise ConfigError("method 'better-together' needs a labelled teacher-modality batch; the sampler gave none")
        logits = self.student(batch.xs)
        logits_o = self.student.head(self.other_features(batch.xt))
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys),
                                      "ce_other": self.params.w_other * F.cross_entropy(logits_o, batch.yt)},
                             metrics={"other_acc": float((logits_o.argmax(1) == batch.yt).float().mean())})
