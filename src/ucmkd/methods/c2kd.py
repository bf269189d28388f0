"""C2KD (Huo et al., "C2KD: Bridging the Modality Gap for Cross-Modal Knowledge Distillation",
CVPR 2024), adapted to a frozen teacher.

What follows C2KD (its paper and the authors' training script):

* proxies: both sides get an extra proxy head; cross-modal knowledge is exchanged between
  the proxies, not between the main heads, and each proxy is tied to its own model by KL;
* bidirectional distillation between the proxies: student proxy <- teacher proxy (teacher
  side detached) and teacher proxy <- student proxy (student side detached);
* on-the-fly selection distillation (OFSD): per sample, the Kendall rank correlation between
  teacher and student non-target logits (target column dropped) must exceed ``krc``
  (default 0, the authors' default); the bidirectional terms are computed on the kept samples
  only, as ``sum over kept / B`` (the authors' ``(mask * kl).mean()``), so they shrink with
  the kept fraction and are exactly 0 (in the graph) when nothing is kept;
* the bidirectional terms are non-target KLs (the authors' ``ntkl``); here the target
  column is removed and the remaining classes renormalised (the script zeroes the target logit
  instead);
* student-side self-alignment in both directions, as in the script: student proxy <- student
  logits (detached: the proxy learns what the student's head knows, so it remains a faithful
  stand-in of the student for the teacher side) and student logits <- student proxy
  (detached: the main head receives the teacher knowledge the proxy absorbed, without the
  head's own output dragging the proxy back in the same term);
* teacher proxy <- teacher logits (detached), as in the script.

What differs because the teacher is frozen here (no gradient, eval mode):

* the teacher network is not updated: C2KD trains it with its own CE and with KL towards
  its proxy; both terms are impossible and dropped. The teacher proxy is therefore a
  trainable Linear head on the frozen teacher features (``extra["teacher_proxy"]``) and is
  trained by CE on the teacher labels ``yt`` (standing in for the teacher's CE), by KL
  towards the teacher's logits, and by the student -> teacher proxy term;
* the proxies are single Linear heads on the pooled features (the script uses 1x1 conv + BN +
  LeakyReLU + Linear on the last feature map);
* one temperature ``T`` for every KL, each scaled by T^2 (the script uses T = 1);
* the OFSD Kendall correlation is computed between the teacher's and the student's main
  logits, on the non-target columns (the authors' script computes it between the proxies'
  outputs over all classes);
* ``weight`` scales the two bidirectional cross-modal terms only; CE and the proxy/self
  alignment terms have weight 1 (as in the script);
* samples are class-matched (or unpaired/paired) teacher items joined by the sampler, not
  the same instance seen by two modalities; the target column dropped is the student label
  ``ys`` on both sides (equal to ``yt`` with class-matched pairing).

Losses: ``ce`` CE(student logits, ys); ``t_proxy_ce`` CE(teacher proxy, yt);
``t_proxy_kl`` KL(teacher proxy <- teacher logits); ``s_proxy_kl`` KL(student proxy <-
student logits); ``s_self_kl`` KL(student logits <- student proxy); ``kd_t2s`` and
``kd_s2t`` the weighted, filtered bidirectional non-target KLs. The fraction of samples kept
by the filter at the last forward is ``self.kept_fraction`` (a detached 0-dim tensor; not a loss).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ranged
from ..errors import ConfigError
from ..losses.c2kd import drop_target, kendall_tau, selected_kl, selection_mask
from .base import DistillOutput, Distiller, register_method


@register_method("c2kd")
class C2KD(Distiller):
    """Proxy-based bidirectional, on-the-fly-selected distillation with a frozen teacher (see
    the module docstring for what follows C2KD and what differs)."""

    @dataclass
    class Params:
        temperature: float = ranged(4.0, 0.0, lo_open=True)   # T of every KL term (each scaled by T^2)
        krc: float = ranged(0.0, hi=1.0)   # keep a sample when Kendall tau > krc; krc <= -1 keeps all
        weight: float = 1.0        # weight of the bidirectional proxy terms kd_t2s, kd_s2t

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        if student.num_classes != teacher.num_classes:
            raise ConfigError(f"c2kd: student ({student.num_classes} classes) and teacher "
                              f"({teacher.num_classes} classes) must share one label space")
        k = student.num_classes
        self.extra["student_proxy"] = nn.Linear(student.feat_dim, k)
        self.extra["teacher_proxy"] = nn.Linear(teacher.feat_dim, k)
        self.kept_fraction = torch.tensor(float("nan"))

    def forward(self, batch):
        zt, t_logits = self.teacher_forward(batch, match=len(batch.xs))
        z, logits = self.student(batch.xs, return_features=True)
        p, ys = self.params, batch.ys
        yt = batch.yt if batch.yt is not None else ys
        s_proxy = self.extra["student_proxy"](z)
        t_proxy = self.extra["teacher_proxy"](zt)
        T = p.temperature

        with torch.no_grad():
            tau = kendall_tau(drop_target(t_logits, ys), drop_target(logits, ys))
            keep = selection_mask(tau, p.krc)
            self.kept_fraction = keep.float().mean().detach()

        return DistillOutput(logits, {
            "ce": F.cross_entropy(logits, ys),
            "t_proxy_ce": F.cross_entropy(t_proxy, yt),
            "t_proxy_kl": selected_kl(t_proxy, t_logits, T),
            "s_proxy_kl": selected_kl(s_proxy, logits.detach(), T),
            "s_self_kl": selected_kl(logits, s_proxy.detach(), T),
            "kd_t2s": p.weight * selected_kl(s_proxy, t_proxy.detach(), T, keep, ys),
            "kd_s2t": p.weight * selected_kl(t_proxy, s_proxy.detach(), T, keep, ys),
        })
