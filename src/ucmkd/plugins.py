"""Plugins: your datasets, methods, backbones and augmentation policies, in modules that register
them when imported (``@register_dataset``, ``@register_method``, ...), loaded wherever runs are
built: the CLI, :func:`ucmkd.run`, bench worker processes and torchrun ranks (docs/plugins.md).

A plugin spec is

* a module name (``mypkg.methods``), imported from ``sys.path``;
* ``module:function``: the module is imported, then ``function()`` called once;
* a path to a ``.py`` file or to a package directory (``./my_method.py``, ``./myplugin/``),
  imported under a stable module name derived from its resolved path.

Plugins come from ``--plugin`` (every CLI command), ``plugins:`` lists in YAML configs (a
relative path is read against the YAML file's directory) and the ``ucmkd.plugins`` entry-point
group of every installed distribution (loaded by the CLI). Loading is idempotent: a plugin whose
source is unchanged is not imported again; one edited since its import is imported again, its
registrations replaced.

**The code a run uses is part of its keys** (:func:`user_code`). Every registered entry a config
names (a method, backbone, augmentation policy, ...; not a dataset: what it builds is keyed by
content) that is not ucmkd's own enters the run key as a content hash of its source: the files
of the plugin that registered it (a module: its file; a package: every ``.py`` under its
directory) and the files defining it (for a class, each class of its MRO that derives from a
ucmkd class, e.g. a base method of yours). An entry registered from Python without a plugin (a
notebook) enters by the files defining it (``inspect.getsourcefile``; the source text where
there is no file; ``unavailable`` where there is neither). A plugin that registers nothing enters
every key: what it changes cannot be told. Configs that use no such code keep their keys.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from .config import is_path, register_plugin_loader, resolve_spec
from .errors import ConfigError
from .registry import Registry

#: the entry-point group whose entries the CLI loads (``[project.entry-points."ucmkd.plugins"]``)
ENTRY_POINT_GROUP = "ucmkd.plugins"
#: prefix of the module names that plugin files are imported under
FILE_MODULE_PREFIX = "ucmkd_plugin_"


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin.

    spec: as loaded (a module name, ``module:function`` or an absolute path); label: how keys
    and results name it (the module name, or the file or directory name); module: its
    ``sys.modules`` name; files: its source files (absolute paths), ``stamp``: their (size,
    mtime) when loaded, ``digest``: a hash of their content then; provides: the (registry kind,
    name) entries it registered.
    """

    spec: str
    label: str
    module: str
    files: tuple
    stamp: tuple
    digest: str
    provides: frozenset


_LOADED: dict = {}     # spec -> Plugin, in load order
_SHA: dict = {}        # path -> sha256 of its bytes when first read (the code that was imported)


