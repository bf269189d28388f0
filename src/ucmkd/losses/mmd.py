"""Maximum mean discrepancy (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012) with a
mixture of Gaussian kernels whose bandwidths follow the median heuristic."""
from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
_MEDIAN_FLOOR = 1e-12   # a batch of identical points has median distance 0: keep sigma^2 > 0


def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``|a_i - b_j|^2``: a [n, d], b [m, d] -> [n, m].

    Direct differences (no ``|a|^2 + |b|^2 - 2ab`` expansion): exact zeros for coincident
    points, never negative, finite gradient everywhere.
    """
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


def _median_offdiag(d2: torch.Tensor) -> torch.Tensor:
    n = d2.shape[0]
    if n < 2:
        return d2.new_tensor(_MEDIAN_FLOOR)
    i, j = torch.triu_indices(n, n, offset=1, device=d2.device)
    return torch.quantile(d2.detach()[i, j], 0.5).clamp_min(_MEDIAN_FLOOR)


def median_sq_dist(z: torch.Tensor) -> torch.Tensor:
    """Median of the off-diagonal pairwise squared distances of z [n, d] (detached), 0-dim;
    floored at 1e-12. An even count takes the mean of the two middle values (as ``np.median``);
    a single point gives the floor."""
    return _median_offdiag(sq_dists(z.detach(), z.detach()))


def mmd2(x: torch.Tensor, y: torch.Tensor, factors: Sequence[float] = DEFAULT_FACTORS) -> torch.Tensor:
    """Biased (V-statistic) squared MMD between samples x [n, d] and y [m, d], a 0-dim tensor:

        MMD^2 = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j)

    with ``k(a, b) = mean_f exp(-|a - b|^2 / (2 sigma_f^2))`` (kernel values in (0, 1]) and
    ``sigma_f^2 = factor_f * median`` of the off-diagonal pairwise squared distances of the
    pooled sample [x; y] (detached: the bandwidth is not optimised). Gradients flow into both
    x and y; detach y for a fixed target. ``mmd2(x, x) == 0``; the value is >= 0 up to rounding.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd2: x {list(x.shape)} and y {list(y.shape)} must be [n, d] and [m, d]")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"mmd2: empty sample (x {list(x.shape)}, y {list(y.shape)})")
    factors = [float(f) for f in factors]
    if not factors or any(not f > 0 for f in factors):
        raise ValueError(f"mmd2: factors must be a non-empty list of numbers > 0, got {factors}")
    n = x.shape[0]
    z = torch.cat([x, y], dim=0)
    d2 = sq_dists(z, z)
    med = _median_offdiag(d2)
    k = sum(torch.exp(-d2 / (2.0 * f * med)) for f in factors) / len(factors)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()
