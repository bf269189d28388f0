"""Semi-supervised terms on unlabelled student items (shared by ``pseudo-label`` and ``ucmkd``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def confident_targets(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and their confidence mask from class probabilities ``probs`` [B, K]
    (no gradient): (labels [B] int64, mask [B] bool = max prob >= ``threshold``)."""
    if probs.dim() != 2:
        raise ValueError(f"confident_targets: probs must be [B, K], got {list(probs.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"confident_targets: threshold must be in [0, 1], got {threshold}")
    conf, labels = probs.detach().max(dim=1)
    return labels, conf >= threshold


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i mask_i * CE(logits_i, labels_i) / B: the pseudo-label loss, normalised by the whole
    batch (as in FixMatch), so it fades when few items are confident. logits [B, K]."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, labels, reduction="none")
    return (ce * mask.to(ce.dtype)).sum() / logits.shape[0]


def ramp(progress: float, warmup: float) -> float:
    """Weight in [0, 1]: linear from 0 to 1 over the first ``warmup`` fraction of training."""
    return 1.0 if warmup <= 0 else min(1.0, max(0.0, progress) / warmup)


class PriorAlignment(nn.Module):
    """Label-distribution alignment of pseudo-label probabilities (as in ReMixMatch):
    q = normalise(p * prior / mean_p), with mean_p a running mean of the student's predicted
    class distribution on unlabelled items and ``prior`` the class frequencies of the labels
    given (e.g. the teacher's label counts). It stops pseudo-labels collapsing onto a few classes.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean_p", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("threshold", torch.tensor(1.0))   # set by validation calibration

    @torch.no_grad()
    def align(self, probs: torch.Tensor, prior_counts: torch.Tensor, update: bool = True) -> torch.Tensor:
        """probs [B, K] -> aligned probs [B, K]; ``update``: also update the running mean;
        prior_counts [K]."""
        if update:
            self.mean_p.mul_(self.momentum).add_((1 - self.momentum) * probs.mean(0))
        prior = prior_counts.to(probs.dtype)
        prior = prior / prior.sum() if prior.sum() > 0 else torch.full_like(prior, 1.0 / len(prior))
        q = probs * (prior / self.mean_p.clamp(min=1e-6))[None, :]
        return q / q.sum(1, keepdim=True).clamp(min=1e-12)
