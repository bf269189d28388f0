"""Typed configuration: dataclasses with defaults, merged from YAML and ``key=value`` overrides.

Every field error names its dotted path (``optim.lr``) so a typo never passes silently. Numeric
fields carry their valid range (:func:`ranged`), string fields with a fixed set of values their
``CHOICES``, checked when a config is read (:func:`from_dict`) and, for configs built in Python,
by :func:`check_ranges` before a run is prepared.

Modules: :mod:`.fields` (valid values), :mod:`.data` (the ``data`` section and the built-in
dataset families' options), :mod:`.run` (the other sections of a run and :class:`RunConfig`),
:mod:`.grids` (experiments and suites), :mod:`.serde` (reading, writing, hashing).
"""
from .data import AVConfig, DataConfig, FolderConfig, SpokenDigitsConfig, SyntheticConfig, TabularConfig
from .fields import _check_choice, _check_range, _join, check_ranges, choices_of, range_text, ranged
from .grids import ExperimentConfig, HeadlineConfig, SettingConfig, SuiteConfig
from .run import (SUPERVISED, AugmentConfig, LoggingConfig, MethodConfig, ModelConfig, OptimConfig, PairingConfig,
                  RunConfig, TeacherConfig)
from .serde import (_coerce, builtin_yaml, config_hash, deep_merge, from_dict, is_path, load_config, load_yaml, nest,
                    parse_overrides, register_plugin_loader, replace, resolve_plugin_paths, resolve_spec,
                    resolve_yaml, save_config, to_dict)

__all__ = ["AVConfig", "DataConfig", "FolderConfig", "SpokenDigitsConfig", "SyntheticConfig", "TabularConfig",
           "check_ranges", "choices_of", "range_text", "ranged", "ExperimentConfig", "HeadlineConfig",
           "SettingConfig", "SuiteConfig", "AugmentConfig", "LoggingConfig", "MethodConfig", "ModelConfig",
           "OptimConfig", "PairingConfig", "RunConfig", "TeacherConfig", "SUPERVISED", "builtin_yaml", "config_hash", "deep_merge",
           "from_dict", "is_path", "load_config", "load_yaml", "nest", "parse_overrides", "register_plugin_loader",
           "replace", "resolve_plugin_paths", "resolve_spec", "resolve_yaml", "save_config", "to_dict",
           "_check_choice", "_check_range", "_join", "_coerce"]
