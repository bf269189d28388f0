"""Ground costs ``C`` [B, M] between student features [B, d] and teacher features [M, d]."""
from __future__ import annotations

import torch

from ucmkd.errors import ConfigError

from .checks import PREFIX, check_choice, check_features

METRICS = ("cosine", "chordal", "l2", "l1")
_NORM_FLOOR = 1e-12  # norms are clamped to this (in feature units) before dividing


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [..., d] divided by their norms; a zero vector maps to 0 with a finite gradient."""
    # sqrt of a clamped squared norm
    sq = (x * x).sum(-1, keepdim=True)
    return x / sq.clamp_min(_NORM_FLOOR**2).sqrt()


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Cost between ``x`` [..., N, d] and ``y`` [..., M, d] -> [..., N, M] (no validation)."""
    if metric == "cosine":
        return 1.0 - normalize(x) @ normalize(y).transpose(-1, -2)
    if metric == "chordal":
        x, y = normalize(x), normalize(y)
        p = 2.0
    elif metric == "l2":
        p = 2.0
    elif metric == "l1":
        p = 1.0
    else:  # pragma: no cover - guarded by check_choice
        raise ConfigError(f"{PREFIX}: unknown metric {metric!r}; valid metrics are {METRICS}")
    # Direct differences (no |x|^2 + |y|^2 - 2xy expansion, so coincident points give
    # exactly 0); torch's cdist backward returns a zero (sub)gradient where the distance
    # is 0, so coincident points have a finite gradient.
    return torch.cdist(x, y, p=p, compute_mode="donot_use_mm_for_euclid_dist")


def cost_matrix(zs: torch.Tensor, zt: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Ground-cost matrix ``C`` [B, M] between ``zs`` [B, d] and ``zt`` [M, d].

    ``cosine``: ``1 - cos(zs_i, zt_j)`` in [0, 2]; ``chordal``: ``|zs_i/|zs_i| - zt_j/|zt_j||_2``
    in [0, 2]; ``l2``: ``|zs_i - zt_j|_2`` (not squared); ``l1``: ``|zs_i - zt_j|_1``.
    Norms are clamped at 1e-12 so zero vectors are allowed (cost 1 under ``cosine``);
    all metrics have finite gradients at coincident points and zero vectors.
    """
    check_choice("metric", metric, METRICS)
    zs, zt = check_features(zs, zt)
    return pairwise_cost(zs, zt, metric)
