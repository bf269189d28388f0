"""Distillation methods behind one interface; ``METHODS`` maps names to classes."""
from . import ce, kd, ucmkd_paper  # noqa: F401  (register the built-in methods)
from .base import METHODS, DistillOutput, Distiller, build_distiller, register_method

__all__ = ["METHODS", "DistillOutput", "Distiller", "build_distiller", "register_method"]
