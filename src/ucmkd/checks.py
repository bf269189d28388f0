"""Checks of what a user brings (data, models, device), with errors naming the part at fault."""
from __future__ import annotations

from typing import Any

import torch

from .data import ModalityData
from .errors import ConfigError, DataError
from .models import Classifier


def check_data(data: Any, role: str) -> None:
    """``data`` is a :class:`ModalityData` with non-empty train/val/test splits."""
    if not isinstance(data, ModalityData):
        raise ConfigError(f"{role}: expected a ucmkd.data.ModalityData (from ucmkd.load_modality or "
                          f"ucmkd.load_pair), got {type(data).__name__}")
    if data.x.shape[0] != data.y.shape[0]:
        raise DataError(f"{role} {data.name!r}: x has {data.x.shape[0]} items but y has {data.y.shape[0]}")
    for split in ("train", "val", "test"):
        if split not in data.splits or len(data.splits[split]) == 0:
            raise DataError(f"{role} {data.name!r}: the {split!r} split is missing or empty")


def check_model(model: Any, data: ModalityData, role: str) -> None:
    """``model`` fits ``data``: a :class:`Classifier` with ``data``'s input shape and classes,
    whose encoder maps a batch to ``[B, feat_dim]`` (checked on two training items, in eval
    mode, without gradient). Errors name the mismatch."""
    if not isinstance(model, Classifier):
        raise ConfigError(f"{role}_model: expected a ucmkd.models.Classifier (encoder + linear head), got "
                          f"{type(model).__name__}; wrap the encoder: Classifier(encoder, feat_dim=D, "
                          f"num_classes={data.num_classes}, input_shape={tuple(data.input_shape)})")
    if tuple(model.input_shape) != tuple(data.input_shape):
        raise DataError(f"{role}_model {model.name!r}: input_shape {list(model.input_shape)}, but {data.name!r} "
                        f"items are {list(data.input_shape)}")
    if model.num_classes != data.num_classes:
        raise DataError(f"{role}_model {model.name!r}: {model.num_classes} classes, but {data.name!r} has "
                        f"{data.num_classes} ({', '.join(map(str, data.classes))})")
    x = data.x[data.splits["train"][:2]]
    param = next(iter(model.parameters()), None)
    if param is not None:
        x = x.to(param.device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            z = model.encoder(x)
    except Exception as e:  # noqa: BLE001 - any failure of the user's encoder is reported the same way
        raise DataError(f"{role}_model {model.name!r}: its encoder fails on a batch {list(x.shape)} of "
                        f"{data.name!r}: {type(e).__name__}: {e}") from None
    finally:
        model.train(was)
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != model.feat_dim:
        got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise DataError(f"{role}_model {model.name!r}: its encoder maps {list(x.shape)} to {got}, but "
                        f"feat_dim={model.feat_dim} (the head takes [B, {model.feat_dim}])")


def check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r}, but no CUDA device is available here (use device=cpu)")
