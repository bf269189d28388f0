"""ReviewKD (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021), cross-modal.

ReviewKD distils multi-stage feature maps: the student's stage maps are fused from deep to
shallow by attention-based fusion (ABF) modules, each producing a map with the matched
teacher stage's channel count, and every output is compared with the teacher's stage map by
the hierarchical context loss (HCL, :mod:`ucmkd.losses.reviewkd`).

Cross-modal adaptation (student and teacher maps may be 1-D signal maps [B, C, L] and 2-D
image maps [B, C, H, W], of different sizes and in different numbers):

* stages are paired from the deepest down: the last ``n = min(n_s, n_t)`` stages of each
  encoder, student stage ``n_s - n + i`` with teacher stage ``n_t - n + i``;
* the ABFs work in the student's own dimensionality (Conv1d/BatchNorm1d for 1-D student maps,
  Conv2d/BatchNorm2d for 2-D) and at the student's own resolution; the residual from the
  deeper stage is resized (nearest) to the current student stage. Unlike the original, the
  ABF output is NOT interpolated to the teacher's spatial size (there may be no common
  layout); HCL compares pooled summaries instead (full-resolution term only when kind and
  shape agree; see :mod:`ucmkd.losses.reviewkd`);
* the pairing is class-matched (or unpaired/paired as configured): HCL compares each student
  item's maps with the maps of the teacher item the sampler joined with it; no true pairs
  are assumed;
* stages only: the original's extra "stage" made of the pooled embedding is not used.

Encoders without spatial stage maps (the ``mlp`` backbone's [B, C] stages, pooled pretrained
adapters, or encoders lacking ``forward_stages``) are rejected at construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ranged
from ..errors import ConfigError, DataError
from ..losses.reviewkd import hcl
from ..models import Encoder
from .base import DistillOutput, Distiller, register_method


class ABF(nn.Module):
    """Attention-based fusion in ``dims`` (1 or 2) spatial dimensions.

    ``forward(x [B, C_in, *S], residual [B, mid, *S'] or None) -> (out [B, C_out, *S],
    fused [B, mid, *S])``: ``x`` is reduced to ``mid`` channels by a 1x1 conv + BN; with a
    residual (from the deeper stage, resized to ``S`` by nearest interpolation) a 2-channel
    sigmoid attention map computed from their concatenation weights the two; a 3x3 conv + BN
    maps the fused map to ``C_out`` (the teacher stage's channels). ``fused`` is passed on
    to the next (shallower) ABF.
    """

    def __init__(self, dims: int, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.reduce = nn.Sequential(conv(in_channels, mid_channels, 1, bias=False), bn(mid_channels))
        self.out = nn.Sequential(conv(mid_channels, out_channels, 3, padding=1, bias=False), bn(out_channels))
        self.att = nn.Sequential(conv(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_uniform_(m.weight, a=1)   # as ReviewKD initialises its ABFs

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        x = self.reduce(x)
        if self.att is not None:
            if residual is None:
                raise ValueError("ABF: a fusing ABF needs the residual of the deeper stage")
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            w = self.att(torch.cat([x, residual], dim=1))
            x = x * w[:, 0:1] + residual * w[:, 1:2]
        return self.out(x), x


@torch.no_grad()
def probe_stages(model, role: str, method: str = "reviewkd", label: str = "ReviewKD") -> list[tuple[int, ...]]:
    """Stage-map shapes (without the batch dim) of ``model``'s encoder on a zero input, checked
    to be spatial ([C, L] or [C, H, W]); a :class:`ConfigError` otherwise."""
    enc = model.encoder
    what = f"{role} {getattr(model, 'name', type(model).__name__)!r} (input {list(model.input_shape)})"
    need = f"{label} needs multi-stage feature maps (cnn1d/cnn2d backbones)"
    if not callable(getattr(enc, "forward_stages", None)):
        raise ConfigError(f"{method}: {what} has an encoder ({type(enc).__name__}) without "
                          f"forward_stages; {need}")
    param = next(model.parameters(), None)
    x = torch.zeros(2, *model.input_shape, device=param.device if param is not None else "cpu")
    was = model.training
    model.eval()
    try:
        shapes = [tuple(m.shape[1:]) for m in enc.forward_stages(x)]
    finally:
        model.train(was)
    if not shapes or any(len(s) not in (2, 3) for s in shapes):
        got = ", ".join(f"[B, {', '.join(map(str, s))}]" for s in shapes) or "none"
        hint = " (vector stages, e.g. the 'mlp' backbone)" if shapes and all(len(s) == 1 for s in shapes) else ""
        raise ConfigError(f"{method}: {what} has stage outputs {got}{hint}; {need}, "
                          f"i.e. spatial maps [B, C, L] or [B, C, H, W]")
    return shapes


@register_method("reviewkd")
class ReviewKD(Distiller):
    """loss = CE(s, y) + warm * weight * HCL(ABF(student stages), teacher stages), with
    ``warm = min(1, progress / warmup)`` (linear ramp over the first ``warmup`` fraction of
    training; ``progress`` is set per epoch, so the ramp moves per epoch and the first epoch,
    at progress 0, trains on CE alone when ``warmup > 0``). The ABFs live in
    ``extra["abf"]`` (deepest first). Cross-modal design: see the module docstring.
    """

    @dataclass
    class Params:
        weight: float = 1.0        # weight of the HCL term (ReviewKD's CIFAR default 1.0)
        mid_channels: int = ranged(32, 1)   # ABF fusion width
        warmup: float = ranged(0.1, 0.0)   # fraction of training over which the HCL weight ramps 0 -> 1

    def __init__(self, student, teacher, params=None):
        super().__init__(student, teacher, params)
        p = self.params
        s_shapes = probe_stages(student, "student")
        t_shapes = probe_stages(teacher, "teacher")
        self.n_pairs = n = min(len(s_shapes), len(t_shapes))
        s_used, t_used = s_shapes[len(s_shapes) - n:], t_shapes[len(t_shapes) - n:]
        if len({len(s) for s in s_used}) != 1:
            raise ConfigError(f"reviewkd: student stage maps mix 1-D and 2-D layouts {s_used}")
        dims = len(s_used[0]) - 1
        # deepest first: abf[0] takes the deepest student stage and has nothing to fuse
        self.extra["abf"] = nn.ModuleList(
            ABF(dims, s[0], p.mid_channels, t[0], fuse=i > 0)
            for i, (s, t) in enumerate(zip(reversed(s_used), reversed(t_used))))

    def warm(self) -> float:
        w = self.params.warmup
        return 1.0 if w <= 0 else min(1.0, self.progress / w)

    def student_stages(self, xs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(stage maps shallow -> deep, logits [B, K]) with one encoder pass when possible."""
        self.student.check_input(xs)
        enc = self.student.encoder
        maps = enc.forward_stages(xs)
        z = enc.embed(maps[-1]) if isinstance(enc, Encoder) else enc(xs)
        return maps, self.student.head(z)

    def review(self, s_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """ABF outputs for the last ``n_pairs`` student maps, returned shallow -> deep."""
        used = s_maps[len(s_maps) - self.n_pairs:]
        outs, residual = [], None
        for abf, x in zip(self.extra["abf"], reversed(used)):
            out, residual = abf(x, residual)
            outs.append(out)
        return outs[::-1]

    def forward(self, batch):
        if batch.xt is None:
            raise ConfigError("method 'reviewkd' needs a teacher batch; the sampler gave none")
        s_maps, logits = self.student_stages(batch.xs)
        with torch.no_grad():
            self.teacher.check_input(batch.xt)
            t_maps = self.teacher.encoder.forward_stages(batch.xt)
        if t_maps[-1].shape[0] != logits.shape[0]:
            raise DataError(f"reviewkd: teacher batch of {t_maps[-1].shape[0]} items must match the "
                            f"student batch of {logits.shape[0]} item for item")
        t_used = t_maps[len(t_maps) - self.n_pairs:]
        loss = hcl(self.review(s_maps), t_used)
        return DistillOutput(logits, {"ce": F.cross_entropy(logits, batch.ys),
                                      "hcl": self.warm() * self.params.weight * loss})
