"""Logit distillation losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD term: T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean. Logits [B, K]."""
    t = temperature
    log_ps = F.log_softmax(student_logits / t, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * t * t
