"""Augmentation policies: a weak and a strong transform per input kind, on whole batches.

A :class:`Policy` maps a batch ``x`` [B, ...] (on any device) and a ``torch.Generator`` on that
device to an augmented batch of the same shape and dtype; every random number comes from the
generator (none from the global RNG), so a run repeats its augmentations exactly, resumed or
not (the trainer derives each batch's generator from the run seed, epoch and step:
:meth:`ucmkd.data.PairingSampler.epoch` sets ``Batch.seed``). Ops are vectorised over the
batch (per-item parameters, no Python loop over items).

Built-in policies (:data:`AUGMENTATIONS`, keyed by augmentation kind), chosen a priori from the
published recipes, with magnitudes in the units of standardised inputs (0 = the training mean):

- ``image`` [B, C, H, W] (FixMatch, Sohn et al. 2020). weak: random translation by up to 12.5 %
  of each side (1 px on 8x8), reflect-padded (no flip: digits are not mirror-symmetric).
  strong: weak, then a tensor RandAugment (each of rotation <= 30 deg, shear <= 0.3, translation
  <= 30 %, contrast factor U(0.05, 0.95) (RandAugment's range), brightness shift U(-0.5, 0.5)
  std, Gaussian noise of std U(0, 0.3); each applied to an item with probability 2/6, so 2 ops on average, magnitudes uniform per
  item as in FixMatch's RandAugment), then Cutout of a square of side U(0, 0.5) x size.
- ``signal`` [B, C, L] (time series: jitter/scaling of TS-TCC, Eldele et al. 2021; time warping
  of Um et al. 2017). weak: circular shift by up to 12.5 % of L and amplitude scaling U(0.9, 1.1).
  strong: weak, then time stretch by U(0.8, 1.25), Gaussian jitter (std 0.1) and one masked
  segment of up to 25 % of L (Cutout's 1-D analogue).
- ``spectrogram`` [B, C, F, T] (SpecAugment, Park et al. 2019, as FixMatch-style audio SSL uses
  it). weak: circular time shift by up to 12.5 % of T. strong: weak, then two frequency masks of
  up to F/4 bins and two time masks of up to 20 % of T (SpecAugment's LD policy, scaled to our
  F and T), and Gaussian noise (std 0.1).
- ``vector`` [B, D] (tabular: VIME, Yoon et al. 2020; SCARF, Bahri et al. 2022). weak: Gaussian
  noise (std 0.1). strong: SCARF corruption of each feature with probability 0.3 (VIME's p_m)
  by the same feature of a random other item of the batch (the batch's empirical marginal),
  then the weak noise.

A dataset declares its augmentation kind with ``RawModality.augment`` (e.g. the spoken-digit
spectrograms: ``spectrogram``; default: its layout ``kind``); a plugin registers its own
policy with :func:`register_augmentation` and names it there or in ``augment.policy``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError
from .registry import Registry

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
LEVELS = ("none", "weak", "strong")


@dataclass(frozen=True)
class Policy:
    """weak, strong: ``f(x [B, ...], gen) -> [B, ...]`` (same shape, dtype and device);
    ``ndim``: the input rank the policy expects (checked, so a wrong kind fails with its name)."""

    name: str
    ndim: int
    weak: Transform
    strong: Transform

    def apply(self, level: str, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x`` [B, ...] under ``level`` (none | weak | strong)."""
        if level == "none":
            return x
        if level not in ("weak", "strong"):
            raise ConfigError(f"augmentation level {level!r}: choose one of {', '.join(LEVELS)}")
        if x.dim() != self.ndim:
            raise DataError(f"augmentation policy {self.name!r} expects inputs of rank {self.ndim}, "
                            f"got {list(x.shape)}")
        if len(x) == 0:
            return x
        out = (self.weak if level == "weak" else self.strong)(x, gen)
        if out.shape != x.shape:
            raise DataError(f"augmentation policy {self.name!r} ({level}) changed the shape "
                            f"{list(x.shape)} -> {list(out.shape)}")
        return out


AUGMENTATIONS: Registry[Policy] = Registry("augmentation policy")


def register_augmentation(name: str, ndim: int):
    """Decorator for ``make() -> (weak, strong)``: registers ``Policy(name, ndim, weak, strong)``."""

    def deco(make):
        weak, strong = make()
        AUGMENTATIONS.register(name)(Policy(name, ndim, weak, strong))
        return make

    return deco


def get_policy(name: str) -> Policy:
    """The registered policy ``name``; an unknown name is a ConfigError listing the known ones."""
    return AUGMENTATIONS.get(name)


