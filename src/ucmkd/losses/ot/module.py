"""The feature-alignment loss as an ``nn.Module``."""
from __future__ import annotations

import torch

from .dispatch import _check_config, solve_sample
from .result import OTResult


class FeatureAlignmentLoss(torch.nn.Module):
    """FA loss module: ``forward(zs [B, d], zt [M, d]) -> <P, C>`` (0-dim tensor).

    The teacher features are detached, so only the student receives gradients.
    Arguments are those of :func:`sinkhorn_cost` and are validated at construction.
    :meth:`solve` returns the whole :class:`OTResult` (plan, iterations, plan entropy).
    """

    def __init__(
        self,
        metric: str = "cosine",
        eps: float = 0.1,
        n_iter: int = 100,
        backend: str = "torch",
        grad: str = "autodiff",
    ) -> None:
        super().__init__()
        _check_config(metric, eps, n_iter, backend, grad)
        self.metric = metric
        self.eps = float(eps)
        self.n_iter = n_iter
        self.backend = backend
        self.grad = grad

    def solve(self, zs: torch.Tensor, zt: torch.Tensor, extra_cost: torch.Tensor | None = None) -> OTResult:
        """The solve behind :meth:`forward` (``extra_cost`` [B, M] as in :func:`sinkhorn_cost`)."""
        if isinstance(zt, torch.Tensor):
            zt = zt.detach()
        return solve_sample(zs, zt, metric=self.metric, eps=self.eps, n_iter=self.n_iter,
                            backend=self.backend, grad=self.grad, extra_cost=extra_cost)

    def forward(self, zs: torch.Tensor, zt: torch.Tensor, extra_cost: torch.Tensor | None = None) -> torch.Tensor:
        return self.solve(zs, zt, extra_cost).value

    def extra_repr(self) -> str:
        return (
            f"metric={self.metric!r}, eps={self.eps}, n_iter={self.n_iter}, "
            f"backend={self.backend!r}, grad={self.grad!r}"
        )
