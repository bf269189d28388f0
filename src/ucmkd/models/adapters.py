"""Optional adapters for timm / torchvision backbones (not imported by the core).

``timm`` and ``torchvision`` are optional extras (``pip install ucmkd[vision]``); on a
CPU-only PyTorch build without them, requesting these backbones raises a clear error.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import ConfigError
from .backbones import BACKBONES, Encoder


class _PretrainedEncoder(Encoder):
    """Wrap a feature extractor returning [B, C] or [B, C, ...] features, then embed to feat_dim."""

    def __init__(self, body: nn.Module, body_dim: int, feat_dim: int):
        super().__init__([body], nn.Sequential(nn.Flatten(), nn.Linear(body_dim, feat_dim),
                                               nn.BatchNorm1d(feat_dim), nn.ReLU()), feat_dim)


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"backbone needs the optional package {module!r} ({e}); "
                          f"install it with `pip install ucmkd[vision]`") from None


@BACKBONES.register("timm")
def timm_backbone(input_shape: tuple, width: int = 0, feat_dim: int = 64,
                  model_name: str = "resnet18", pretrained: bool = False) -> Encoder:
    """Any timm model as a pooled feature extractor (``num_classes=0``)."""
    timm = _require("timm")
    body = timm.create_model(model_name, pretrained=pretrained, num_classes=0, in_chans=input_shape[0])
    with torch.no_grad():
        body_dim = body(torch.zeros(2, *input_shape)).shape[1]
    return _PretrainedEncoder(body, body_dim, feat_dim)


@BACKBONES.register("torchvision-resnet18")
def torchvision_resnet18(input_shape: tuple, width: int = 0, feat_dim: int = 64) -> Encoder:
    """torchvision ResNet-18 without its classifier; the first conv adapts to C input channels."""
    tv = _require("torchvision")
    body = tv.models.resnet18(weights=None)
    if input_shape[0] != 3:
        body.conv1 = nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False)
    body.fc = nn.Identity()
    return _PretrainedEncoder(body, 512, feat_dim)
