"""``ucmkd``: the library's default unpaired cross-modal distiller.

It keeps the paper's decomposition (student error <= teacher error + feature alignment (FA)
+ label alignment (LA)) but makes each term use what an unpaired setting does share, the
classes, and adds the student's own unlabelled data. See ``docs/method.md`` for the evidence.

Per batch (labelled student items x_l with labels y, unlabelled student items x_u, teacher
items x_t with their labels y_t, never paired with the student's):

- ``ce``: CE(h_S(z_l), y).
- ``kd`` (LA on the student head): decoupled KD (TCKD + beta * NCKD) towards the logits of a
  random teacher item *of the same class* from the teacher batch (the teacher's running class
  mean, :class:`ClassPrototypes`, when the batch has none): the teacher's class-similarity
  structure, which needs no pairs (``kd_target: mean`` always uses the class mean).
- ``la`` (LA through the teacher head, with the sign that makes it agree with the labels):
  CE(h_T(P z_l), y), h_T frozen, P the projector (identity when dims match).
- ``fa`` (label-aware FA): entropic OT between P z_l and teacher features with ground cost
  cos + lam * [y_i != y_t,j], so mass moves within classes only (the paper's FA is label-blind).
- unlabelled items: pseudo-labels from the student head averaged with the teacher head on
  P z_u, aligned to the teacher's class prior, kept when their confidence reaches tau; they get
  the CE (``pl``) and the same class-level KD and teacher-head terms (``kd_u``, ``la_u``),
  weighted by the confident fraction. After every epoch tau is recalibrated on the labelled
  validation split: the lowest grid value whose confident predictions are >= ``precision``
  correct (none: the unlabelled terms pause).
- with ``consistency``, the pseudo-labels come from a weak view of each unlabelled item and
  train its strong view (the student modality's augmentation policy, :mod:`ucmkd.augment`), as
  FixMatch does, but voted by the teacher head, prior-aligned and calibrated as above;
  ``labelled_aug`` augments the student's labelled items (stream 2 of the batch's generator;
  ``auto``, the default: the weak policy for a convolutional student, none for an MLP);
  the CE shadow trains on them as given (plain CE, unless ``augment.labelled`` augments every
  method's), so the gate can fall back to plain CE where augmentation hurts.
- a validation-gated fallback: a plain-CE shadow of the student, trained on the same
  labelled batches; the trainer keeps whichever validates better.
All distillation and unlabelled weights ramp 0 -> 1 over ``warmup`` (a fraction of training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import LEVELS
from .. import collectives
from ..config import ranged
from ..errors import ConfigError, DataError
from ..losses.dkd import dkd_terms
from ..losses.kd import kd_kl
from ..losses.prototypes import ClassPrototypes
from ..losses.semi import PriorAlignment, confident_targets, masked_ce, ramp
from .base import DistillOutput, Distiller, register_method
from .fallback import FallbackParams
from .fa_only import OTParams, make_fa, ot_metrics
from .pseudo_label import SemiParams, split_forward


def is_convolutional(model: nn.Module) -> bool:
    """Whether ``model`` holds a convolution (1-, 2- or 3-D): an encoder built to be equivariant
    to the shifts the weak policies apply (:mod:`ucmkd.augment`). An MLP on raw samples or pixels
    is not, and is hurt by them (docs/method.md, "Augmentation and consistency")."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


