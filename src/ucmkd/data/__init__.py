"""Modality datasets, fixed splits and the pairing sampler."""
from . import digits, synthetic, tabular  # noqa: F401  (register the built-in datasets)
from . import av  # noqa: F401
from . import spoken  # noqa: F401
from . import npz  # noqa: F401  (the npz:PATH scheme)
from .base import (DATASETS, ModalityData, RawModality, cache_dir, check_compatible, data_fingerprint,
                   load_modality, make_splits, register_dataset)
from .pairing import MODES, PRESETS, Batch, PairingSampler, imbalance_keep
from .lazy import LazyArray
from .standardize import Standardizer

__all__ = ["DATASETS", "ModalityData", "RawModality", "cache_dir", "check_compatible", "data_fingerprint",
           "load_modality", "make_splits", "register_dataset", "MODES", "PRESETS", "Batch", "PairingSampler",
           "imbalance_keep", "Standardizer", "LazyArray"]
