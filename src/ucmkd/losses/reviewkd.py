"""ReviewKD's hierarchical context loss (HCL; Chen et al., "Distilling Knowledge via Knowledge
Review", CVPR 2021), generalised to stage maps of different kinds and sizes.

A stage map is ``[B, C, L]`` (1-D, e.g. a signal CNN) or ``[B, C, H, W]`` (2-D, e.g. an image
CNN). HCL compares a (student, teacher) pair of maps with the same ``C`` through a pyramid of
terms, each an element-wise MSE (mean over all entries):

* the full-resolution term ``MSE(fs, ft)``, only when both maps have the same kind and the
  same spatial shape;
* one term per pooling level ``l`` in ``levels`` (default (4, 2, 1)): adaptive average
  pooling of both maps to ``l`` bins per spatial dimension (``l x l`` for 2-D maps, ``l`` for
  1-D maps). When the two maps are of different kinds, their spatial positions are first
  flattened to ``[B, C, S]`` and both are pooled to ``l`` bins along ``S``.

Which levels are used: a level ``l`` is kept when ``l < E``, with ``E`` the largest spatial
extent of the two maps (so at least one side is genuinely summarised; with identical shapes
this is ReviewKD's ``if l >= h: continue``). Without a full-resolution term the coarsest
level 1 is always kept, so a pair always has at least one term. Where ``l`` exceeds one side's
extent, adaptive pooling resamples that side up (nearest-style), the counterpart of
ReviewKD's nearest interpolation of the student map to the teacher's size.

Weights: the terms, in order (full resolution first, then ``levels`` in the given order),
get weights 1, 1/2, 1/4, ..., and the pair loss is their weighted sum divided by the sum of
the weights (ReviewKD's ``cnt /= 2; tot += cnt; loss / tot``). :func:`hcl` sums the pair
losses over stage pairs, as ReviewKD does.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

LEVELS = (4, 2, 1)


def _spatial(x: torch.Tensor) -> tuple:
    if x.dim() not in (3, 4):
        raise ValueError(f"hcl: stage maps must be [B, C, L] or [B, C, H, W], got {list(x.shape)}")
    return tuple(x.shape[2:])


def _pool(x: torch.Tensor, level: int) -> torch.Tensor:
    """Adaptive average pool of a [B, C, L] or [B, C, H, W] map to ``level`` bins per dim."""
    if x.dim() == 3:
        return F.adaptive_avg_pool1d(x, level)
    return F.adaptive_avg_pool2d(x, (level, level))


def hcl_terms(fs: torch.Tensor, ft: torch.Tensor, levels: Sequence[int] = LEVELS) -> list[tuple]:
    """The HCL pyramid of one pair as ``[(name, weight, mse), ...]`` (unnormalised weights).

    fs: student map [B, C, *Ss] (after the ABF, so C equals the teacher's); ft: teacher map
    [B, C, *St]; each spatial part is (L,) or (H, W). ``name`` is ``"full"`` or ``"l{level}"``.
    """
    ss, st = _spatial(fs), _spatial(ft)
    if fs.shape[:2] != ft.shape[:2]:
        raise ValueError(f"hcl: student map {list(fs.shape)} and teacher map {list(ft.shape)} "
                         f"must share batch size and channels")
    ft = ft.detach()
    same_kind = len(ss) == len(st)
    if not same_kind:   # 1-D vs 2-D: compare pooled summaries of the flattened positions
        fs, ft = fs.flatten(2), ft.flatten(2)
    extent = max(max(fs.shape[2:]), max(ft.shape[2:]))
    terms = []
    full = same_kind and ss == st
    if full:
        terms.append(("full", F.mse_loss(fs, ft)))
    use = [lv for lv in levels if lv < extent]
    if not full and 1 not in use:
        use.append(1)
    for lv in use:
        terms.append((f"l{lv}", F.mse_loss(_pool(fs, lv), _pool(ft, lv))))
    return [(name, 0.5 ** i, v) for i, (name, v) in enumerate(terms)]


def hcl_pair(fs: torch.Tensor, ft: torch.Tensor, levels: Sequence[int] = LEVELS) -> torch.Tensor:
    """HCL of one (student, teacher) stage pair, 0-dim: sum_i w_i mse_i / sum_i w_i (see the
    module docstring). fs [B, C, *Ss], ft [B, C, *St] (ft is detached)."""
    terms = hcl_terms(fs, ft, levels)
    return sum(w * v for _, w, v in terms) / sum(w for _, w, _ in terms)


def hcl(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
        levels: Sequence[int] = LEVELS) -> torch.Tensor:
    """Hierarchical context loss summed over aligned stage pairs, 0-dim.

    student_maps[i]: [B, C_i, *S_i] (student side, channel-matched to the teacher);
    teacher_maps[i]: [B, C_i, *T_i]; both lists in the same stage order.
    """
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(f"hcl: need the same non-zero number of student and teacher maps, got "
                         f"{len(student_maps)} and {len(teacher_maps)}")
    return sum(hcl_pair(fs, ft, levels) for fs, ft in zip(student_maps, teacher_maps))