def batch_generator(seed: int, stream: int, device) -> torch.Generator:
    """A generator on ``device`` seeded from (``seed``, ``stream``): independent streams (labelled
    items, a method's views) of one batch."""
    s = int(np.random.SeedSequence([int(seed) % 2 ** 63, int(stream)]).generate_state(2, np.uint64)[0] >> 1)
    return torch.Generator(device=torch.device(device)).manual_seed(s)


# --------------------------------------------------------------------------- primitives
def _u(gen: torch.Generator, n: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
    """[n] uniform in [lo, hi) in ``like``'s dtype and device."""
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=like.device, dtype=like.dtype)


def _coin(gen: torch.Generator, n: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """[n] bool, each True with probability p."""
    return torch.rand(n, generator=gen, device=like.device) < p


def _bshape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-item values [B] broadcast against x [B, ...]."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def _ints(gen: torch.Generator, n: int, lo: int, hi: int, device) -> torch.Tensor:
    """[n] int64 uniform in [lo, hi] (inclusive)."""
    return torch.randint(lo, hi + 1, (n,), generator=gen, device=device)


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] shifted by integer (dy, dx) [B] each, reflect-padded (|d| < side)."""
    b, c, h, w = x.shape
    p = int(max(dy.abs().max(), dx.abs().max(), 0))
    if p == 0:
        return x
    xp = F.pad(x, (p, p, p, p), mode="reflect" if p < min(h, w) else "replicate")
    rows = (torch.arange(h, device=x.device)[None, :] + p - dy[:, None])          # [B, H]
    cols = (torch.arange(w, device=x.device)[None, :] + p - dx[:, None])          # [B, W]
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]           # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def roll(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x [B, ..., L] circularly shifted along the last axis by ``shift`` [B] (int64)."""
    n = x.shape[-1]
    idx = (torch.arange(n, device=x.device)[None, :] - shift[:, None]) % n                # [B, L]
    idx = idx.view(x.shape[0], *([1] * (x.dim() - 2)), n).expand_as(x)
    return torch.gather(x, -1, idx)


def affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] resampled (bilinear, border padding) under per-item affine maps theta
    [B, 2, 3] of normalised output -> input coordinates (``F.affine_grid``)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def band_mask(n: int, length: int, max_width: int, gen: torch.Generator, device) -> torch.Tensor:
    """[n, length] bool: one band per row of width U{0..max_width} at a uniform start."""
    width = _ints(gen, n, 0, max(0, max_width), device)
    start = (torch.rand(n, generator=gen, device=device) * (length - width + 1).clamp(min=1)).long()
    pos = torch.arange(length, device=device)[None, :]
    return (pos >= start[:, None]) & (pos < (start + width)[:, None])


