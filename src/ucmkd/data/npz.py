"""Bring-your-own data: a ``.npz`` file with arrays ``x`` [N, ...], ``y`` [N] and optionally
``classes`` [K] (strings), ``pair_id`` [N], ``kind`` (``vector``/``signal``/``image``),
``augment`` (an augmentation kind, e.g. ``spectrogram``; :mod:`ucmkd.augment`), ``split`` [N]
(``train``/``val``/``test``: the file's own split) and ``groups`` [N] (ints or strings, e.g.
speaker ids: whole groups are held out; :func:`ucmkd.data.base.make_splits`). Any other array
is an error (a misspelt field is never dropped silently). docs/data.md describes each field.

``x`` of a file written by ``numpy.savez`` (uncompressed) is memory-mapped, so that a file
larger than memory can be read lazily (``data.storage``, docs/data.md); a compressed
``x`` (``numpy.savez_compressed``) is read whole."""
from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np

from ..cache import open_npz_member
from ..errors import DataError
from .base import RawModality, register_scheme, split_names

_DEFAULT_KIND = {2: "vector", 3: "signal", 4: "image"}
#: the arrays a ``.npz`` dataset may hold
FIELDS = ("x", "y", "classes", "pair_id", "kind", "augment", "split", "groups")


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
    unknown = [k for k in z.files if k not in FIELDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], FIELDS, n=1)
        raise DataError(f"{p}: unknown array {unknown[0]!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                        f"known fields: {', '.join(FIELDS)}")
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
    pair_id = _per_item(z, p, "pair_id", y, "integer ids", np.integer)
    pair_id = None if pair_id is None else pair_id.astype(np.int64)
    augment = str(z["augment"]) if "augment" in z.files else None
    split = _per_item(z, p, "split", y, "strings train/val/test", np.str_, np.bytes_)
    if split is not None:
        split = split_names(split.astype(str), f"{p}: field 'split'")
    groups = _per_item(z, p, "groups", y, "group ids (integers or strings)", np.integer, np.str_, np.bytes_)
    # no file fingerprint: the arrays' content identifies the data (a touched file is the same data)
    return RawModality(x=x, y=y.astype(np.int64), classes=classes, kind=kind, pair_id=pair_id, source=str(p),
                       augment=augment, split=split, groups=groups)


def _per_item(z, p: Path, name: str, y: np.ndarray, what: str, *dtypes) -> np.ndarray | None:
    """Optional array ``name`` of ``z``: one value per item ([N], like ``y``) of one of ``dtypes``."""
    if name not in z.files:
        return None
    v = z[name]
    if not any(np.issubdtype(v.dtype, t) for t in dtypes):
        raise DataError(f"{p}: field {name!r} must hold {what}, got dtype {v.dtype}")
    if v.shape != y.shape:
        raise DataError(f"{p}: field {name!r} must have shape [N]={list(y.shape)} (one value per item), "
                        f"got {list(v.shape)}")
    return v
