"""Name -> object registries (datasets, backbones, methods, strategies)."""
from __future__ import annotations

from typing import Callable, ClassVar, Dict, Generic, Iterator, List, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping filled with the ``register`` decorator.

    >>> METHODS = Registry("method")
    >>> @METHODS.register("ce")
    ... class CE: ...

    ``code_in_keys=False``: what an entry produces is keyed by content wherever it is used (a
    dataset: its arrays), so the entry's source code stays out of run keys (:mod:`ucmkd.plugins`).
    """

    #: every registry made, in order: plugins see what an import registered (:mod:`ucmkd.plugins`)
    instances: ClassVar[List["Registry"]] = []

    def __init__(self, kind: str, code_in_keys: bool = True):
        self.kind = kind
        self.code_in_keys = code_in_keys
        self._items: Dict[str, T] = {}
        Registry.instances.append(self)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plugin re-imported after an edit registers it again)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