# --------------------------------------------------------------------------- specs
# --------------------------------------------------------------------------- source hashes
def _sha(path: str, fresh: bool = False) -> str:
    if fresh or path not in _SHA:
        _SHA[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _SHA[path]


def _stamp(files: Iterable[str]) -> tuple:
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def digest(shas: Iterable[str]) -> str:
    """The content hash of a set of sources (their sha256s; neither paths nor order enter it, so
    a project moved elsewhere keeps its keys)."""
    return hashlib.sha256("\n".join(sorted(shas)).encode()).hexdigest()[:16]


def _package_files(dirs: Iterable[str]) -> list[str]:
    return sorted(str(p.resolve()) for d in dirs for p in Path(d).rglob("*.py") if "__pycache__" not in p.parts)


def _module_files(module) -> list[str]:
    """A module's file; a package's ``.py`` files, every one under its directory."""
    if getattr(module, "__path__", None) is not None:
        return _package_files(list(module.__path__))
    f = getattr(module, "__file__", None)
    return [str(Path(f).resolve())] if f and f.endswith(".py") else []


def _ours(obj: Any) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "ucmkd"


def _definitions(obj: Any) -> list:
    """The classes and functions of yours that define registered ``obj``: a class with each class
    of its MRO deriving from a ucmkd class (ucmkd's own left out); a function; for an instance
    (an augmentation ``Policy``), its class and the functions and classes it holds."""
    if isinstance(obj, type):
        return [c for c in obj.__mro__ if not _ours(c) and (c is obj or any(_ours(b) for b in c.__mro__))]
    if inspect.isroutine(obj) or not hasattr(obj, "__dict__"):
        return [] if _ours(obj) else [obj]
    held = [v for v in vars(obj).values() if inspect.isroutine(v) or isinstance(v, type)]
    return [d for x in (type(obj), *held) for d in _definitions(x)]


def _sources(obj: Any) -> dict:
    """``{source: sha256}`` of the definitions of ``obj`` (:func:`_definitions`): their files;
    the source text where there is no file (a notebook cell); ``unavailable`` where neither."""
    out = {}
    for d in _definitions(obj):
        try:
            f = inspect.getsourcefile(d)
        except TypeError:            # a builtin: no Python source
            continue
        if f and os.path.isfile(f):
            out[str(Path(f).resolve())] = _sha(str(Path(f).resolve()))
            continue
        name = f"{getattr(d, '__module__', '?')}.{getattr(d, '__qualname__', repr(d))}"
        try:
            out[name] = hashlib.sha256(inspect.getsource(d).encode()).hexdigest()
        except (OSError, TypeError):
            out[name] = "unavailable"
    return out


def _strings(values: Any) -> Iterator[str]:
    if isinstance(values, str):
        yield values
    elif isinstance(values, dict):
        for v in values.values():
            yield from _strings(v)
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from _strings(v)


def user_code(values: Any) -> dict:
    """``{label: digest}`` of the code outside ucmkd that a config uses (``values``: the config
    as a dict, e.g. :func:`ucmkd.api.key_config`): every string in it that names a registered
    entry (in a registry with ``code_in_keys``) not defined by ucmkd, under the label of the
    plugin that registered it (with the plugin's files) or ``"<kind> <name>"``; every loaded
    plugin that registered nothing. Empty when the config uses ucmkd's own code alone."""
    names = set(_strings(values))
    origin = {e: p for p in _LOADED.values() for e in p.provides}
    found: dict = {}
    for p in _LOADED.values():
        if not p.provides:
            found.setdefault(p.label, {}).update({f: _sha(f) for f in p.files})
    for reg in Registry.instances:
        if not reg.code_in_keys:
            continue
        for n in sorted(names):
            if n not in reg:
                continue
            src = _sources(reg.get(n))
            p = origin.get((reg.kind, n))
            if p is not None:
                found.setdefault(p.label, {}).update({**{f: _sha(f) for f in p.files}, **src})
            elif src:
                found.setdefault(f"{reg.kind} {n}", {}).update(src)
    return {label: digest(s.values()) for label, s in sorted(found.items())}


# --------------------------------------------------------------------------- loading
def _entries() -> set:
    return {(r.kind, n) for r in Registry.instances for n in r.names()}


def _ucmkd_own(entry: tuple) -> bool:
    """Whether registered ``entry`` is ucmkd's own code (a ucmkd module a plugin imports may
    register its entries then: they are not the plugin's)."""
    kind, name = entry
    objs = [r.get(name) for r in Registry.instances if r.kind == kind and name in r]
    return bool(objs) and all(_ours(o) and not _definitions(o) for o in objs)


def _unregister(entries: Iterable[tuple]) -> None:
    for kind, name in entries:
        for r in Registry.instances:
            if r.kind == kind:
                r.unregister(name)


def _defined_in(module: str) -> frozenset:
    """The registered entries whose definitions live in ``module`` (a module imported before it
    was given as a plugin)."""
    return frozenset((r.kind, n) for r in Registry.instances for n in r.names()
                     if any(getattr(d, "__module__", None) == module for d in _definitions(r.get(n))))


def _module_of_file(path: Path) -> Optional[str]:
    """The name of an already imported module whose file is ``path``."""
    for name, m in list(sys.modules.items()):
        f = getattr(m, "__file__", None)
        if f and os.path.basename(f) == path.name and Path(f).resolve() == path:
            return name
    return None


def _import_path(spec: str, where: str) -> tuple:
    """Import the file or package directory ``spec`` (absolute); (module name, files, provides
    when it was imported before, else None)."""
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"plugin {spec!r}{where}: no such file or directory")
    if path.is_dir():
        source = path / "__init__.py"
        if not source.is_file():
            raise ConfigError(f"plugin {spec!r}{where}: a directory without __init__.py; a plugin directory "
                              f"must be a package (or give its .py files)")
    elif path.suffix != ".py":
        raise ConfigError(f"plugin {spec!r}{where}: not a .py file")
    else:
        source = path
    files = _package_files([str(path)]) if path.is_dir() else [str(path)]
    known = _module_of_file(source)
    if known is not None:        # imported already (e.g. by a script of yours): not imported twice
        return known, files, _defined_in(known)
    stem = re.sub(r"\W", "_", path.name[:-3] if path.suffix == ".py" else path.name)
    name = f"{FILE_MODULE_PREFIX}{stem}_{hashlib.sha256(spec.encode()).hexdigest()[:10]}"
    mspec = importlib.util.spec_from_file_location(
        name, source, submodule_search_locations=[str(path)] if path.is_dir() else None)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except BaseException:
        _drop_modules(name)
        raise
    return name, files, None


