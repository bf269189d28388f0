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
  it, or builds it and writes it atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import uuid
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


def array_digest(x) -> dict:
    """``{"shape", "dtype", "sha256"}`` of an array or tensor. Up to :data:`FULL_HASH_BYTES` the
    hash covers every byte; above, it covers :data:`SAMPLE_CHUNKS` evenly spaced chunks of
    :data:`CHUNK_BYTES` (``"sampled": true``): a change confined to the bytes between two
    chunks of a larger array goes unseen (give the dataset a ``fingerprint`` then)."""
    a = _as_numpy(x)
    out = {"shape": list(a.shape), "dtype": str(a.dtype)}
    h = hashlib.sha256()
    if a.dtype == object:
        h.update(pickle.dumps(a.tolist()))
    else:
        a = np.ascontiguousarray(a)
        flat = a.reshape(-1).view(np.uint8) if a.size else np.zeros(0, np.uint8)
        if flat.nbytes <= FULL_HASH_BYTES:
            h.update(flat)
        else:
            starts = np.linspace(0, flat.nbytes - CHUNK_BYTES, SAMPLE_CHUNKS).astype(np.int64)
            for s in starts:
                h.update(flat[s:s + CHUNK_BYTES])
            out["sampled"] = True
    out["sha256"] = h.hexdigest()[:16]
    return out


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, np.ndarray) or hasattr(obj, "detach"):
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


# --------------------------------------------------------------------------- keyed lookup
def safe_name(name: str, limit: int = 60) -> str:
    """``name`` as one path component: path separators and colons become ``-``."""
    return "".join(c if c.isalnum() or c in "-_.+" else "-" for c in name)[-limit:]


def entry(root: str | Path, kind: str, name: str, key: Any) -> Path:
    """The cache entry ``<root>/<kind>/<safe name>-<content_key(key)>`` (not created)."""
    k = key if isinstance(key, str) else content_key(key, n=10)
    return Path(root) / kind / f"{safe_name(name)}-{k}"


def get_or_build(path: str | Path, build: Callable[[], T], save: Callable[[T, Path], None],
                 load: Callable[[Path], T], what: str, rebuild: bool = False) -> T:
    """The value cached at ``path``: ``load(path)`` if it exists (and not ``rebuild``), else
    ``build()``, written with ``save(value, tmp)`` to a temporary renamed to ``path``. An entry
    that exists but cannot be loaded raises :class:`DataError` naming it (never silently rebuilt
    over: the caller may have a reason to keep it)."""
    path = Path(path)
    if path.exists() and not rebuild:
        try:
            return load(path)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: corrupt {what} ({type(e).__name__}: {e}); delete it to rebuild") from None
    value = build()
    with atomic_path(path) as tmp:
        save(value, tmp)
    return value


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
           "array_digest", "content_key", "state_digest", "model_signature", "signature_diff", "entry",
           "get_or_build", "read_json", "safe_name", "FULL_HASH_BYTES"]
