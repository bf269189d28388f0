"""Label alignment (LA), exactly as the paper's joint form computes it.

p_T = softmax(h_T(z_s)) is the frozen teacher head applied to student features (the head
gets no gradient; z_s does); kappa = p_T detached; p_S = softmax(h_S(z_s)).

    LA = mean_i [ -log p_S(y_i) + kappa_i[y_i] * log p_T(y_i) ]

Note the sign of the second term: minimising it LOWERS the teacher head's probability of the
true class on student features. This is what the authors' scripts compute; it is reproduced
unchanged here (see the issue tracker for its measured effect).

The AVE script computes h_T(z_s) under ``no_grad`` (``teacher_grad=False``): the second term
then passes no gradient, and LA's gradient is that of its first term, the student's CE. The
CREMA-D and RAVDESS scripts let it pass (``teacher_grad=True``, the default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .numerics import at_least_fp32


def label_alignment(student_logits: torch.Tensor, teacher_head_logits: torch.Tensor,
                    y: torch.Tensor, teacher_grad: bool = True) -> torch.Tensor:
    """LA loss (in float32 or wider). student_logits, teacher_head_logits: [B, K]; y: [B] int64. Returns a
    scalar; with ``teacher_grad=False`` no gradient flows through ``teacher_head_logits``."""
    if not teacher_grad:
        teacher_head_logits = teacher_head_logits.detach()
    log_ps = F.log_softmax(at_least_fp32(student_logits), dim=1).gather(1, y[:, None]).squeeze(1)
    log_pt = F.log_softmax(at_least_fp32(teacher_head_logits), dim=1).gather(1, y[:, None]).squeeze(1)
    kappa = log_pt.detach().exp()
    return (-log_ps + kappa * log_pt).mean()


def teacher_head_agreement(teacher_head_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy of the teacher head on student features (a label-alignment diagnostic), in [0, 1]."""
    return (teacher_head_logits.argmax(1) == y).float().mean()
