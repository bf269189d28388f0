"""MMD feature matching (kernel two-sample statistic of Gretton et al., JMLR 2012, as a
distribution-level distillation loss, cf. Huang & Wang, "Like What You Like", 2017)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from .. import collectives
from ..errors import ConfigError
from ..losses.mmd import DEFAULT_FACTORS, mmd2
from .base import DistillOutput, Distiller, register_method


@register_method("mmd")
class MMD(Distiller):
    """loss = CE(s, y) + weight * MMD^2(project(z_s), z_t) between the batch of projected
    student features and the teacher batch's features (no pairing used: distribution
    matching). Gaussian kernel mixture with bandwidths ``factor * median`` pairwise squared
    distance of the pooled batch (:func:`ucmkd.losses.mmd.mmd2`). Under data parallelism both
    samples are the global batch's (the student's gathered with its gradient)."""

    projects_features = True

    @dataclass
    class Params:
        weight: float = 1.0
        # sigma^2 = factor * median pairwise squared distance, one Gaussian kernel per factor
        factors: list = field(default_factory=lambda: list(DEFAULT_FACTORS))

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        f = self.params.factors
        if not f or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in f):
            raise ConfigError(f"method 'mmd': factors must be a non-empty list of numbers > 0, got {f!r}")

    def forward(self, batch):
        zt, _ = self.teacher_forward(batch)
        z, logits = self.student(batch.xs, return_features=True)
        p = self.params
        zs_all, zt_all = collectives.gather_with_grad(self.project(z)), collectives.gather(zt.detach())
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys),
                                      "mmd": p.weight * mmd2(zs_all, zt_all, p.factors)})
