"""Two tabular views of one latent class structure, generated offline (no bundled datasets).

A latent class structure comes from scikit-learn's ``make_classification`` generator
(``latent_dim`` informative dimensions, ``clusters_per_class`` Gaussian clusters per class on
the vertices of a hypercube of side ``2 * class_sep``, ``flip_y`` label noise). Item i of both
views shares its latent h_i (``pair_id = i``), as two kinds of records about one entity would:

- ``tabular/a`` (``features_a`` columns): the kind of table a strong model does well on —
  linear mixtures of h (half the columns), redundant combinations of those, ordinal
  (integer-rounded) mixtures, and a few pure-noise columns;
- ``tabular/b`` (``features_b`` columns): a harder record of the same entity — nonlinear
  transforms of random projections of h (softplus, |.|, signed log, products), binary
  indicators of thresholds, Gaussian observation noise of std ``noise`` and pure-noise columns.

With ``unscaled: true`` every column of both views is multiplied by 10^U(-3, 3) and shifted by
an offset of its own scale, as raw tabular features in mixed units are (a spread of six orders
of magnitude); the label structure is unchanged.
"""
from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache

import numpy as np

from ..config import DataConfig, TabularConfig
from ..errors import DataError
from .base import RawModality, register_dataset


def _mix(rng, h: np.ndarray, n_out: int) -> np.ndarray:
    w = rng.normal(size=(h.shape[1], n_out)) / np.sqrt(h.shape[1])
    return h @ w


@lru_cache(maxsize=8)
def _views(cfg: TabularConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    if cfg.n_items < 4 * cfg.num_classes * cfg.clusters_per_class:
        raise DataError(f"data.tabular: n_items={cfg.n_items} is too small for {cfg.num_classes} classes x "
                        f"{cfg.clusters_per_class} clusters (need >= 4 items per cluster)")
    if cfg.num_classes * cfg.clusters_per_class > 2 ** cfg.latent_dim:
        raise DataError(f"data.tabular: num_classes * clusters_per_class = "
                        f"{cfg.num_classes * cfg.clusters_per_class} exceeds 2^latent_dim = {2 ** cfg.latent_dim}")
    h, y = make_classification(n_samples=cfg.n_items, n_features=cfg.latent_dim, n_informative=cfg.latent_dim,
                               n_redundant=0, n_repeated=0, n_classes=cfg.num_classes,
                               n_clusters_per_class=cfg.clusters_per_class, class_sep=cfg.class_sep,
                               flip_y=cfg.flip_y, shuffle=True, random_state=cfg.seed)
    rng = np.random.default_rng([cfg.seed, 77])
    n = cfg.n_items
    # view A: linear mixtures, redundant combinations of them, ordinal columns, noise columns
    n_lin = cfg.features_a // 2
    n_red = cfg.features_a // 6
    n_ord = cfg.features_a // 6
    n_noise_a = cfg.features_a - n_lin - n_red - n_ord
    lin = _mix(rng, h, n_lin) + 0.1 * rng.normal(size=(n, n_lin))
    red = _mix(rng, lin, n_red)
    ordinal = np.round(2.0 * _mix(rng, h, n_ord))
    a = np.concatenate([lin, red, ordinal, rng.normal(size=(n, n_noise_a))], axis=1)
    # view B: nonlinear transforms, products, binary indicators, observation noise, noise columns
    n_nl = cfg.features_b // 2
    n_bin = cfg.features_b // 8
    n_prod = cfg.features_b // 8
    n_noise_b = cfg.features_b - n_nl - n_bin - n_prod
    u = _mix(rng, h, n_nl)
    kinds = np.arange(n_nl) % 3
    nl = np.where(kinds == 0, np.logaddexp(0.0, 2.0 * u), np.where(kinds == 1, np.abs(u), np.sign(u) * np.log1p(np.abs(3 * u))))
    nl = nl + cfg.noise * rng.normal(size=nl.shape)
    v = _mix(rng, h, 2 * n_prod)
    prod = v[:, :n_prod] * v[:, n_prod:] + cfg.noise * rng.normal(size=(n, n_prod))
    binary = (_mix(rng, h, n_bin) + cfg.noise * rng.normal(size=(n, n_bin)) > 0).astype(np.float64)
    b = np.concatenate([nl, prod, binary, rng.normal(size=(n, n_noise_b))], axis=1)
    order_a, order_b = rng.permutation(a.shape[1]), rng.permutation(b.shape[1])
    a, b = a[:, order_a], b[:, order_b]
    if cfg.unscaled:
        for x in (a, b):
            scale = 10.0 ** rng.uniform(-3.0, 3.0, size=x.shape[1])
            x *= scale
            x += scale * rng.normal(scale=10.0, size=x.shape[1])
    return a.astype(np.float32), b.astype(np.float32), y.astype(np.int64)


def _raw(cfg: DataConfig, view: int, name: str) -> RawModality:
    x = _views(cfg.tabular)[view]
    y = _views(cfg.tabular)[2]
    return RawModality(x=x, y=y, classes=[f"c{i}" for i in range(cfg.tabular.num_classes)], kind="vector",
                       pair_id=np.arange(len(y)), source=name, fingerprint={"tabular": asdict(cfg.tabular)})


@register_dataset("tabular/a", reads=("tabular",))
def tabular_a(cfg: DataConfig) -> RawModality:
    return _raw(cfg, 0, "tabular/a")


@register_dataset("tabular/b", reads=("tabular",))
def tabular_b(cfg: DataConfig) -> RawModality:
    return _raw(cfg, 1, "tabular/b")
