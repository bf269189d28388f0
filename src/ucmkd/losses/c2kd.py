"""Loss math of C2KD (Huo et al., "C2KD: Bridging the Modality Gap for Cross-Modal Knowledge
Distillation", CVPR 2024): Kendall rank correlation of non-target logits (the on-the-fly
selection filter) and temperature-scaled KL terms restricted to non-target classes and to the
selected samples."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kendall tau-a between a [B, K] and b [B, K]; returns [B].

    tau_r = sum_{i<j} sign(a_ri - a_rj) * sign(b_ri - b_rj) / (K (K - 1) / 2): concordant pairs
    count +1, discordant -1, ties 0 (tau-a; equal to scipy's default tau-b when a row has no
    ties). Rows with K < 2 have no pairs and get 0. Vectorised over all pairs (B * K^2 memory);
    no gradient (signs are piecewise constant).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"kendall_tau: a {list(a.shape)} and b {list(b.shape)} must both be [B, K]")
    k = a.shape[1]
    if k < 2:
        return a.new_zeros(a.shape[0])
    a, b = a.detach(), b.detach()
    sa = torch.sign(a.unsqueeze(2) - a.unsqueeze(1))   # [B, K, K]
    sb = torch.sign(b.unsqueeze(2) - b.unsqueeze(1))
    # the full K x K sum counts every unordered pair twice (the diagonal is 0)
    return (sa * sb).sum(dim=(1, 2)) / (k * (k - 1))


def drop_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logits [B, K] without each row's target column ``target`` [B] -> [B, K - 1] (order kept)."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[torch.arange(logits.shape[0], device=logits.device), target] = False
    return logits[keep].view(logits.shape[0], logits.shape[1] - 1)


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row T^2 * KL(softmax(t/T) || softmax(s/T)) for logits [B, K] -> [B].

    ``teacher_logits`` is the target and is detached; gradient flows into ``student_logits``.
    """
    t = temperature
    log_ps = F.log_softmax(student_logits / t, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(1) * t * t


def selected_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                keep: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_{b kept} kl_rows(s, t)_b / B, 0-dim (C2KD's ``(mask * kl).mean()``).

    student_logits, teacher_logits: [B, K] (the teacher side is detached); keep: bool/0-1 [B]
    or None (all rows); target: [B] labels whose column is dropped from both sides before the
    softmax (non-target KL), or None (all classes). Dividing by the full batch size B, not by
    the number kept, makes the term shrink with the kept fraction and be exactly 0 (still in
    the graph) when no row is kept.
    """
    if target is not None:
        student_logits, teacher_logits = drop_target(student_logits, target), drop_target(teacher_logits, target)
    rows = kl_rows(student_logits, teacher_logits, temperature)
    if keep is not None:
        rows = rows * keep.to(rows.dtype)
    return rows.sum() / max(1, rows.shape[0])


def selection_mask(tau: torch.Tensor, krc: float) -> torch.Tensor:
    """C2KD's on-the-fly filter: keep rows with tau > krc ([B] bool). ``krc <= -1`` disables
    the filter (every row kept, perfectly reversed rankings included)."""
    if krc <= -1.0:
        return torch.ones_like(tau, dtype=torch.bool)
    return tau > krc