def _import_module(spec: str, where: str) -> tuple:
    """Import module ``spec`` (``module`` or ``module:function``, then calling the function);
    (module name, files, provides when it was imported before, else None)."""
    name, _, attr = spec.partition(":")
    try:
        found = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        found = None
    if found is None:
        raise ConfigError(f"plugin {spec!r}{where}: no module named {name!r} on the Python path; give an "
                          f"installed module, or a path to a .py file or package directory (./my_method.py)")
    before = name in sys.modules
    module = importlib.import_module(name)
    if attr:
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"plugin {spec!r}{where}: module {name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if callable(obj):
            obj()
    return name, _module_files(module), (_defined_in(name) if before and not attr else None)


def _drop_modules(name: str) -> None:
    for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[m]


def _failure(spec: str, where: str, e: BaseException) -> str:
    """The message of a plugin whose import raised ``e``, with the line it raised at: the last
    one in the plugin's own files when it is a path, else the last one outside ucmkd."""
    at = ""
    if isinstance(e, SyntaxError) and e.filename:
        at = f" (at {e.filename}:{e.lineno})"
    else:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<frozen")]
        ucmkd_dir = str(Path(__file__).resolve().parent) + os.sep
        mine = ([f for f in frames if f.filename == spec or f.filename.startswith(spec + os.sep)]
                if is_path(spec) else [])
        frames = mine or [f for f in frames if not f.filename.startswith(ucmkd_dir)] or frames
        if frames:
            at = f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return f"plugin {spec!r}{where} failed to import: {type(e).__name__}: {e}{at}"


def load_plugin(spec: str, base_dir: Optional[str | Path] = None, where: str = "") -> Plugin:
    """Import one plugin (see the module docstring) unless it is loaded with this source already.
    ``where`` says where the spec came from, for errors. A spec that cannot be found, or whose
    import raises, is a ConfigError naming it (with the original exception, chained); what it
    registered before it failed is unregistered."""
    from . import data, methods, models  # noqa: F401  (ucmkd's own entries, registered before any snapshot)

    where = f" ({where})" if where else ""
    spec = resolve_spec(spec, base_dir)
    old = _LOADED.get(spec)
    if old is not None:
        stamp = _stamp(old.files)
        if stamp == old.stamp:
            return old
        shas = [_sha(f, fresh=True) for f in old.files if os.path.isfile(f)]
        if digest(shas) == old.digest and len(shas) == len(old.files):
            _LOADED[spec] = replace(old, stamp=stamp)
            return _LOADED[spec]
        _unregister(old.provides)          # edited since it was imported: import it again
        _drop_modules(old.module)
        del _LOADED[spec]
    before = _entries()
    try:
        name, files, provides = (_import_path if is_path(spec) else _import_module)(spec, where)
    except ConfigError as e:
        _unregister(_entries() - before)
        if str(e).startswith(f"plugin {spec!r}"):
            raise
        raise ConfigError(_failure(spec, where, e)) from e
    except Exception as e:  # noqa: BLE001 - whatever a plugin raises is reported the same way
        _unregister(_entries() - before)
        raise ConfigError(_failure(spec, where, e)) from e
    files = tuple(files)
    label = name if not is_path(spec) else Path(spec).name
    plugin = Plugin(spec=spec, label=label, module=name, files=files, stamp=_stamp(files),
                    digest=digest(_sha(f, fresh=True) for f in files),
                    provides=frozenset(provides if provides is not None else
                                       [e for e in _entries() - before if not _ucmkd_own(e)]))
    _LOADED[spec] = plugin
    return plugin


def load_plugins(specs: Optional[Iterable[str]], base_dir: Optional[str | Path] = None,
                 where: str = "") -> list[Plugin]:
    """Load every plugin of ``specs`` in order (:func:`load_plugin`); relative paths are read
    against ``base_dir`` (default: the working directory)."""
    if specs is None:
        return []
    if isinstance(specs, str) or not isinstance(specs, (list, tuple)):
        raise ConfigError(f"{where or 'plugins'}: expected a list of module names or paths, got {specs!r}")
    return [load_plugin(s, base_dir, where) for s in specs]


def load_entry_points() -> list[Plugin]:
    """Load the plugins of every installed distribution's ``ucmkd.plugins`` entry points (the
    CLI does, on every command)."""
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        where = f"entry point {ep.name!r}" + (f" of {dist.name}" if dist is not None else "")
        spec = ep.module + (f":{ep.attr}" if ep.attr else "")
        out.append(load_plugin(spec, where=where))
    return out


def loaded() -> list[Plugin]:
    """The plugins loaded in this process, in load order."""
    return list(_LOADED.values())


def loaded_specs() -> list[str]:
    """The specs of :func:`loaded`: what a worker process loads to see what this one sees."""
    return [p.spec for p in _LOADED.values()]


__all__ = ["Plugin", "load_plugin", "load_plugins", "load_entry_points", "loaded", "loaded_specs", "user_code",
           "resolve_spec", "digest", "ENTRY_POINT_GROUP"]


register_plugin_loader(load_plugins)     # configs naming plugins load them (config does not import this layer)
