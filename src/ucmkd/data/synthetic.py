"""Synthetic two-view benchmark with a known true pairing.

One latent draw z_i = mu_{y_i} + N(0, I) per item i feeds both views:
- view A (``synthetic/a``): a near-linear map of z plus small noise, [N, dim_a];
- view B (``synthetic/b``): a warped (sin/tanh) map of z, rotated, plus noise and
  ``distractors`` pure-noise dimensions, [N, dim_b + distractors].
Item i of A and item i of B share ``pair_id = i`` (the TRUE pairs a paired oracle may use).
Gap knobs: ``noise``, ``nonlinearity``, ``distractors`` in :class:`~ucmkd.config.SyntheticConfig`.
"""
from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache

import numpy as np

from ..config import DataConfig, SyntheticConfig
from ..errors import DataError
from .base import RawModality, register_dataset


@lru_cache(maxsize=8)
def _views(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if cfg.n_items < 2 * cfg.num_classes or cfg.num_classes < 2:
        raise DataError(f"data.synthetic: need num_classes >= 2 and n_items >= 2*num_classes, "
                        f"got n_items={cfg.n_items}, num_classes={cfg.num_classes}")
    for name in ("noise", "nonlinearity", "noise_a", "class_sep"):
        if getattr(cfg, name) < 0:
            raise DataError(f"data.synthetic.{name} must be >= 0, got {getattr(cfg, name)}")
    rng = np.random.default_rng(cfg.seed)
    k, m = cfg.num_classes, cfg.latent_dim
    means = rng.normal(size=(k, m)) * cfg.class_sep / np.sqrt(2.0)
    y = np.arange(cfg.n_items) % k
    rng.shuffle(y)
    z = means[y] + rng.normal(size=(cfg.n_items, m))
    # view A: near-linear
    wa = rng.normal(size=(m, cfg.dim_a)) / np.sqrt(m)
    a = z @ wa + cfg.noise_a * rng.normal(size=(cfg.n_items, cfg.dim_a))
    # view B: warped, rotated, noisy, with distractors
    wb = rng.normal(size=(m, cfg.dim_b)) / np.sqrt(m)
    u = z @ wb
    nl = cfg.nonlinearity
    warped = u + nl * (np.sin(2.0 * u) + np.tanh(u) * np.abs(u))
    rot, _ = np.linalg.qr(rng.normal(size=(cfg.dim_b, cfg.dim_b)))
    b = warped @ rot
    b = b / b.std() + cfg.noise * rng.normal(size=b.shape)
    if cfg.distractors > 0:
        b = np.concatenate([b, rng.normal(size=(cfg.n_items, cfg.distractors))], axis=1)
    return a.astype(np.float32), b.astype(np.float32), y.astype(np.int64)


def _classes(cfg: SyntheticConfig) -> list:
    return [f"c{i}" for i in range(cfg.num_classes)]


@register_dataset("synthetic/a", reads=("synthetic",))
def synthetic_a(cfg: DataConfig) -> RawModality:
    a, _, y = _views(cfg.synthetic)
    return RawModality(x=a, y=y, classes=_classes(cfg.synthetic), kind="vector",
                       pair_id=np.arange(len(y)), source="synthetic/a",
                       fingerprint={"synthetic": asdict(cfg.synthetic)})


@register_dataset("synthetic/b", reads=("synthetic",))
def synthetic_b(cfg: DataConfig) -> RawModality:
    _, b, y = _views(cfg.synthetic)
    return RawModality(x=b, y=y, classes=_classes(cfg.synthetic), kind="vector",
                       pair_id=np.arange(len(y)), source="synthetic/b",
                       fingerprint={"synthetic": asdict(cfg.synthetic)})
