"""Bring-your-own data: a ``.npz`` file with arrays ``x`` [N, ...], ``y`` [N] and optionally
``classes`` [K] (strings), ``pair_id`` [N], ``kind`` (``vector``/``signal``/``image``) and
``augment`` (an augmentation kind, e.g. ``spectrogram``; :mod:`ucmkd.augment`).

``x`` of a file written by ``numpy.savez`` (uncompressed) is memory-mapped, so that a file
larger than memory can be read lazily (``data.storage``, docs/data.md); a compressed
``x`` (``numpy.savez_compressed``) is read whole."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..cache import open_npz_member
from ..errors import DataError
from .base import RawModality, register_scheme

_DEFAULT_KIND = {2: "vector", 3: "signal", 4: "image"}


@register_scheme("npz")
def load_npz_spec(path: str, cfg=None) -> RawModality:
    """``npz:PATH`` (the data config is not read: the file holds everything)."""
    return load_npz(path)


def load_npz(path: str) -> RawModality:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"dataset file not found: {p}")
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds
        raise DataError(f"{p}: cannot read as .npz: {e}") from None
    for key in ("x", "y"):
        if key not in z.files:
            raise DataError(f"{p}: missing array {key!r} (found {z.files})")
    x = open_npz_member(p, "x")        # None: compressed, read whole
    if x is not None and not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{p}: field 'x' must hold numbers, got dtype {x.dtype}")
    x = z["x"].astype(np.float32) if x is None else x
    y = z["y"]
    if x.ndim == 1 or x.ndim > 4:
        raise DataError(f"{p}: field 'x' must be [N, D], [N, C, L] or [N, C, H, W], got {list(x.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{p}: field 'y' must hold integer labels, got dtype {y.dtype}")
    classes = [str(c) for c in z["classes"]] if "classes" in z.files else [str(i) for i in range(int(y.max()) + 1)]
    kind = str(z["kind"]) if "kind" in z.files else _DEFAULT_KIND.get(x.ndim, "vector")
    pair_id = z["pair_id"].astype(np.int64) if "pair_id" in z.files else None
    augment = str(z["augment"]) if "augment" in z.files else None
    # no file fingerprint: the arrays' content identifies the data (a touched file is the same data)
    return RawModality(x=x, y=y.astype(np.int64), classes=classes, kind=kind, pair_id=pair_id, source=str(p),
                       augment=augment)
