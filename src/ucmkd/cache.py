"""The one on-disk cache helper of ucmkd: atomic writes, content keys and keyed lookup. Teachers,
datasets (generated or decoded) and runs all go through it.

- :func:`atomic_path` writes a file or a directory under a temporary name in the same directory
  and renames it into place. A reader sees the old entry or the complete new one, never a part,
  whatever moment the process dies at. Every writer of ucmkd (checkpoints, metrics, results,
  cached datasets, teachers) uses it, through :func:`write_text`, :func:`write_json`,
  :func:`save_torch`, :func:`save_npz` and :func:`save_pickle`.
- :func:`content_key` is a stable short hash of a JSON-able structure; numpy arrays and torch
  tensors in it are hashed by content (:func:`array_digest`, cost bounded for large arrays).
  :func:`state_digest` hashes a ``state_dict`` (teacher weights) and :func:`model_signature`
  describes an architecture (class names, parameter names and shapes).
- :func:`entry` names a cache entry ``<root>/<kind>/<name>-<key>``; :func:`get_or_build` loads
  it, or builds it and writes it atomically; :func:`get_or_write` does the same for an entry
  written piece by piece (an array larger than memory).
- Arrays larger than memory: :func:`write_npz_rows` writes an uncompressed ``.npz`` from blocks
  of rows (one block in memory at a time) and :func:`open_npz_member` memory-maps an array of
  an uncompressed ``.npz`` (numpy's ``np.load(mmap_mode=...)`` reads ``.npz`` members whole).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import pickle
import struct
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import numpy as np

from .errors import DataError

T = TypeVar("T")

#: Arrays up to this many bytes are hashed in full; larger ones by :data:`SAMPLE_CHUNKS` evenly
#: spaced chunks of :data:`CHUNK_BYTES` (the first and the last included), so the cost of a key
#: is at most ~64 MiB of hashing, about 0.1 s, whatever the array's size.
FULL_HASH_BYTES = 64 * 2 ** 20
SAMPLE_CHUNKS = 256
CHUNK_BYTES = 256 * 2 ** 10
#: Bytes hashed per update when an array is hashed in full (a lazily read one is read this much at a time).
PIECE_BYTES = 16 * 2 ** 20


# --------------------------------------------------------------------------- atomic writes
def _replace(tmp: Path, path: Path) -> None:
    """The commit of every atomic write: one rename (kept as one function, so that tests can
    crash the process right before or after it)."""
    os.replace(tmp, path)


def tmp_name(path: Path) -> Path:
    """A private temporary sibling of ``path`` (same directory, same suffix, hidden)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to (a file or a directory); on
    leaving the block it is renamed to ``path``. If the block raises, the temporary is removed
    and ``path`` is untouched. A directory target that another process completed meanwhile is
    kept (the first complete writer wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            remove_tmp(tmp)                # a concurrent writer finished the same entry first
            return
        _replace(tmp, path)
    except Exception:                      # (a kill leaves the temporary: see clean_tmp)
        remove_tmp(tmp)
        raise


def remove_tmp(tmp: Path) -> None:
    import shutil

    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def clean_tmp(directory: str | Path) -> None:
    """Remove the temporaries that a killed process left in ``directory`` (``.<stem>.tmp-*``)."""
    d = Path(directory)
    if d.is_dir():
        for p in d.glob(".*.tmp-*"):
            remove_tmp(p)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_torch(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:      # the temporary keeps the .npz suffix, so numpy adds none
        np.savez(tmp, **arrays)


def save_pickle(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f)


# --------------------------------------------------------------------------- content keys
def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):             # a torch tensor (bfloat16 has no numpy dtype: its bits)
        import torch

        t = x.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return t.numpy()
    return np.asarray(x)


def array_digest(x, full: bool = False) -> dict:
    """``{"shape", "dtype", "sha256"}`` of an array or tensor. Up to :data:`FULL_HASH_BYTES` (or
    with ``full``) the hash covers every byte; above, it covers :data:`SAMPLE_CHUNKS` evenly
    spaced chunks of :data:`CHUNK_BYTES` (``"sampled": true``): a change confined to the bytes
    between two chunks of a larger array goes unseen (give the dataset a ``fingerprint`` then).

    ``x`` may also be an array read lazily (:class:`ucmkd.data.lazy.LazyArray`: ``shape``,
    ``np_dtype``, ``nbytes`` and ``read_bytes(start, stop)``, its C-order bytes): it hashes
    like the same array in memory, reading only the bytes hashed (at most one piece of
    :data:`PIECE_BYTES` at a time), so a memory-mapped modality costs no more than a sampled one.
    """
    if hasattr(x, "read_bytes"):
        out = {"shape": list(x.shape), "dtype": str(x.np_dtype)}
        nbytes, read = int(x.nbytes), x.read_bytes
    else:
        a = _as_numpy(x)
        out = {"shape": list(a.shape), "dtype": str(a.dtype)}
        if a.dtype == object:
            out["sha256"] = hashlib.sha256(pickle.dumps(a.tolist())).hexdigest()[:16]
            return out
        a = np.ascontiguousarray(a)
        flat = a.reshape(-1).view(np.uint8) if a.size else np.zeros(0, np.uint8)
        nbytes, read = flat.nbytes, (lambda start, stop: flat[start:stop])
    h = hashlib.sha256()
    if nbytes <= FULL_HASH_BYTES or full:
        for s in range(0, nbytes, PIECE_BYTES):
            h.update(read(s, min(nbytes, s + PIECE_BYTES)))
    else:
        starts = np.linspace(0, nbytes - CHUNK_BYTES, SAMPLE_CHUNKS).astype(np.int64)
        for s in starts:
            h.update(read(int(s), int(s) + CHUNK_BYTES))
        out["sampled"] = True
    out["sha256"] = h.hexdigest()[:16]
    return out


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, np.ndarray) or hasattr(obj, "detach") or hasattr(obj, "read_bytes"):
        return array_digest(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def content_key(obj: Any, n: int = 12) -> str:
    """Stable short hash of ``obj`` (dicts in any key order; arrays by content)."""
    blob = json.dumps(_canonical(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def state_digest(state: dict) -> str:
    """Hash of a ``state_dict`` (names, shapes, dtypes and every value): a model's weights."""
    return content_key({k: array_digest(v) for k, v in state.items()}, n=16)


def model_signature(model) -> dict:
    """An architecture, for run keys and for naming what differs: the class of the model and of
    every submodule by name (``modules``), and every parameter and buffer's shape (``tensors``)."""
    return {"class": type(model).__qualname__,
            "modules": {n: type(m).__qualname__ for n, m in model.named_modules() if n},
            "tensors": {n: list(t.shape) for n, t in model.state_dict().items()}}


def signature_diff(old: dict, new: dict, limit: int = 3) -> str:
    """What differs between two :func:`model_signature` s, in words ('' when equal)."""
    parts = []
    if old.get("class") != new.get("class"):
        parts.append(f"model class {old.get('class')} -> {new.get('class')}")
    for what in ("tensors", "modules"):
        a, b = old.get(what, {}), new.get(what, {})
        diff = [f"{k} {a.get(k, 'absent')} -> {b.get(k, 'absent')}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
        if diff:
            more = f" (and {len(diff) - limit} more)" if len(diff) > limit else ""
            parts.append(f"{what[:-1]} " + "; ".join(diff[:limit]) + more)
            break                               # tensor differences say enough
    return ", ".join(parts)


_FILE_DIGESTS: dict = {}


def file_sha256(path: str | Path, what: str = "file") -> str:
    """sha256 (hex) of the bytes of the file ``path``, memoised per process under its resolved
    path, size and modification time (a rewritten file is hashed again). A missing file is a
    :class:`DataError` naming ``what`` and the path."""
    p = Path(path).expanduser()
    try:
        st = p.resolve().stat()
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{what}: file not found: {p}") from None
    if not p.is_file():
        raise DataError(f"{what}: not a file: {p}")
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for piece in iter(lambda: f.read(PIECE_BYTES), b""):
                h.update(piece)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


# --------------------------------------------------------------------------- keyed lookup
def safe_name(name: str, limit: int = 60) -> str:
    """``name`` as one path component: path separators and colons become ``-``."""
    return "".join(c if c.isalnum() or c in "-_.+" else "-" for c in name)[-limit:]


def entry(root: str | Path, kind: str, name: str, key: Any) -> Path:
    """The cache entry ``<root>/<kind>/<safe name>-<content_key(key)>`` (not created)."""
    k = key if isinstance(key, str) else content_key(key, n=10)
    return Path(root) / kind / f"{safe_name(name)}-{k}"


def _load_entry(path: Path, load: Callable[[Path], T], what: str) -> T:
    try:
        return load(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: corrupt {what} ({type(e).__name__}: {e}); delete it to rebuild") from None


def get_or_build(path: str | Path, build: Callable[[], T], save: Callable[[T, Path], None],
                 load: Callable[[Path], T], what: str, rebuild: bool = False) -> T:
    """The value cached at ``path``: ``load(path)`` if it exists (and not ``rebuild``), else
    ``build()``, written with ``save(value, tmp)`` to a temporary renamed to ``path``. An entry
    that exists but cannot be loaded raises :class:`DataError` naming it (never silently rebuilt
    over: the caller may have a reason to keep it)."""
    path = Path(path)
    if path.exists() and not rebuild:
        return _load_entry(path, load, what)
    value = build()
    with atomic_path(path) as tmp:
        save(value, tmp)
    return value


def get_or_write(path: str | Path, write: Callable[[Path], None], load: Callable[[Path], T], what: str,
                 rebuild: bool = False) -> T:
    """Like :func:`get_or_build` for an entry that is written piece by piece and never whole in
    memory: ``write(tmp)`` fills a temporary, renamed to ``path``; the value is ``load(path)``
    (e.g. a memory map of it)."""
    path = Path(path)
    if not path.exists() or rebuild:
        with atomic_path(path) as tmp:
            write(tmp)
    return _load_entry(path, load, what)


# --------------------------------------------------------------------------- arrays larger than memory
def write_npz_rows(file: str | Path, name: str, shape: tuple, dtype, blocks) -> None:
    """Write one array of ``shape`` [N, ...] as member ``<name>.npy`` of a new uncompressed
    ``.npz`` ``file`` (what ``numpy.savez(file, name=array)`` writes; ``np.load`` reads it), from
    ``blocks``: arrays [n_i, *shape[1:]] of consecutive rows, in order, converted to ``dtype``.
    Only one block is in memory at a time. Use inside :func:`atomic_path` (or
    :func:`get_or_write`); fewer or more rows than N is a DataError."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    n = 0
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for block in blocks:
                b = np.ascontiguousarray(block, dtype=dtype)
                if b.shape[1:] != shape[1:]:
                    raise DataError(f"{file}: a block of rows has shape {list(b.shape)}, expected [n, "
                                    f"{', '.join(map(str, shape[1:]))}]")
                n += len(b)
                if n > shape[0]:
                    break
                f.write(b.reshape(-1).view(np.uint8).data)
    if n != shape[0]:
        raise DataError(f"{file}: got {'more than ' if n > shape[0] else ''}{n} rows for an array of {shape[0]}")


def open_npz_member(path: str | Path, name: str) -> Optional[np.memmap]:
    """Member ``<name>.npy`` of the ``.npz`` ``path`` as a read-only memory map (nothing is read
    but its header), or None where it cannot be mapped: compressed (``numpy.savez_compressed``),
    Fortran-ordered, object or empty. A missing member or a broken file is a DataError."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{name}.npy")
    except KeyError:
        raise DataError(f"{path}: no array {name!r}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read as .npz: {e}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise DataError(f"{path}: broken .npz (no local header for {name!r})")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        try:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
        except ValueError as e:
            raise DataError(f"{path}: array {name!r}: {e}") from None
        offset = f.tell()
    if fortran or dtype.hasobject or 0 in shape or not shape:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


#: A memory map's pages are unmapped from the process once about this many bytes may have been
#: mapped by reads through it (:class:`PageRelease`): the file stays in the page cache, but not in
#: the process's resident set.
RELEASE_BYTES = 64 * 2 ** 20
#: What one read of a scattered item may map: the kernel maps whole page-cache folios, up to
#: 2 MiB each where the file system uses large folios (measured: a 16 KiB row maps ~1.6 MiB).
MAP_GRANULE = 2 * 2 ** 20


class PageRelease:
    """Keeps what reads through the memory map ``x`` leave mapped bounded: after reads that may
    have mapped :data:`RELEASE_BYTES` (``add``: contiguous bytes, or scattered items at
    :data:`MAP_GRANULE` each at least), the map's resident pages are unmapped
    (``madvise(MADV_DONTNEED)`` on the read-only shared mapping, ~0.1 ms: the data stays in the
    file and the page cache; a later read maps it again). So a pass over a file larger than
    memory leaves the process's resident set bounded. A no-op for an array that is not a
    file-backed map, or where ``madvise`` is unavailable."""

    def __init__(self, x):
        base = x.base if is_file_backed(x) else None
        self._map = base if base is not None and hasattr(base, "madvise") and hasattr(mmap, "MADV_DONTNEED") \
            else None
        self._mapped = 0

    def add(self, nbytes: int, items: int = 0) -> None:
        """Count a read of ``nbytes`` contiguous bytes, or of ``items`` scattered items of
        ``nbytes`` in all."""
        if self._map is None:
            return
        self._mapped += max(int(nbytes), int(items) * MAP_GRANULE) + MAP_GRANULE
        if self._mapped >= RELEASE_BYTES:
            self._map.madvise(mmap.MADV_DONTNEED)
            self._mapped = 0


def is_file_backed(x) -> bool:
    """``x`` is a whole-file read-only memory map (np.load(mmap_mode="r"), :func:`open_npz_member`,
    np.memmap), not a slice of one: it can be reopened from its file name, offset and shape."""
    return (isinstance(x, np.memmap) and isinstance(x.base, mmap.mmap) and x.flags.c_contiguous
            and x.filename is not None)


def read_json(path: str | Path, what: str = "file") -> Optional[dict]:
    """``path``'s JSON, None if missing; a DataError naming it if unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable {what} ({e})") from None


__all__ = ["atomic_path", "write_text", "write_json", "save_torch", "save_npz", "save_pickle", "clean_tmp",
           "array_digest", "file_sha256", "content_key", "state_digest", "model_signature", "signature_diff", "entry",
           "get_or_build", "get_or_write", "read_json", "safe_name", "write_npz_rows", "open_npz_member",
           "is_file_backed", "PageRelease", "FULL_HASH_BYTES"]
