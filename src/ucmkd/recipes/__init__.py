"""Named recipes: the settings of the authors' per-dataset scripts as dotted config overrides.

A recipe is a YAML file in this package (``paper-ave.yaml``, ...), a typed :class:`Recipe`:
``overrides`` (dotted :class:`~ucmkd.config.RunConfig` fields for every method) and
``methods`` (the methods it supports, each with its own dotted overrides). A run selects one
with the ``recipe`` field::

    ucmkd train recipe=paper-ravdess method.name=ucmkd-bilevel data.roots.ravdess=/data/RAVDESS

    from ucmkd.recipes import recipe_config
    cfg = recipe_config("paper-ravdess", "ucmkd-bilevel", ["data.roots.ravdess=/data/RAVDESS"])

Whenever a RunConfig is built from a mapping (a YAML file, ``key=value`` overrides,
``from_dict``), the recipe is filled in between the defaults and the mapping's own values:
defaults <- recipe (common, then the method's) <- the mapping. The resolved values and the
recipe's name are what ``config.yaml`` records, so a saved config reloads to itself. A recipe
belongs to one run: grids (``ucmkd run``, ``ucmkd bench``) resolve their cells from a full
base config, so a recipe inside one is refused. docs/reproduction.md lists what each fixes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from ..config import builtin_yaml, deep_merge, from_dict, load_yaml, nest, parse_overrides
from ..errors import ConfigError

PACKAGE = "ucmkd.recipes"


@dataclass
class Recipe:
    """One recipe (a YAML file of this package)."""

    description: str = ""
    source: str = ""                                # the authors' files whose settings it reproduces
    overrides: dict = field(default_factory=dict)   # dotted RunConfig overrides, every method
    methods: dict = field(default_factory=dict)     # method name -> dotted overrides of that method


def recipe_names() -> list[str]:
    """Names of the shipped recipes."""
    return builtin_yaml(PACKAGE)


@lru_cache(maxsize=None)
def load_recipe(name: str) -> Recipe:
    """The validated recipe ``name``; an unknown name is a :class:`ConfigError` listing the known."""
    if name not in recipe_names():
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(recipe_names())}")
    path = resources.files(PACKAGE) / f"{name}.yaml"
    recipe = from_dict(Recipe, load_yaml(path), f"recipe {name}")
    for method in recipe.methods:
        _validate(name, recipe, method, path)
    return recipe


def _validate(name: str, recipe: Recipe, method: str, path) -> None:
    from ..config import RunConfig
    from ..methods import METHODS

    layer = _layer(recipe, method)
    layer.setdefault("method", {})["name"] = method
    try:
        cfg = from_dict(RunConfig, layer, "")
        METHODS.get(method).parse_params(cfg.method.params)
    except ConfigError as e:
        raise ConfigError(f"recipe {name} ({path}), method {method}: {e}") from None


def _layer(recipe: Recipe, method: str) -> dict:
    """The nested overrides ``recipe`` makes for ``method``."""
    return deep_merge(nest(recipe.overrides), nest(recipe.methods.get(method) or {}))


def recipe_layer(name: str, method: str) -> dict:
    """Nested overrides recipe ``name`` makes for ``method`` (common, then the method's own)."""
    recipe = load_recipe(name)
    if method not in recipe.methods:
        raise ConfigError(f"recipe {name!r} has no settings for method {method!r}; it covers "
                          f"{', '.join(recipe.methods)}")
    return _layer(recipe, method)


def expand_recipe(data: dict, path: str = "") -> dict:
    """``data`` (a RunConfig mapping naming a recipe) with the recipe filled in under its own values."""
    name = data["recipe"]
    where = f"{path}.recipe" if path else "recipe"
    if not isinstance(name, str):
        raise ConfigError(f"{where}: expected a recipe name, got {name!r}")
    if path:
        raise ConfigError(f"{where}: a recipe applies to one run (a top-level run config, e.g. ucmkd train "
                          f"recipe={name} method.name=...); grids resolve their cells from a full base config, "
                          f"so give the recipe's settings as overrides there (docs/reproduction.md)")
    method = data.get("method", {}).get("name") if isinstance(data.get("method"), dict) else None
    if method is None:
        raise ConfigError(f"recipe {name!r} has per-method settings: give method.name too (one of "
                          f"{', '.join(load_recipe(name).methods)})")
    return deep_merge(recipe_layer(name, method), data)


def recipe_config(name: str, method: str, overrides: list[str] | dict | None = None):
    """The :class:`~ucmkd.config.RunConfig` of recipe ``name`` for ``method``, with ``overrides``
    (``["key=value", ...]`` or a dotted dict) on top."""
    from ..config import RunConfig

    extra = parse_overrides(overrides) if isinstance(overrides, list) else nest(overrides or {})
    return from_dict(RunConfig, deep_merge({"recipe": name, "method": {"name": method}}, extra))


def describe(name: str) -> str:
    """One line: ``name (methods): description``."""
    r = load_recipe(name)
    return f"{name} ({', '.join(r.methods)}): {r.description}"


def _register() -> None:
    """Let :class:`~ucmkd.config.RunConfig` check and expand recipes (the config layer does not
    import this one: recipes validate method params, a layer above the config)."""
    from ..config import RunConfig

    RunConfig.RECIPES.update(check=load_recipe, expand=expand_recipe)


_register()

__all__ = ["Recipe", "recipe_names", "load_recipe", "recipe_layer", "expand_recipe", "recipe_config", "describe"]
