"""Reading and writing configs: mappings, YAML files and ``key=value`` overrides into typed
dataclasses (:func:`from_dict`, :func:`load_config`), hashes, plugin specs."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import ConfigError
from .fields import _check_choice, _check_range, _join, choices_of


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))

def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; errors name ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(value)
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(f"{path}: expected a {base.__name__}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):   # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")

def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) nested dict; unknown keys are errors."""
    if data is None:
        data = {}
    if is_dataclass(data):
        data = asdict(data)
    where = path or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    if hasattr(cls, "expand"):   # a class may fill in a mapping before validation (RunConfig: its recipe)
        data = cls.expand(data, path)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown field {_join(path, unknown[0])!r}; known fields of "
                          f"{where}: {', '.join(sorted(known))}")
    if "plugins" in known and data.get("plugins"):
        # imported before any field is read: a plugin's dataset or method names validate
        specs = _coerce(data["plugins"], list, _join(path, "plugins"))
        data = {**data, "plugins": [resolve_spec(s) for s in specs]}
        _plugin_loader()(data["plugins"], where=_join(path, "plugins"))
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], _join(path, f.name))
            _check_range(f, kwargs[f.name], _join(path, f.name))
    allowed = choices_of(cls)   # string fields with a fixed set of values
    for name, value in kwargs.items():
        _check_choice(allowed, name, value, _join(path, name))
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return asdict(cfg)

def nest(dotted) -> dict:
    """Dotted keys -> nested dict: ``{"optim.lr": 1e-3}`` -> ``{"optim": {"lr": 1e-3}}``.

    ``dotted`` is a dict or a list of (key, value) pairs (later pairs win); a key that is both
    a leaf and a section (``a=1`` with ``a.b=2``) is a :class:`ConfigError`.
    """
    out: dict = {}
    for key, value in (dotted.items() if isinstance(dotted, dict) else dotted):
        parts = str(key).strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} has an empty part")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier override of {p!r}")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"override {key!r} conflicts with an earlier override of {key + '.*'!r}")
        node[parts[-1]] = value
    return out

def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=1e-3", "method.params.w_fa=0.5"]`` -> nested dict (values parsed as YAML)."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            pairs.append((key, yaml.safe_load(raw) if raw != "" else ""))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
    return nest(pairs)

def deep_merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; ``update`` wins. Returns a new dict."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out

def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data

def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Any:
    """Defaults <- ``base`` dict <- YAML file <- ``key=value`` overrides, validated into ``cls``."""
    data = dict(base or {})
    if path is not None:
        data = deep_merge(data, resolve_plugin_paths(cls, load_yaml(path), Path(str(path)).parent))
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None

def is_path(spec: str) -> bool:
    """Whether plugin ``spec`` names a file or directory (``.py`` suffix or a path separator)
    rather than a module."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec or spec.startswith(("~", "."))

def resolve_spec(spec: str, base_dir: Optional[str | Path] = None) -> str:
    """Plugin ``spec`` as loaded: a path made absolute (a relative one against ``base_dir``,
    default the working directory); a module name as given."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"plugin spec: expected a module name or a path, got {spec!r}")
    spec = spec.strip()
    if not is_path(spec):
        return spec
    p = Path(spec).expanduser()
    if not p.is_absolute():
        p = Path(base_dir if base_dir is not None else os.getcwd()) / p
    return str(p.resolve())

_PLUGIN_LOADER: list = []

def register_plugin_loader(fn) -> None:
    """Set the function that imports a config's ``plugins`` (:func:`ucmkd.plugins.load_plugins`,
    which registers itself: the plugin layer sits above the config)."""
    _PLUGIN_LOADER[:] = [fn]

def _plugin_loader():
    if not _PLUGIN_LOADER:     # importing any ucmkd module imports the package, which loads the plugin layer
        raise ConfigError("plugins: the plugin loader is not set (ucmkd.plugins not imported)")
    return _PLUGIN_LOADER[0]

def resolve_plugin_paths(cls: type, data: dict, base_dir: Path) -> dict:
    """``data`` (a YAML mapping read into ``cls``) with the relative paths of its ``plugins``
    lists (``cls``'s and those of its dataclass sections, e.g. a suite's ``base``) read against
    ``base_dir``."""
    if not is_dataclass(cls) or not isinstance(data, dict):
        return data
    hints, out = typing.get_type_hints(cls), dict(data)
    for f in fields(cls):
        v = out.get(f.name)
        if f.name == "plugins" and isinstance(v, list):
            out[f.name] = [resolve_spec(s, base_dir) if isinstance(s, str) and s.strip() else s for s in v]
        elif is_dataclass(hints[f.name]) and isinstance(v, dict):
            out[f.name] = resolve_plugin_paths(hints[f.name], v, base_dir)
    return out

def builtin_yaml(package: str) -> list[str]:
    """Names of the YAML files shipped in ``package`` (e.g. ``ucmkd.configs``), without suffix."""
    from importlib import resources

    return sorted(p.name[:-5] for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))

def resolve_yaml(package: str, name: str, what: str):
    """A built-in name from ``package`` or a path to a ``.yaml``/``.yml`` file."""
    from importlib import resources

    if name in builtin_yaml(package):
        return resources.files(package) / f"{name}.yaml"
    if Path(name).suffix in (".yaml", ".yml"):
        return Path(name)
    raise ConfigError(f"unknown {what} {name!r}: give a built-in one ({', '.join(builtin_yaml(package))}) "
                      f"or a path to a .yaml file")

def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path``, atomically."""
    from ..cache import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

def config_hash(obj: Any, n: int = 10) -> str:
    """Stable short hash of a dataclass or dict (key order independent)."""
    d = to_dict(obj) if is_dataclass(obj) else obj
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]

def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