# --------------------------------------------------------------------------- images
def image_weak(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    _, _, h, w = x.shape
    my, mx = max(1, round(0.125 * h)), max(1, round(0.125 * w))
    return translate(x, _ints(gen, len(x), -my, my, x.device), _ints(gen, len(x), -mx, mx, x.device))


def _rand_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Tensor RandAugment: 6 ops, each applied to an item with probability 2/6 (magnitudes uniform)."""
    b = len(x)
    p = 2.0 / 6.0
    eye = torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(b, 2, 3).clone()
    # rotation, shear, translation: one affine map per item (identity where the op is off)
    ang = _u(gen, b, -30.0, 30.0, x) * math.pi / 180 * _coin(gen, b, p, x)
    shx = _u(gen, b, -0.3, 0.3, x) * _coin(gen, b, p, x)
    tr = _u(gen, b, -0.3, 0.3, x) * 2 * _coin(gen, b, p, x)       # x2: normalised coordinates span 2
    axis = _coin(gen, b, 0.5, x)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = eye
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin + shx, sin, cos
    theta[:, 0, 2], theta[:, 1, 2] = torch.where(axis, tr, 0.0), torch.where(axis, 0.0, tr)
    x = affine(x, theta)
    # contrast: towards / away from the item's mean; brightness: additive (standardised units)
    c = torch.where(_coin(gen, b, p, x), _u(gen, b, 0.05, 0.95, x), 1.0)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + _bshape(c, x) * (x - mean)
    br = torch.where(_coin(gen, b, p, x), _u(gen, b, -0.5, 0.5, x), 0.0)
    x = x + _bshape(br, x)
    sd = torch.where(_coin(gen, b, p, x), _u(gen, b, 0.0, 0.3, x), 0.0)
    return x + _bshape(sd, x) * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def cutout(x: torch.Tensor, gen: torch.Generator, max_frac: float = 0.5) -> torch.Tensor:
    """x [B, C, H, W] with a square of side U(0, max_frac) x min(H, W) per item set to 0 (the
    standardised mean), centred uniformly (clipped at the border, as in Cutout)."""
    b, _, h, w = x.shape
    side = (_u(gen, b, 0.0, max_frac, x) * min(h, w)).round()
    cy, cx = _u(gen, b, 0.0, h, x), _u(gen, b, 0.0, w, x)
    ys = torch.arange(h, device=x.device, dtype=x.dtype)[None, :] + 0.5
    xs = torch.arange(w, device=x.device, dtype=x.dtype)[None, :] + 0.5
    my = (ys - cy[:, None]).abs() < side[:, None] / 2
    mx = (xs - cx[:, None]).abs() < side[:, None] / 2
    hole = (my[:, :, None] & mx[:, None, :]) & (side > 0)[:, None, None]
    return x.masked_fill(hole[:, None], 0.0)


def image_strong(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return cutout(_rand_augment(image_weak(x, gen), gen), gen)


@register_augmentation("image", ndim=4)
def _image():
    return image_weak, image_strong


# --------------------------------------------------------------------------- 1-D signals
def signal_weak(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    m = max(1, round(0.125 * x.shape[-1]))
    x = roll(x, _ints(gen, len(x), -m, m, x.device))
    return x * _bshape(_u(gen, len(x), 0.9, 1.1, x), x)


def signal_strong(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b, _, n = x.shape
    x = signal_weak(x, gen)
    scale = torch.exp(_u(gen, b, math.log(0.8), math.log(1.25), x))     # stretch factor per item
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = 1.0 / scale, 1.0
    x = affine(x[:, :, None, :], theta)[:, :, 0, :]
    x = x + 0.1 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    seg = band_mask(b, n, int(0.25 * n), gen, x.device)
    return x.masked_fill(seg[:, None, :], 0.0)


@register_augmentation("signal", ndim=3)
def _signal():
    return signal_weak, signal_strong


# --------------------------------------------------------------------------- spectrograms
def spectrogram_weak(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    m = max(1, round(0.125 * x.shape[-1]))
    return roll(x, _ints(gen, len(x), -m, m, x.device))


def spectrogram_strong(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b, _, nf, nt = x.shape
    x = spectrogram_weak(x, gen)
    fmask = band_mask(b, nf, nf // 4, gen, x.device) | band_mask(b, nf, nf // 4, gen, x.device)
    tmask = band_mask(b, nt, int(0.2 * nt), gen, x.device) | band_mask(b, nt, int(0.2 * nt), gen, x.device)
    x = x.masked_fill(fmask[:, None, :, None] | tmask[:, None, None, :], 0.0)
    return x + 0.1 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


@register_augmentation("spectrogram", ndim=4)
def _spectrogram():
    return spectrogram_weak, spectrogram_strong


# --------------------------------------------------------------------------- vectors / tabular
def vector_weak(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x + 0.1 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def vector_strong(x: torch.Tensor, gen: torch.Generator, rate: float = 0.3) -> torch.Tensor:
    b, d = x.shape
    corrupt = torch.rand(x.shape, generator=gen, device=x.device) < rate
    donor = torch.randint(0, b, (b, d), generator=gen, device=x.device)       # a random item per feature
    x = torch.where(corrupt, torch.gather(x, 0, donor), x)
    return vector_weak(x, gen)


@register_augmentation("vector", ndim=2)
def _vector():
    return vector_weak, vector_strong


# --------------------------------------------------------------------------- run-level settings
def resolve_policy(augment_kind: str, override: Optional[str] = None) -> Policy:
    """The policy of a modality whose augmentation kind is ``augment_kind``, or the one named by
    ``override`` (``augment.policy``)."""
    name = override or augment_kind
    if name not in AUGMENTATIONS:
        where = "augment.policy" if override else "the student modality's augmentation kind"
        raise ConfigError(f"{where}: no augmentation policy {name!r}; known: {', '.join(AUGMENTATIONS.names())} "
                          f"(register one with ucmkd.augment.register_augmentation)")
    return AUGMENTATIONS.get(name)


__all__ = ["AUGMENTATIONS", "LEVELS", "Policy", "batch_generator", "get_policy", "register_augmentation",
           "resolve_policy"]
