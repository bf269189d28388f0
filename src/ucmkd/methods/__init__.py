"""Distillation methods behind one interface; ``METHODS`` maps names to classes."""
from . import ce, kd, ucmkd_paper  # noqa: F401  (register the built-in methods)
from . import c2kd, reviewkd  # noqa: F401  (cross-modal baselines: C2KD, ReviewKD)
from . import dkd, fa_only, fitnet, mmd, norm, paired_kd  # noqa: F401  (baselines: DKD, FitNet, FA-only, MMD, NORM, paired KD)
from . import pseudo_label, ucmkd  # noqa: F401  (teacher-free semi-supervised baseline; the default distiller)
from . import better_together  # noqa: F401  (teacher-free: a head shared by both modalities' labels)
from . import fixmatch, freematch  # noqa: F401  (teacher-free SSL baselines with augmentation: FixMatch, FreeMatch)
from .base import METHODS, DistillOutput, Distiller, build_distiller, register_method

__all__ = ["METHODS", "DistillOutput", "Distiller", "build_distiller", "register_method"]
