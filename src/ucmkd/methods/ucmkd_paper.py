"""The paper's two algorithms, reproduced as its authors' scripts compute them.

- ``ucmkd-joint`` ("sumall"): loss = CE + w_fa * FA + w_la * LA.
- ``ucmkd-bilevel``: the paper's main algorithm. Its losses are defined here and handed to the
  generic ``bilevel`` training strategy (:mod:`ucmkd.engine.strategies`) through its hooks.

The per-dataset settings of the authors' scripts are the recipes ``paper-ave``,
``paper-cremad`` and ``paper-ravdess`` (docs/reproduction.md). Both methods use the autodiff
gradient of the transport cost <P, C> by default (``grad: autodiff``, as the scripts do);
``grad: detach`` gives the gradient of the regularised objective <P, C> - eps H(P) instead
(the envelope theorem), which is not the paper's gradient: no recipe selects it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import collectives
from ..losses.numerics import at_least_fp32
from .bilevel import InnerAdamW
from ..errors import ConfigError
from ..losses.label_alignment import label_alignment
from .base import DistillOutput, Distiller, register_method
from .fa_only import FAOnly, OTParams, make_fa, ot_metrics


@register_method("ucmkd-joint")
class UCMKDJoint(FAOnly):
    """CE + w_fa * OT(project(f_S(x_b)), f_T(x_a)) + w_la * LA(h_S(z), h_T(z), y)."""

    @dataclass
    class Params(FAOnly.Params):
        w_la: float = 1.0
        # True: LA's teacher-head term passes its gradient into the student features (the
        # CREMA-D and RAVDESS scripts); False: the teacher head runs without gradient, so LA's
        # gradient is the CE term's alone (the AVE script, recipe paper-ave)
        la_teacher_grad: bool = True

    def forward(self, batch):
        logits, zp, losses, metrics = self.feature_terms(batch)
        t_head = self.teacher.head(zp)   # frozen head; gradient flows into zp unless la_teacher_grad is off
        losses["la"] = self.params.w_la * label_alignment(logits, t_head, batch.ys,
                                                          teacher_grad=self.params.la_teacher_grad)
        return DistillOutput(logits, losses, metrics)


@register_method("ucmkd-bilevel")
class UCMKDBilevel(Distiller):
    """Bilevel UCMKD. Per batch, from theta' = theta with a fresh AdamW(inner_lr, inner_wd):
    n1 steps on FA(project(f_S(x_b; theta')), f_T(x_a)); n2 steps on the head only
    (CE with label smoothing on detached features); the outer CE at theta' gives theta its
    gradient (first order); batch-norm statistics come from the forwards at theta'.

    Where the student's feature width differs from the teacher's, a projector maps it to the
    teacher's width; the outer loss does not reach it, so it is trained by the inner FA steps
    and keeps their update (``bilevel_persistent``). The authors' scripts have no projector:
    they truncate the normalised features to the smaller width.

    Logged per step: ``inner_fa`` (<P, C> at the last FA step), ``inner_head_ce`` (the head
    step's CE, whose gradient it takes), ``inner_head_la`` (= inner_head_ce - mean(kappa_y *
    CE(h_T(z), y)), the value the scripts log as their LA loss: the kappa term is computed
    without gradient, so it changes the value, not the step; it is dropped, as in the scripts,
    where the widths differ) and ``outer_ce``; with :attr:`~.base.Distiller.step_diagnostics`, the
    last FA step's solve (``ot/fa/iterations``, ``ot/fa/plan_entropy``). ``forward`` (evaluation
    only) returns the outer CE at theta.
    """

    projects_features = True

    strategy = "bilevel"

    @dataclass
    class Params(OTParams):
        inner_lr: float = 5e-5        # lr of the inner AdamW (fresh every batch)
        inner_wd: float = 0.05        # its decoupled weight decay
        n1: int = 1                   # inner feature-alignment steps
        n2: int = 1                   # inner head steps
        label_smoothing: float = 0.1  # of the inner head CE and the outer CE (RAVDESS script; AVE, CREMA-D: 0)

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        self.fa = make_fa(self.params)
        if self.params.n1 < 0 or self.params.n2 < 0:
            raise ConfigError(f"method.params: n1 and n2 must be >= 0, got {self.params.n1}, {self.params.n2}")

    def ce(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy with the method's label smoothing, on logits [B, K] in float32 or wider."""
        return F.cross_entropy(at_least_fp32(logits), y, label_smoothing=self.params.label_smoothing, reduction=reduction)

    def forward(self, batch):
        logits = self.student(batch.xs)
        return DistillOutput(logits, {"outer_ce": self.ce(logits, batch.ys)})

    # -- hooks of the bilevel strategy (ucmkd.engine.strategies.BilevelHooks) -------------
    def bilevel_parameters(self) -> list[str]:
        trainable = {id(q) for q in self.trainable_parameters()}
        return [n for n, q in self.named_parameters() if id(q) in trainable]

    def bilevel_optimizer(self) -> InnerAdamW:
        return InnerAdamW(lr=self.params.inner_lr, weight_decay=self.params.inner_wd)

    def bilevel_stages(self) -> list[tuple[str, int]]:
        return [("fa", self.params.n1), ("head", self.params.n2)]

    def bilevel_inner_loss(self, stage: str, batch, cache: dict):
        if stage == "fa":
            if "zt" not in cache:     # the global batch's teacher features (FullPrecisionFA)
                cache["zt"] = collectives.gather(self.teacher_forward(batch)[0])
            fa = self.fa.solve(self.project(self.student.features(batch.xs)), cache["zt"])
            return fa.value, {"inner_fa": fa.value, **ot_metrics(self, fa)}
        if stage == "head":
            with torch.no_grad():
                z = self.student.features(batch.xs)
            ce = self.ce(self.student.head(z), batch.ys)
            return ce, {"inner_head_ce": ce, "inner_head_la": ce.detach() - self._kappa_term(z, batch.ys)}
        raise ConfigError(f"{self.name}: unknown inner stage {stage!r}")

    def bilevel_outer_loss(self, batch, cache: dict):
        ce = self.ce(self.student(batch.xs), batch.ys)
        return ce, {"outer_ce": ce}

    def bilevel_persistent(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith("extra.projector.")]

    @torch.no_grad()
    def _kappa_term(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """mean_i kappa_i CE(h_T(z_i), y_i), kappa_i = softmax(h_T(z_i))[y_i] (no gradient); 0
        where the widths differ (the scripts then drop the term)."""
        if "projector" in self.extra:
            return torch.zeros((), device=z.device)
        t_logits = at_least_fp32(self.teacher.head(z))
        kappa = t_logits.softmax(1).gather(1, y[:, None]).squeeze(1)
        return (kappa * self.ce(t_logits, y, reduction="none")).mean()
