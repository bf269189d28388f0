"""Running class statistics of the frozen teacher: what it knows about each class."""
from __future__ import annotations

import torch
from torch import nn


class ClassPrototypes(nn.Module):
    """Per-class running means of teacher logits [K, K] and features [K, d], built from the
    teacher-modality batches (labels ``yt``), so they need no pairing at all.

    Each class mean is a cumulative average until it has seen ``1 / (1 - momentum)`` items,
    then an exponential moving average with ``momentum`` per item of that class. The
    statistics are buffers: they are checkpointed with the method's state.
    """

    def __init__(self, num_classes: int, feat_dim: int, momentum: float = 0.99):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ClassPrototypes: momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("logits", torch.zeros(num_classes, num_classes))
        self.register_buffer("features", torch.zeros(num_classes, feat_dim))
        self.register_buffer("count", torch.zeros(num_classes))

    @torch.no_grad()
    def update(self, feats: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """feats [M, d], logits [M, K], y [M] (teacher items and their labels)."""
        K = self.logits.shape[0]
        if logits.shape[1] != K or feats.shape[1] != self.features.shape[1] or y.shape != (len(feats),):
            raise ValueError(f"ClassPrototypes.update: expected feats [M, {self.features.shape[1]}], "
                             f"logits [M, {K}], y [M]; got {list(feats.shape)}, {list(logits.shape)}, "
                             f"{list(y.shape)}")
        onehot = torch.nn.functional.one_hot(y, K).to(feats.dtype)    # [M, K]
        n = onehot.sum(0)                                                # [K]
        seen = n > 0
        if not seen.any():
            return
        mean_l = (onehot.T @ logits) / n.clamp(min=1)[:, None]
        mean_f = (onehot.T @ feats) / n.clamp(min=1)[:, None]
        # weight of the new batch mean: cumulative average early, EMA (per item) later
        w_ema = 1.0 - self.momentum ** n
        w_cum = n / (self.count + n).clamp(min=1)
        w = torch.maximum(w_ema, w_cum) * seen
        self.logits.mul_(1 - w[:, None]).add_(w[:, None] * mean_l)
        self.features.mul_(1 - w[:, None]).add_(w[:, None] * mean_f)
        self.count.add_(n)

    def known(self, y: torch.Tensor) -> torch.Tensor:
        """[B] bool: whether class y[i] has been seen."""
        return self.count[y] > 0
