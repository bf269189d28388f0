"""Valid values of config fields: ranges (:func:`ranged`) and fixed choices (``CHOICES``),
checked with errors naming the dotted field."""
from __future__ import annotations

from dataclasses import field, fields, is_dataclass
from typing import Any

from ..errors import ConfigError


def ranged(default: Any, lo: Any = None, hi: Any = None, *, lo_open: bool = False, hi_open: bool = False):
    """A dataclass field whose value must lie in [lo, hi] (``lo_open``/``hi_open``: exclusive
    bounds; None: unbounded). ``None`` values of Optional fields are always valid."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})

def range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"

def _check_range(f, value: Any, path: str) -> None:
    rng = f.metadata.get("range")
    if rng is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi, lo_open, hi_open = rng
    ok = ((lo is None or (value > lo if lo_open else value >= lo)) and
          (hi is None or (value < hi if hi_open else value <= hi)))
    if not ok:
        raise ConfigError(f"{path}: expected a value {range_text(*rng)}, got {value!r}")

def choices_of(cls: type) -> dict:
    """``CHOICES`` of a dataclass and of its bases (field -> allowed string values)."""
    out: dict = {}
    for base in reversed(cls.__mro__):
        out.update(base.__dict__.get("CHOICES", {}))
    return out

def _check_choice(allowed: dict, name: str, value: Any, path: str) -> None:
    if name in allowed and value not in allowed[name]:
        raise ConfigError(f"{path}: unknown value {value!r}; choose one of {', '.join(map(str, allowed[name]))}")

def check_ranges(cfg: Any, path: str = "") -> None:
    """Check every ranged field and every ``CHOICES`` field of the dataclass ``cfg``
    (recursively): the validation :func:`from_dict` does, for an object built in Python (e.g. a
    method's ``Params(...)``). Errors name the dotted field."""
    allowed = choices_of(type(cfg))
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        where = _join(path, f.name)
        if is_dataclass(v):
            check_ranges(v, where)
        else:
            _check_range(f, v, where)
            _check_choice(allowed, f.name, v, where)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
