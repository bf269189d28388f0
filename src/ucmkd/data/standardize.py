"""Standardisation of a modality's inputs with statistics of its training split.

Modes (``data.standardize``):

- ``per_feature``: one mean and one std per index of axis 1 of the items (a vector's features;
  a signal's or an image's channels), population std (ddof 0, as scikit-learn's
  ``StandardScaler``); a feature that is constant on the training split gets std 1 (it becomes
  ``x - mean``, 0 on the training split, never NaN). Computed by :func:`moments` in float64,
  in chunks of rows, so an array read from disk gives the same statistics as one in memory.
- ``global``: one mean and one std (unbiased, floored at 1e-8) over every value of the training
  split (ucmkd's only mode before per-feature standardisation).
- ``none``: the inputs as float32, unchanged.
- ``auto`` (the default): ``per_feature`` for ``vector`` modalities, ``global`` for ``signal``
  and ``image`` ones (their channels share one scale; pixels and time steps are not features).

The statistics come from the training split only and are applied to every item of the
modality (train, val, test and the unlabelled pool are rows of one array). A run stores them
in ``normalisation.json`` in its directory; :meth:`Standardizer.load` reads them back to
prepare new inputs for the trained student.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..cache import PageRelease
from ..errors import ConfigError, DataError

MODES = ("auto", "per_feature", "global", "none")
NORMALISATION_FILE = "normalisation.json"
#: Rows per chunk of the statistics pass: as many as fit in this many bytes of float32.
CHUNK_BYTES = 8 * 2 ** 20


def resolve_mode(mode: str, kind: str) -> str:
    """The concrete mode (``per_feature``, ``global`` or ``none``) of ``mode`` for ``kind``."""
    if mode not in MODES:
        raise ConfigError(f"data.standardize: unknown value {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        return "per_feature" if kind == "vector" else "global"
    return mode


@dataclass
class Standardizer:
    """``x -> (x - mean) / std`` in float32.

    mode: ``per_feature``, ``global`` or ``none``. mean, std: float32 tensors, 0-d (global,
    none) or ``[F, 1, ...]`` (per_feature: one value per index of axis 1, broadcast over the
    remaining axes of an item of shape ``input_shape``).
    """

    mode: str
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def identity(cls) -> "Standardizer":
        return cls("none", torch.tensor(0.0), torch.tensor(1.0))

    @classmethod
    def per_feature(cls, mean: np.ndarray, std: np.ndarray, input_shape: tuple) -> "Standardizer":
        """From float64 per-feature statistics [F] (F = input_shape[0])."""
        shape = (len(mean),) + (1,) * (len(input_shape) - 1)
        return cls("per_feature", torch.as_tensor(np.asarray(mean, np.float32).reshape(shape)),
                   torch.as_tensor(np.asarray(std, np.float32).reshape(shape)))

    def __call__(self, x, inplace: bool = False) -> torch.Tensor:
        """Standardised float32 copy of ``x`` ([B, *input_shape], array or tensor); with
        ``inplace``, ``x`` (a float32 tensor) itself is standardised and returned (same values)."""
        if inplace:
            return x if self.mode == "none" else x.sub_(self.mean).div_(self.std)
        if self.mode == "none":
            return torch.tensor(np.asarray(x), dtype=torch.float32) if not isinstance(x, torch.Tensor) \
                else x.to(torch.float32, copy=True)
        out = torch.as_tensor(x, dtype=torch.float32) - self.mean
        return out.div_(self.std)          # in place on the new tensor: one copy of x, same values

    # ------------------------------------------------------------------ storage
    def values(self) -> tuple:
        """(mean, std) as floats (0-d) or lists of floats ([F]): exact float32 values."""
        if self.mean.ndim == 0:
            return float(self.mean), float(self.std)
        return self.mean.reshape(-1).tolist(), self.std.reshape(-1).tolist()

    def to_dict(self) -> dict:
        mean, std = self.values()
        return {"mode": self.mode, "mean": mean, "std": std}

    @classmethod
    def from_dict(cls, d: dict, input_shape: tuple, where: str = "normalisation") -> "Standardizer":
        """Inverse of :meth:`to_dict` for items of shape ``input_shape``."""
        try:
            mode, mean, std = d["mode"], d["mean"], d["std"]
        except (KeyError, TypeError):
            raise DataError(f"{where}: expected a mapping with mode, mean and std, got {d!r}") from None
        if mode not in MODES[1:]:
            raise DataError(f"{where}: unknown mode {mode!r}")
        if mode == "per_feature":
            if len(mean) != input_shape[0] or len(std) != input_shape[0]:
                raise DataError(f"{where}: {len(mean)} means and {len(std)} stds for {input_shape[0]} features")
            return cls.per_feature(np.asarray(mean), np.asarray(std), input_shape)
        return cls(mode, torch.tensor(float(mean), dtype=torch.float32), torch.tensor(float(std), dtype=torch.float32))

    @classmethod
    def load(cls, run_dir: str | Path, role: str = "student") -> "Standardizer":
        """The standardisation a run applied to its ``role`` (``student``/``teacher``) inputs,
        read from ``<run_dir>/normalisation.json``: apply it to new raw inputs before the
        trained model sees them."""
        path = Path(run_dir) / NORMALISATION_FILE
        if not path.is_file():
            raise DataError(f"{path}: not found (written by ucmkd.run in a run directory)")
        try:
            entry = json.loads(path.read_text())[role]
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable ({e})") from None
        except KeyError:
            raise DataError(f"{path}: no entry for {role!r}") from None
        if entry is None:
            raise DataError(f"{path}: the run has no {role} modality")
        return cls.from_dict(entry, tuple(entry["input_shape"]), where=f"{path} [{role}]")


# --------------------------------------------------------------------------- statistics
def chunk_rows(shape: tuple, max_bytes: Optional[int] = None) -> int:
    """Rows of an array of ``shape`` [N, ...] that fit in ``max_bytes`` (default
    :data:`CHUNK_BYTES`) as float32 (at least 1)."""
    max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
    return max(1, int(max_bytes // (4 * max(1, math.prod(shape[1:])))))


def moments(x, rows: np.ndarray, per_feature: bool, check_finite: bool = False,
            where: str = "") -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and sum of squared deviations of the rows ``rows`` of ``x`` ([N, ...]: an array, a
    memory map or a tensor).

    Read in chunks of :func:`chunk_rows` consecutive rows (only one chunk is in memory, as
    float64), combined exactly in float64 (Chan et al.'s pairwise update of count, mean and sum
    of squared deviations). The chunks depend only on ``x``'s shape, so an array in memory and
    the same array memory-mapped give bit-identical statistics. ``per_feature``: one value per
    index of axis 1 (reducing every other axis), else scalars. ``check_finite``: every row (not
    only ``rows``) is checked, a DataError names the first item with NaN or inf.

    Returns (mean, m2, n): float64 arrays of shape [F] (0-d without ``per_feature``) and the
    number of values behind each.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    n_rows = x.shape[0]
    mask = np.zeros(n_rows, dtype=bool)
    mask[np.asarray(rows, dtype=np.int64)] = True
    step = chunk_rows(x.shape)
    f = x.shape[1] if per_feature else 1
    count, mean, m2 = 0, np.zeros(f), np.zeros(f)
    release = PageRelease(x)
    for a in range(0, n_rows, step):
        block = np.array(x[a:a + step], dtype=np.float32)
        release.add(block.nbytes)
        if check_finite and not np.isfinite(block).all():
            bad = a + int(np.nonzero(~np.isfinite(block.reshape(len(block), -1)).all(1))[0][0])
            raise DataError(f"{where}: inputs contain NaN or inf (item {bad})")
        sel = mask[a:a + step]
        if not sel.any():
            continue
        c = block[sel].astype(np.float64)
        c = np.moveaxis(c, 1, 0).reshape(f, -1) if per_feature else c.reshape(1, -1)
        k = c.shape[1]
        cm = c.mean(axis=1)
        cm2 = ((c - cm[:, None]) ** 2).sum(axis=1)
        total = count + k
        delta = cm - mean
        mean = mean + delta * (k / total)
        m2 = m2 + cm2 + delta ** 2 * (count * k / total)
        count = total
    return (mean, m2, count) if per_feature else (mean[0], m2[0], count)


def fit(x, train: np.ndarray, mode: str, input_shape: tuple, check_finite: bool = False,
        where: str = "") -> Standardizer:
    """The :class:`Standardizer` of ``mode`` (resolved) fitted on rows ``train`` of ``x`` by the
    streaming pass (:func:`moments`). ``global`` here is the float64 streaming version (for
    arrays read lazily; in memory, :func:`ucmkd.data.base.finalize` keeps the float32 torch
    reduction, so that earlier numbers stay bit-identical)."""
    train = np.asarray(train, dtype=np.int64)
    if mode == "none":
        if check_finite:
            moments(x, train[:0], per_feature=False, check_finite=True, where=where)
        return Standardizer.identity()
    per_feature = mode == "per_feature"
    mean, m2, n = moments(x, train, per_feature, check_finite=check_finite, where=where)
    ddof = 0 if per_feature else 1
    if n <= ddof:
        raise DataError(f"{where}: {n} training values are too few for standardisation statistics")
    std = np.sqrt(m2 / (n - ddof))
    if per_feature:
        constant = (std == 0) | (std <= 1e-12 * np.abs(mean))
        return Standardizer.per_feature(mean, np.where(constant, 1.0, std), input_shape)
    return Standardizer("global", torch.tensor(mean, dtype=torch.float32),
                        torch.tensor(std, dtype=torch.float32).clamp_min(1e-8))


def global_in_memory(x: torch.Tensor, train: torch.Tensor) -> Standardizer:
    """``global`` statistics of an in-memory float32 tensor as ucmkd has always computed them
    (torch's float32 mean and unbiased std over ``x[train]``, std floored at 1e-8), reduced on
    one thread: a float32 reduction split over several threads rounds differently, and the
    standardised data (hence its content fingerprint, the cached teacher and every run key)
    would depend on the machine's thread count. One thread is what every grid worker uses."""
    tr = x[train]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Standardizer("global", tr.mean(), tr.std().clamp_min(1e-8))
    finally:
        torch.set_num_threads(threads)


def normalisation_entry(data) -> Optional[dict]:
    """What ``normalisation.json`` stores for a modality (None for None)."""
    if data is None:
        return None
    return {"name": data.name, "kind": data.kind, "input_shape": list(data.input_shape),
            **data.standardizer.to_dict()}


__all__ = ["MODES", "Standardizer", "resolve_mode", "moments", "fit", "chunk_rows", "global_in_memory",
           "normalisation_entry", "NORMALISATION_FILE"]
