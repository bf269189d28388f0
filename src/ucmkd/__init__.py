"""ucmkd: cross-modal knowledge distillation without paired data.

Python API (the CLI is a thin layer over it)::

    from ucmkd import RunConfig, run, load_modality, get_teacher, recipe_config
"""
from . import data, losses, methods, models  # noqa: F401  (fill the registries)
from .api import RunContext, build_student, load_pair, prepare, run
from .config import ExperimentConfig, RunConfig, load_config
from .data import PairingSampler, load_modality, register_dataset
from .engine import Trainer, get_teacher
from .errors import ConfigError, DataError, NumericalError, UcmkdError
from .experiment import run_experiment
from .export import load_student
from .methods import Distiller, register_method
from .plugins import load_plugins
from .recipes import recipe_config

from ._version import __version__

__all__ = ["RunConfig", "ExperimentConfig", "load_config", "run", "prepare", "RunContext", "run_experiment",
           "build_student", "load_pair",
           "load_modality", "register_dataset", "PairingSampler", "Trainer", "get_teacher", "Distiller",
           "register_method", "load_plugins", "recipe_config", "load_student", "ConfigError", "DataError", "NumericalError", "UcmkdError"]