@register_method("ucmkd")
class UCMKD(Distiller):
    """CE + class-level DKD + teacher-head CE + label-aware OT + teacher-guided pseudo-labels,
    with a validation-gated CE fallback (module docstring). Every ingredient has its own
    switch, so each can be removed in an ablation."""

    projects_features = True
    uses_unlabelled = True
    requires_unlabelled = False     # fully labelled data: the unlabelled terms are skipped

    @dataclass
    class Params(SemiParams, OTParams, FallbackParams):
        threshold: float = ranged(0.5, 0.0, 1.0)   # lowest pseudo-label confidence the calibration may choose
        grad: str = "envelope"      # OT gradient with the plan held fixed (docs/ot.md): ucmkd's design choice
        w_kd: float = ranged(1.0, 0.0)   # class-level decoupled KD on the student head
        kd_alpha: float = ranged(1.0, 0.0)   # TCKD weight inside the KD term
        kd_beta: float = ranged(2.0, 0.0)   # NCKD weight inside the KD term (8 in DKD's paper; 2 chosen on validation seeds)
        temperature: float = ranged(4.0, 0.0, lo_open=True)
        kd_loss: str = "dkd"        # dkd: kd_alpha * TCKD + kd_beta * NCKD | kl: Hinton's T^2 KL
        kd_target: str = "item"     # item: a same-class teacher item of the batch | mean: class-mean logits
        w_la: float = ranged(1.0, 0.0)   # CE of the frozen teacher head on (projected) student features
        w_fa: float = ranged(1.0, 0.0)   # label-aware OT between student and teacher features
        label_cost: float = ranged(1.0, 0.0)   # OT cost added across classes (cosine cost is in [0, 2])
        unlabelled: bool = True     # use the student's unlabelled items (pseudo-labels)
        teacher_vote: bool = True   # pseudo-labels average the student and teacher heads
        fallback: bool = True       # validation-gated fallback to a plain-CE shadow (ucmkd.engine.shadow: gate_z, retire_*)
        momentum: float = ranged(0.99, 0.0, 1.0, hi_open=True)   # teacher class-mean EMA (per item)
        align_prior: bool = True    # pseudo-label probabilities aligned to the teacher's class prior
        precision: float = ranged(0.95, 0.0, 1.0)   # > 0: threshold recalibrated each epoch to reach this validation precision
        calib_items: int = ranged(1024, 1)   # validation items the per-epoch calibration looks at (a fixed sample)
        u_forward: str = "separate"  # separate: own forward (own batch-norm statistics) for the unlabelled items | joint: one
        consistency: bool = False   # pseudo-labels from a weak view of each unlabelled item train its strong view (FixMatch-style)
        labelled_aug: str = "auto"  # augmentation of the student's labelled items (not the CE shadow's): auto (weak for a convolutional student, else none) | none | weak | strong (docs/method.md, "Augmentation")

        CHOICES: ClassVar[dict] = {"u_forward": ("separate", "joint"), "kd_loss": ("dkd", "kl"),
                                   "kd_target": ("item", "mean"), "labelled_aug": ("auto",) + LEVELS}

    @classmethod
    def teacher_free(cls, params) -> bool:
        """True when every teacher term is off (KD, teacher head, OT, the teacher vote): what
        remains uses only the teacher modality's labels (the class prior), never the teacher."""
        return params.w_kd == 0 and params.w_la == 0 and params.w_fa == 0 and not params.teacher_vote

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        p = self.params
        self.fa = make_fa(p)
        self.extra["protos"] = ClassPrototypes(teacher.num_classes, teacher.feat_dim, p.momentum)
        self.extra["prior"] = PriorAlignment(teacher.num_classes)
        self.uses_unlabelled = p.unlabelled
        self.labelled_aug = p.labelled_aug if p.labelled_aug != "auto" else (
            "weak" if is_convolutional(student) else "none")
        if p.consistency and p.u_forward == "joint":
            raise ConfigError("method 'ucmkd': method.params.consistency needs u_forward: separate (the weak view "
                              "is forwarded without gradient, the strong view with it)")
        # the student's labelled items are augmented here, not by the trainer, so that the CE
        # shadow keeps training on them as given: the gate then falls back to plain CE where
        # augmentation hurts (e.g. a user's MLP on images over a short schedule)
        self.uses_augmentation = self.labelled_aug != "none" or (p.unlabelled and p.consistency)
        if self.input_kind is not None:      # built on a student that knows its kind: policy for the views
            self.set_augmentation(self.input_kind)

    # ----------------------------------------------------------------- validation calibration
    @torch.no_grad()
    def _pseudo_probs(self, logits_u, zpu, update: bool = True):
        p = self.params
        probs = logits_u.softmax(1)
        if p.teacher_vote:
            probs = 0.5 * (probs + self.teacher.head(zpu).softmax(1))
        # data parallelism: the global unlabelled batch's probabilities, so that the prior's
        # running mean sees the batch one process sees (identity in one process)
        probs = collectives.gather(probs)
        if p.align_prior:
            probs = self.extra["prior"].align(probs, self.extra["protos"].count, update=update)
        return probs

    @torch.no_grad()
    def calibrate(self, x_val, y_val) -> dict:
        """Set the pseudo-label threshold to the lowest grid value whose confident validation
        predictions reach ``precision`` (with at least 5 % of items confident); none: the
        unlabelled terms pause for the next epoch (threshold > 1). Looks at a fixed sample of at
        most ``calib_items`` validation items, so its cost does not grow with the data."""
        p = self.params
        if not (p.unlabelled and p.precision > 0):
            return {}
        keep = torch.arange(len(y_val))
        if len(y_val) > p.calib_items:
            keep = torch.randperm(len(y_val), generator=torch.Generator().manual_seed(len(y_val)))[:p.calib_items]
            keep = keep.sort().values
        was = self.student.training
        self.student.eval()
        device = next(self.student.parameters()).device
        probs = []
        for i in range(0, len(keep), 256):     # 256 items at a time (x_val may be read lazily)
            z, logits = self.student(x_val[keep[i:i + 256]].to(device), return_features=True)
            probs.append(self._pseudo_probs(logits, self.project(z), update=False).cpu())
        self.student.train(was)
        conf, pred = torch.cat(probs).max(1)
        correct = (pred == y_val[keep].cpu()).float()
        tau = 2.0
        for t in sorted({p.threshold, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99}):
            sel = conf >= t
            if t >= p.threshold and sel.float().mean() >= 0.05 and correct[sel].mean() >= p.precision:
                tau = t
                break
        self.extra["prior"].threshold.fill_(tau)
        return {"pl_threshold": tau}

    # ----------------------------------------------------------------- terms
    def _class_targets(self, y: torch.Tensor, yt: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        """Teacher logits [B, K] for student labels y [B]: a random teacher item of the same
        class from the teacher batch (yt [M], t_logits [M, K]) when ``kd_target='item'`` and
        one is there, else the teacher's running class mean."""
        target = self.extra["protos"].logits[y].clone()
        if self.params.kd_target == "item":
            same = (y[:, None] == yt[None, :]).float()                      # [B, M]
            has = same.sum(1) > 0
            if has.any():
                pick = torch.multinomial(same[has], 1).squeeze(1)
                target[has] = t_logits[pick]
        return target

    def _class_kd(self, logits: torch.Tensor, y: torch.Tensor, t_target: torch.Tensor) -> torch.Tensor:
        """KD of logits [B, K] towards teacher logits t_target [B, K] for classes y [B]: decoupled
        (``kd_loss: dkd``, alpha * TCKD + beta * NCKD) or Hinton's T^2 KL (``kd_loss: kl``)."""
        p = self.params
        known = self.extra["protos"].known(y)
        if not known.any():
            return logits.sum() * 0.0
        if p.kd_loss == "kl":
            return kd_kl(logits[known], t_target[known], p.temperature) * known.float().mean()
        tckd, nckd = dkd_terms(logits[known], t_target[known], y[known], p.temperature)
        return (p.kd_alpha * tckd + p.kd_beta * nckd) * known.float().mean()

    def _teacher_terms(self, logits, zp, y, t_target, weight: float = 1.0) -> dict:
        p = self.params
        out = {}
        if p.w_kd > 0:
            out["kd"] = p.w_kd * weight * self._class_kd(logits, y, t_target)
        if p.w_la > 0:
            out["la"] = p.w_la * weight * F.cross_entropy(self.teacher.head(zp), y)
        return out

    def forward(self, batch):
        p = self.params
        if batch.yt is None:
            raise DataError("method 'ucmkd' needs the teacher items' labels (batch.yt is None)")
        zt, t_logits = self.teacher_forward(batch)
        # data parallelism: the teacher items and the labels of the GLOBAL batch, for the
        # batch-level terms (class means, same-class teacher picks, OT); identity in one process
        zt, t_logits, yt, ys = collectives.gather(zt, t_logits, batch.yt, batch.ys)
        self.extra["protos"].update(zt, t_logits, yt)
        tau = float(self.extra["prior"].threshold) if p.precision > 0 else p.threshold
        # while the calibration pauses the unlabelled terms (tau >= 1: no threshold reaches the
        # wanted precision yet) the unlabelled items are not forwarded at all: they would only
        # shift the batch-norm statistics of the labelled forward (and cost a forward)
        use_u = p.unlabelled and batch.xu is not None and not (p.precision > 0 and tau >= 1.0)
        if batch.xu is not None:
            self.student.check_input(batch.xu)   # a mis-shaped pool is named even while paused
        zw = logits_w = None
        # the trainer already augmented xs when the run augments every method's labelled items
        # (augment.labelled): then not a second time here
        own = self.labelled_aug if self.labelled_level == "none" else "none"
        xs = batch.xs if own == "none" else self.augment(batch.xs, own, self.augment_generator(batch, 2))
        if use_u and p.u_forward == "joint":
            z, logits, zu, logits_u = split_forward(self.student, xs, batch.xu)
        else:
            z, logits = self.student(xs, return_features=True)
            if use_u and p.consistency:
                # a weak view labels (no gradient), the strong view of the same items learns
                gen = self.augment_generator(batch, 1)
                xw, xstrong = self.augment(batch.xu, "weak", gen), self.augment(batch.xu, "strong", gen)
                with torch.no_grad():
                    zw, logits_w = self.student(xw, return_features=True)
                zu, logits_u = self.student(xstrong, return_features=True)
            elif use_u:
                zu, logits_u = self.student(batch.xu, return_features=True)
        w = ramp(self.progress, p.warmup)
        zp = self.project(z)
        losses = {"ce": F.cross_entropy(logits, batch.ys)}
        # targets drawn for the global batch on every rank (the same draw), then this rank's rows
        target = collectives.local_rows(self._class_targets(ys, yt, t_logits))
        losses.update({k: w * v for k, v in self._teacher_terms(logits, zp, batch.ys, target).items()})
        metrics = {}
        if p.w_fa > 0:
            cross = (ys[:, None] != yt[None, :]).to(zp.dtype) * p.label_cost
            fa = self.fa.solve(zp, zt, extra_cost=cross)
            losses["fa"] = w * p.w_fa * fa.value
            metrics.update(ot_metrics(self, fa))
        if use_u:
            zpu = self.project(zu)
            if logits_w is None:
                probs = self._pseudo_probs(logits_u, zpu)
            else:
                with torch.no_grad():
                    probs = self._pseudo_probs(logits_w, self.project(zw))
            yhat_all, mask_all = confident_targets(probs, min(tau, 1.0))      # global batch
            yhat, mask = collectives.local_rows(yhat_all), collectives.local_rows(mask_all)
            wu = w * p.w_u
            losses["pl"] = wu * masked_ce(logits_u, yhat, mask)
            if mask_all.any():     # every rank draws the global targets (keeps the draws in step)
                target_u = collectives.local_masked_rows(self._class_targets(yhat_all[mask_all], yt, t_logits),
                                                         mask_all)
            if mask.any():
                frac = float(mask.float().mean())
                for k, v in self._teacher_terms(logits_u[mask], zpu[mask], yhat[mask], target_u, frac).items():
                    losses[f"{k}_u"] = wu * v
            metrics["pl_mask"] = float(mask.float().mean())
        elif p.unlabelled:
            metrics["pl_mask"] = 0.0
        return DistillOutput(logits, losses, metrics)
