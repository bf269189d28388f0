"""What produced a result: the code version, the versions of the numeric libraries, and whether
they are the ones pinned by the repository's lock file (``requirements.lock``).

Every ``result.json`` and every row of a suite's ``results.jsonl`` carries :func:`versions`, so a
figure re-run next month with other library versions can be told apart from a change of ucmkd.
"""
from __future__ import annotations

import hashlib
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Optional

#: distributions whose versions are recorded with every result (import name -> distribution name)
RECORDED = {"torch": "torch", "numpy": "numpy", "pot": "POT", "scikit-learn": "scikit-learn"}
LOCK_FILE = "requirements.lock"


@lru_cache(maxsize=1)
def code_version() -> str:
    """``ucmkd <version>`` plus the git commit (and ``-dirty``) when run from a checkout."""
    from ._version import __version__

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(here)], cwd=here, capture_output=True,
                               text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"ucmkd {__version__}" + (f" ({commit}{'-dirty' if dirty else ''})" if commit else "")


def _installed(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def read_lock(path: Path) -> dict:
    """``name -> version`` of a pip lock file (``name==version`` lines; comments, blank lines and
    options skipped; names lower-cased with ``_`` as ``-``)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-") or "==" not in line:
            continue
        name, version = line.split("==", 1)
        pins[name.strip().lower().replace("_", "-")] = version.split(";", 1)[0].strip()
    return pins


def _base(version: str) -> str:
    """A version without its local label (``2.13.0+cpu`` -> ``2.13.0``): ``==`` ignores it too."""
    return version.split("+", 1)[0]


def lock_status(lock: Optional[Path] = None) -> str:
    """``requirements.lock@<sha256[:12]>`` when every package pinned there is installed at its
    pinned version; ``unlocked (...)`` naming the first differences otherwise; ``no lock file``
    when ucmkd does not run from a checkout that has one."""
    lock = lock if lock is not None else Path(__file__).resolve().parents[2] / LOCK_FILE
    if not lock.is_file():
        return "no lock file"
    pins = read_lock(lock)
    off = []
    for name, want in sorted(pins.items()):
        have = _installed(name)
        if have is None or _base(have) != _base(want):
            off.append(f"{name} {have or 'missing'} != {want}")
    if off:
        more = f" and {len(off) - 3} more" if len(off) > 3 else ""
        return f"unlocked ({', '.join(off[:3])}{more})"
    return f"{LOCK_FILE}@{hashlib.sha256(lock.read_bytes()).hexdigest()[:12]}"


@lru_cache(maxsize=1)
def versions() -> dict:
    """``{"ucmkd": code_version(), "python": ..., "torch": ..., "numpy": ..., "pot": ...,
    "scikit-learn": ..., "lock": lock_status()}`` of this process."""
    out = {"ucmkd": code_version(), "python": platform.python_version()}
    out.update({k: _installed(d) for k, d in RECORDED.items()})
    out["lock"] = lock_status()
    return out


__all__ = ["code_version", "versions", "lock_status", "read_lock", "RECORDED", "LOCK_FILE"]
