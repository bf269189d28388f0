"""Decoupled knowledge distillation (DKD; Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

The temperature-softened KD loss splits per item into a target-class term and a non-target term:

    KL(p_t || p_s) = TCKD + (1 - p_t[y]) * NCKD

- TCKD = KL(b_t || b_s), with b = [p[y], 1 - p[y]] the binary target / non-target masses;
- NCKD = KL(q_t || q_s), with q = softmax over the K - 1 non-target logits only.

DKD drops the coupling factor ``(1 - p_t[y])`` and weights the two terms freely:
``alpha * TCKD + beta * NCKD`` (both scaled by T^2, batch mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
           temperature: float) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"dkd: student logits {list(student_logits.shape)} and teacher logits "
                         f"{list(teacher_logits.shape)} must both be [B, K]")
    if student_logits.shape[1] < 2:
        raise ValueError(f"dkd: needs K >= 2 classes, got logits {list(student_logits.shape)}")
    if target.shape != (student_logits.shape[0],):
        raise ValueError(f"dkd: target {list(target.shape)} must be [B] = [{student_logits.shape[0]}]")
    if not temperature > 0:
        raise ValueError(f"dkd: temperature must be > 0, got {temperature}")


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each T^2-scaled and averaged over the batch (0-dim tensors).

    student_logits, teacher_logits: [B, K]; target: [B] int64 class indices (the target class
    of both distributions). The teacher logits are detached. Computed in log space (no
    ``log(1 - p)`` underflow); the non-target distribution is the softmax over the K - 1
    non-target logits (K = 2 gives NCKD = 0).
    """
    _check(student_logits, teacher_logits, target, temperature)
    T = float(temperature)
    B, K = student_logits.shape
    s = student_logits / T
    t = teacher_logits.detach() / T
    gt = F.one_hot(target, K).bool()
    s_nt = s[~gt].view(B, K - 1)          # non-target logits, original order kept
    t_nt = t[~gt].view(B, K - 1)

    def binary_log(z, z_nt):              # log [p[y], 1 - p[y]]  -> [B, 2]
        lse = torch.logsumexp(z, dim=1)
        return torch.stack([z[gt] - lse, torch.logsumexp(z_nt, dim=1) - lse], dim=1)

    log_bs, log_bt = binary_log(s, s_nt), binary_log(t, t_nt)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1).mean()
    log_qs, log_qt = F.log_softmax(s_nt, dim=1), F.log_softmax(t_nt, dim=1)
    nckd = (log_qt.exp() * (log_qt - log_qs)).sum(1).mean()
    return tckd * T * T, nckd * T * T


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """DKD loss ``alpha * TCKD + beta * NCKD`` (T^2-scaled, batch mean), a 0-dim tensor.

    student_logits, teacher_logits: [B, K]; target: [B] int64. See :func:`dkd_terms`.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd
