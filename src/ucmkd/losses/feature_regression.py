"""Feature-regression losses: FitNets hints and NORM's N-to-one matching."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fitnet_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al., ICLR 2015): ``mean_ij (pred_ij - target_ij)^2``.

    pred: regressed student features [B, d_t]; target: teacher features [B, d_t] (detached).
    Returns a 0-dim tensor (mean over all B * d_t entries).
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"fitnet: regressed student features {list(pred.shape)} and teacher "
                         f"features {list(target.shape)} must both be [B, d_t]")
    return F.mse_loss(pred, target.detach())


def norm_loss(expanded: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """NORM loss (Liu et al., ICLR 2023): each of the N consecutive segments of the expanded
    student feature is regressed onto the same teacher feature.

    expanded: [B, N * d_t] (segment k = columns k*d_t .. (k+1)*d_t - 1); target: [B, d_t]
    (detached); returns ``mean over B, N, d_t of (expanded - [target, ..., target])^2``, 0-dim.
    """
    if target.dim() != 2 or expanded.dim() != 2 or expanded.shape != (target.shape[0], n * target.shape[1]):
        raise ValueError(f"norm: expanded student features {list(expanded.shape)} must be "
                         f"[B, N * d_t] for teacher features {list(target.shape)} and N = {n}")
    return F.mse_loss(expanded, target.detach().repeat(1, n))
