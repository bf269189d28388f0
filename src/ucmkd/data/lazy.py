"""Modalities read lazily from a file: :class:`LazyArray`, indexable like the in-memory tensor.

A modality too large for memory keeps its raw inputs in a file (a decoded ``.npz`` cache, a
``.npy``, a user's uncompressed ``.npz``), memory-mapped read-only; ``x[idx]`` reads the rows
``idx`` (and only those: under DDP a rank's batch touches only its rows; by ``os.preadv``, so
nothing of the file is mapped into the process), converts them to float32 and standardises them, so it returns exactly the tensor that the in-memory modality's
``x[idx]`` would. Nothing else of the file is resident unless read.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Optional

import numpy as np
import torch

from ..cache import MAP_GRANULE, RELEASE_BYTES, PageRelease, is_file_backed
from ..errors import DataError
from .standardize import Standardizer, chunk_rows

#: Bytes of float32 inputs one evaluation / table-building / diagnostics chunk holds at most
#: (1024 items of up to 64 KiB each; larger items go in fewer per chunk).
READ_BYTES = 64 * 2 ** 20


def batch_rows(shape: tuple, max_rows: int = 1024) -> int:
    """Items per chunk when a whole split is read in chunks: ``max_rows``, fewer for items
    larger than ``READ_BYTES / max_rows`` (the same for an in-memory and a lazy modality, so
    both give the same chunks and bit-identical results)."""
    return max(1, min(int(max_rows), chunk_rows(shape, READ_BYTES)))


class _File:
    """A read-only file descriptor, closed with its last user; ``read_rows`` reads rows by
    ``os.preadv`` (offset-addressed: safe to share across threads and forked processes)."""

    def __init__(self, name: str):
        self.name = name
        self.fd = os.open(name, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)

    def read_rows(self, rows: np.ndarray, dtype: np.dtype, shape: tuple, offset: int) -> np.ndarray:
        """Rows ``rows`` (sorted) of the C-order array [N, *shape] of ``dtype`` at ``offset``."""
        out = np.empty((len(rows), *shape), dtype)
        row = out.nbytes // len(rows)
        starts = np.concatenate([[0], np.nonzero(np.diff(rows) != 1)[0] + 1, [len(rows)]])
        for a, b in zip(starts[:-1], starts[1:]):
            got = os.preadv(self.fd, [out[a:b]], offset + int(rows[a]) * row)
            if got != (b - a) * row:
                raise DataError(f"{self.name}: file ends early: {got} of {(b - a) * row} bytes at row {rows[a]}")
        return out


class _Shared:
    """One :class:`_File` per file name and process, shared by a LazyArray and its subsets."""

    def __init__(self):
        self._files: "weakref.WeakValueDictionary[tuple, _File]" = weakref.WeakValueDictionary()

    def get(self, name: str) -> _File:
        key = (os.getpid(), name)
        f = self._files.get(key)
        if f is None:
            f = self._files[key] = _File(name)
        return f


_share = _Shared()


class LazyArray:
    """Standardised float32 items [N, *input_shape] of a memory-mapped raw array.

    Args:
        source: a whole-file read-only memory map [N0, *input_shape] of any real dtype
            (:func:`ucmkd.cache.is_file_backed`).
        standardizer: applied to every row read (:class:`~ucmkd.data.standardize.Standardizer`).
        rows: optional int64 [N] rows of ``source`` that this array holds, in order (a view:
            :meth:`subset`); None = all.

    ``x[idx]`` (an int, a slice, an int array or tensor, a bool mask) returns a new float32
    tensor; ``len``, ``shape``, ``ndim`` and ``dtype`` (``torch.float32``) are those of the
    standardised tensor. Pickles by file name (DataLoader workers reopen the map).
    """

    dtype = torch.float32
    np_dtype = np.dtype(np.float32)

    def __init__(self, source: np.memmap, standardizer: Standardizer, rows: Optional[np.ndarray] = None):
        if not is_file_backed(source):
            raise TypeError("LazyArray needs a whole-file read-only memory map (np.load(path, mmap_mode='r'))")
        self._src = source
        self._file = (str(source.filename), int(source.offset), source.dtype.str, tuple(source.shape))
        self.standardizer = standardizer
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._release = PageRelease(source)     # keeps the pages read out of this process's RSS
        self._file_handle = _share.get(self._file[0]) if hasattr(os, "preadv") else None

    # ------------------------------------------------------------------ shape
    @property
    def shape(self) -> torch.Size:
        n = self._src.shape[0] if self._rows is None else len(self._rows)
        return torch.Size((n, *self._src.shape[1:]))

    @property
    def ndim(self) -> int:
        return self._src.ndim

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)

    @property
    def filename(self) -> str:
        return self._file[0]

    def __len__(self) -> int:
        return self.shape[0]

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        return f"LazyArray({list(self.shape)}, {self.standardizer.mode}, file={self.filename!r})"

    # ------------------------------------------------------------------ reading
    def _positions(self, idx) -> tuple[np.ndarray, bool]:
        """(int64 positions into this array, whether ``idx`` was a scalar)."""
        n = len(self)
        if isinstance(idx, slice):
            return np.arange(*idx.indices(n), dtype=np.int64), False
        if isinstance(idx, torch.Tensor):
            idx = idx.detach().cpu().numpy()
        arr = np.asarray(idx)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(f"boolean index of shape {list(arr.shape)} for {n} items")
            return np.nonzero(arr)[0], False
        if not np.issubdtype(arr.dtype, np.integer):
            raise IndexError(f"items are indexed by integers, slices or masks, not {arr.dtype}")
        pos = arr.astype(np.int64).reshape(-1)
        pos = np.where(pos < 0, pos + n, pos)
        if len(pos) and (pos.min() < 0 or pos.max() >= n):
            bad = int(arr.reshape(-1)[(pos < 0) | (pos >= n)][0])
            raise IndexError(f"index {bad} is out of bounds for {n} items")
        return pos, arr.ndim == 0

    def read_raw(self, pos: np.ndarray) -> np.ndarray:
        """Raw rows at positions ``pos`` as float32 [len(pos), *input_shape], read in file order,
        one ``os.preadv`` per run of consecutive rows (only those rows are read; nothing is
        mapped into the process, so its resident set holds just the result). Where ``preadv`` is
        missing, a gather from the memory map in groups whose mapped pages are released."""
        rows = pos if self._rows is None else self._rows[pos]
        shape = self._src.shape[1:]
        if len(rows) == 0:
            return np.empty((0, *shape), np.float32)
        in_order = len(rows) == 1 or bool((np.diff(rows) > 0).all())
        uniq, inverse = (rows, None) if in_order else np.unique(rows, return_inverse=True)   # each row read once
        if self._file_handle is not None:
            raw = self._file_handle.read_rows(uniq, self._src.dtype, shape, self._file[1])
        else:
            raw = np.empty((len(uniq), *shape), self._src.dtype)
            row = raw.nbytes // len(uniq)
            group = max(1, RELEASE_BYTES // max(row, MAP_GRANULE) - 1)
            for g in range(0, len(uniq), group):
                raw[g:g + group] = self._src[uniq[g:g + group]]
                self._release.add(row * len(raw[g:g + group]), items=len(raw[g:g + group]))
        raw = raw.astype(np.float32, copy=False)
        return raw if inverse is None else raw[inverse.reshape(-1)]

    def __getitem__(self, idx) -> torch.Tensor:
        pos, scalar = self._positions(idx)
        out = self.standardizer(self.read_raw(pos))
        return out[0] if scalar else out

    def subset(self, idx) -> "LazyArray":
        """The items ``idx`` as another LazyArray (a row map; nothing is read)."""
        pos, _ = self._positions(idx)
        return LazyArray(self._src, self.standardizer, pos if self._rows is None else self._rows[pos])

    def read_bytes(self, start: int, stop: int) -> np.ndarray:
        """Bytes ``[start, stop)`` of the standardised float32 C-order content (for
        :func:`ucmkd.cache.array_digest`): only the rows they fall in are read."""
        row = self.nbytes // max(1, len(self))
        r0, r1 = start // row, -(-stop // row)
        flat = self[r0:r1].numpy().reshape(-1).view(np.uint8)
        return flat[start - r0 * row: stop - r0 * row]

    # ------------------------------------------------------------------ pickling (DataLoader workers)
    def __getstate__(self) -> dict:
        return {"file": self._file, "standardizer": self.standardizer, "rows": self._rows}

    def __setstate__(self, state: dict) -> None:
        name, offset, dtype, shape = state["file"]
        self.__init__(np.memmap(name, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape),
                      state["standardizer"], state["rows"])


def read_whole(x: np.ndarray) -> np.ndarray:
    """An in-memory copy of the memory map ``x`` (same dtype), read in chunks whose pages are
    released as it goes (the process holds the copy, not also the file's pages)."""
    out = np.empty(x.shape, dtype=x.dtype)
    release = PageRelease(x)
    step = chunk_rows(x.shape)
    for a in range(0, len(x), step):
        out[a:a + step] = x[a:a + step]
        release.add(out[a:a + step].nbytes)
    return out


def is_lazy(x) -> bool:
    return isinstance(x, LazyArray)


__all__ = ["LazyArray", "is_lazy", "batch_rows", "read_whole", "READ_BYTES"]
