"""Built-in digits modalities: 8x8 images (scikit-learn) and 1-D signals (mnist1d, generated offline)."""
from __future__ import annotations

import pickle
import random

import numpy as np

from ..cache import get_or_build
from ..config import DataConfig
from ..errors import DataError
from .base import RawModality, cache_dir, register_dataset

DIGIT_CLASSES = [str(i) for i in range(10)]


@register_dataset("digits/image", reads=())
def digits_image(cfg: DataConfig) -> RawModality:
    """scikit-learn ``load_digits``: 1,797 grayscale 8x8 images, x [N, 1, 8, 8] in [0, 16]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None]
    return RawModality(x=x, y=d.target.astype(np.int64), classes=DIGIT_CLASSES, kind="image",
                       source="sklearn.datasets.load_digits")


def mnist1d_cache_path(cfg: DataConfig):
    return cache_dir(cfg) / f"mnist1d_n{cfg.mnist1d_samples}_seed42.pkl"


@register_dataset("digits/signal", reads=("mnist1d_samples",))
def digits_signal(cfg: DataConfig) -> RawModality:
    """mnist1d signals (length 40, 10 classes), generated offline and cached; x [N, 1, 40]."""
    path = mnist1d_cache_path(cfg)

    def read(p):
        with open(p, "rb") as f:
            d = pickle.load(f)
        return d["x"], d["y"]

    def write(xy, tmp):
        with open(tmp, "wb") as f:
            pickle.dump({"x": xy[0], "y": xy[1]}, f)

    x, y = get_or_build(path, lambda: generate_mnist1d(cfg.mnist1d_samples), write, read, "mnist1d cache")
    if x.ndim != 2 or x.shape[1] != 40:
        raise DataError(f"{path}: expected mnist1d signals of shape [N, 40], got {list(x.shape)}")
    return RawModality(x=x[:, None].astype(np.float32), y=y.astype(np.int64), classes=DIGIT_CLASSES,
                       fingerprint={"mnist1d_samples": cfg.mnist1d_samples},
                       kind="signal", source=str(path))


def generate_mnist1d(num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num_samples`` mnist1d items with the package's own recipe (no download).

    mnist1d seeds the global ``random``/``numpy`` RNGs; their states are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    return x, y
