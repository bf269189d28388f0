"""Frozen-teacher outputs, computed once and reused.

A frozen teacher in eval mode maps each teacher item to the same features and logits for the
whole run, so :class:`TeacherOutputs` computes them once for every item of the teacher
modality's training split (the only items the pairing sampler draws) and serves batches by
item index (``Batch.it``). Tables are memoised per process under a content key (the teacher's
weights and buffers, the teacher data's fingerprint and the device), so the cells of a
grid that share a teacher share one table, and a changed teacher or changed data can never be
served from a stale table. Teacher batches that the sampler augments or shifts carry no
indices and are forwarded live (see :meth:`ucmkd.methods.Distiller.teacher_forward`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from ..cache import content_key, state_digest
from ..data.base import ModalityData
from ..data.lazy import batch_rows
from ..models import Classifier

_MEMO: "OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_MEMO_SIZE = 4     # tables kept per process (a grid worker runs many cells of a few teachers)


class TeacherOutputs:
    """Features [N, d_t] and logits [N, K] of ``teacher`` on the training items of ``data``
    (N = all items of the modality; rows outside the training split are never served).

    The table is built on first use, on ``device``, in eval mode and without gradient, in
    chunks of ``batch_size`` items (fewer for large items, :func:`ucmkd.data.lazy.batch_rows`; a
    lazily read modality is read one chunk at a time). ``get(it)`` returns the rows of item
    indices ``it`` [B'].
    """

    def __init__(self, teacher: Classifier, data: ModalityData, device="cpu", batch_size: int = 1024):
        self.teacher, self.data, self.device, self.batch_size = teacher, data, torch.device(device), batch_size
        self._table: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._served: Optional[torch.Tensor] = None    # [N] bool: rows computed (training split)

    def key(self) -> str:
        """Content key: the teacher's weights and buffers, the teacher data's fingerprint
        (:attr:`ModalityData.fingerprint`), the device."""
        return content_key({"teacher": state_digest(self.teacher.state_dict()), "data": self.data.fingerprint,
                            "device": str(self.device)}, n=24)

    @torch.no_grad()
    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.key()
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
        was = self.teacher.training
        self.teacher.eval()
        idx = self.data.splits["train"]
        n = len(self.data.y)
        feats = torch.zeros(n, self.teacher.feat_dim, device=self.device)
        logits = torch.zeros(n, self.teacher.num_classes, device=self.device)
        step = batch_rows(tuple(self.data.x.shape), self.batch_size)   # a lazy modality: one chunk read at a time
        for i in range(0, len(idx), step):
            rows = idx[i:i + step]
            z, lg = self.teacher(self.data.x[rows].to(self.device), return_features=True)
            feats[rows.to(self.device)] = z.float()
            logits[rows.to(self.device)] = lg.float()
        self.teacher.train(was)
        _MEMO[key] = (feats, logits)
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
        return feats, logits

    def get(self, it: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B', d_t], logits [B', K]) of teacher items ``it`` [B'] (int64)."""
        if self._table is None:
            self._table = self._build()
            served = torch.zeros(len(self.data.y), dtype=torch.bool)
            served[self.data.splits["train"]] = True
            self._served = served
        it_cpu = it.cpu()
        if not bool(self._served[it_cpu].all()):
            bad = int(it_cpu[~self._served[it_cpu]][0])
            raise IndexError(f"teacher outputs: item {bad} of {self.data.name!r} is not in its training split")
        it = it.to(self.device)
        feats, logits = self._table
        return feats[it], logits[it]


def clear_memo() -> None:
    """Drop every memoised table (tests; or to free device memory)."""
    _MEMO.clear()


__all__ = ["TeacherOutputs", "clear_memo"]
