"""The paper's two alignment quantities, measured (student error <= teacher error + FA + LA).

- ``fa``: entropic OT cost between the student's (projected) feature cloud on its split and
  the teacher's feature cloud on the teacher modality's split: feature alignment.
- ``fa_classwise``: the same, class by class, averaged over classes (how far each class's
  student features lie from the teacher's features of the same class).
- ``teacher_head_acc``: accuracy of the frozen teacher head on student features; high values
  mean the teacher's decision rule transfers to the student's representation.
- ``la_tv``: mean total-variation distance between the teacher head's and the student head's
  class distributions on student features (label alignment; 0 = identical predictions).
All computed without gradients on at most ``max_items`` items per modality (read in chunks
from a lazily read modality).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .data.base import ModalityData
from .data.lazy import batch_rows
from .losses.ot import sinkhorn_cost
from .models import Classifier


def _subsample(data: ModalityData, split: str, max_items: int, seed: int) -> torch.Tensor:
    idx = data.splits[split].numpy()
    if len(idx) > max_items:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_items, replace=False))
    return torch.as_tensor(idx)


def _chunked(fn, data: ModalityData, idx: torch.Tensor, device) -> tuple:
    """``fn`` (returning a tuple of [n, ...] tensors) on the items ``idx`` of ``data``, read in
    chunks (:func:`ucmkd.data.lazy.batch_rows`; one chunk for small items), outputs concatenated."""
    step = batch_rows(tuple(data.x.shape), max(1, len(idx)))
    parts = [fn(data.x[idx[i:i + step]].to(device)) for i in range(0, len(idx), step)]
    return tuple(torch.cat(p) for p in zip(*parts))


@torch.no_grad()
def alignment_diagnostics(student: Classifier, teacher: Classifier, student_data: ModalityData,
                          teacher_data: ModalityData, projector: Optional[torch.nn.Module] = None,
                          split: str = "val", metric: str = "cosine", eps: float = 0.1, n_iter: int = 100,
                          max_items: int = 512, seed: int = 0, device="cpu") -> dict:
    """Return ``{fa, fa_classwise, teacher_head_acc, la_tv, student_acc}`` (floats; NaN where
    undefined, e.g. FA when feature dims differ and no projector is given)."""
    was_s = student.training
    student.eval()
    teacher.to(device).eval()
    si = _subsample(student_data, split, max_items, seed)
    ti = _subsample(teacher_data, split, max_items, seed + 1)
    ys, yt = student_data.y[si].to(device), teacher_data.y[ti].to(device)
    z, s_logits = _chunked(lambda x: student(x, return_features=True), student_data, si, device)
    if projector is not None:
        z = projector(z)
    (zt,) = _chunked(lambda x: (teacher.features(x),), teacher_data, ti, device)
    out = {"student_acc": float((s_logits.argmax(1) == ys).float().mean())}
    if z.shape[1] != zt.shape[1]:
        out.update(fa=math.nan, fa_classwise=math.nan, teacher_head_acc=math.nan, la_tv=math.nan)
    else:
        out["fa"] = float(sinkhorn_cost(z, zt, metric=metric, eps=eps, n_iter=n_iter, backend="torch"))
        per_class = [float(sinkhorn_cost(z[ys == c], zt[yt == c], metric=metric, eps=eps, n_iter=n_iter,
                                         backend="torch"))
                     for c in range(student_data.num_classes) if (ys == c).any() and (yt == c).any()]
        out["fa_classwise"] = float(np.mean(per_class)) if per_class else math.nan
        t_logits = teacher.head(z)
        out["teacher_head_acc"] = float((t_logits.argmax(1) == ys).float().mean())
        out["la_tv"] = float(0.5 * (t_logits.softmax(1) - s_logits.softmax(1)).abs().sum(1).mean())
    student.train(was_s)
    return out
