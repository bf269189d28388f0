"""Small backbones per input kind. Each maps an input batch to a feature z [B, feat_dim];
:class:`Classifier` adds the linear head (logits [B, K]) and exposes both separately."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..registry import Registry

BackboneBuilder = Callable[..., nn.Module]
BACKBONES: Registry[BackboneBuilder] = Registry("backbone")
AUTO_BACKBONE = {"vector": "mlp", "signal": "cnn1d", "image": "cnn2d"}


class Encoder(nn.Module):
    """Base encoder: ``stages`` (list of modules, for multi-stage methods) then an embedding.

    ``forward(x) -> z [B, feat_dim]``; ``forward_stages(x) -> list of stage outputs``. (``feat_dim``,
    an int, has no class-level annotation: under ``from __future__ import annotations`` TorchScript
    cannot resolve it, and every encoder must stay scriptable for ``ucmkd export``.)
    """

    def __init__(self, stages: list[nn.Module], embed: nn.Module, feat_dim: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.embed = embed
        self.feat_dim = feat_dim

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.embed(x)


def _embed(in_dim: int, feat_dim: int, pool: nn.Module | None = None) -> nn.Module:
    layers = [pool] if pool is not None else []
    layers += [nn.Flatten(), nn.Linear(in_dim, feat_dim), nn.BatchNorm1d(feat_dim), nn.ReLU()]
    return nn.Sequential(*layers)


@BACKBONES.register("mlp")
def mlp(input_shape: tuple, width: int = 64, feat_dim: int = 64, depth: int = 2) -> Encoder:
    """MLP for vectors [B, D]: ``depth`` Linear-BN-ReLU blocks of ``width``, then the embedding."""
    if len(input_shape) != 1:
        raise ConfigError(f"backbone 'mlp' takes vector inputs [B, D], got input shape {list(input_shape)}")
    dims = [input_shape[0]] + [width] * depth
    stages = [nn.Sequential(nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()) for a, b in zip(dims, dims[1:])]
    return Encoder(stages, _embed(dims[-1], feat_dim), feat_dim)


@BACKBONES.register("plain-mlp")
def plain_mlp(input_shape: tuple, width: int = 128, feat_dim: int = 64, depth: int = 2,
              batchnorm: bool = False) -> nn.Module:
    """A user-style encoder, written the way users write one: flatten, ``depth`` x (Linear(width),
    [BatchNorm1d,] ReLU), then a plain Linear to ``feat_dim`` — raw, unnormalised features (no
    BatchNorm or activation on the output). Any input shape; [B, prod(input_shape)] -> [B, feat_dim]."""
    n_in = 1
    for s in input_shape:
        n_in *= int(s)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else width, width)]
        layers += [nn.BatchNorm1d(width)] if batchnorm else []
        layers += [nn.ReLU()]
    layers += [nn.Linear(width if depth > 0 else n_in, feat_dim)]
    return nn.Sequential(*layers)


def _conv_block(conv: type, bn: type, pool: nn.Module, cin: int, cout: int) -> nn.Module:
    return nn.Sequential(conv(cin, cout, 3, padding=1, bias=False), bn(cout), nn.ReLU(),
                         conv(cout, cout, 3, padding=1, bias=False), bn(cout), nn.ReLU(), pool)


def _cnn(input_shape: tuple, width: int, feat_dim: int, depth: int, dims: int) -> Encoder:
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    pool, gap = (nn.MaxPool1d, nn.AdaptiveAvgPool1d) if dims == 1 else (nn.MaxPool2d, nn.AdaptiveAvgPool2d)
    chans = [input_shape[0]] + [width * 2 ** i for i in range(depth)]
    stages = [_conv_block(conv, bn, pool(2, ceil_mode=True), a, b) for a, b in zip(chans, chans[1:])]
    return Encoder(stages, _embed(chans[-1], feat_dim, gap(1)), feat_dim)


@BACKBONES.register("cnn1d")
def cnn1d(input_shape: tuple, width: int = 32, feat_dim: int = 64, depth: int = 3) -> Encoder:
    """1-D CNN for signals [B, C, L]: ``depth`` stages (2 convs + max-pool /2), channels
    width, 2*width, ..., global average pool, embedding."""
    if len(input_shape) != 2:
        raise ConfigError(f"backbone 'cnn1d' takes signals [B, C, L], got input shape {list(input_shape)}")
    return _cnn(input_shape, width, feat_dim, depth, dims=1)


@BACKBONES.register("cnn2d")
def cnn2d(input_shape: tuple, width: int = 32, feat_dim: int = 64, depth: int = 2) -> Encoder:
    """2-D CNN for images/spectrograms [B, C, H, W]: ``depth`` stages (2 convs + max-pool /2),
    global average pool, embedding."""
    if len(input_shape) != 3:
        raise ConfigError(f"backbone 'cnn2d' takes images [B, C, H, W], got input shape {list(input_shape)}")
    return _cnn(input_shape, width, feat_dim, depth, dims=2)


class Classifier(nn.Module):
    """Encoder f (input -> z [B, d]) and linear head h (z -> logits [B, K]).

    ``forward(x)`` returns logits; ``forward(x, return_features=True)`` returns (z, logits).
    Inputs whose shape differs from ``input_shape`` are rejected with a :class:`DataError`.
    """

    def __init__(self, encoder: nn.Module, feat_dim: int, num_classes: int, input_shape: tuple,
                 name: str = "model"):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feat_dim, num_classes)
        self.feat_dim, self.num_classes = feat_dim, num_classes
        self.input_shape = tuple(input_shape)
        self.name = name

    def check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape or x.ndim < 2:
            raise DataError(f"{self.name}: expected input [B, {', '.join(map(str, self.input_shape))}], "
                            f"got {list(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.encoder(x)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        z = self.features(x)
        logits = self.head(z)
        return (z, logits) if return_features else logits


def build_model(m, role: str, input_shape: tuple, kind: str, num_classes: int, name: str,
                feat_dim: Optional[int] = None) -> "Classifier":
    """The one builder of a run's models from a :class:`~ucmkd.config.ModelConfig` ``m``: the
    ``role``'s (``"student"`` or ``"teacher"``) backbone, width, feature dim (``feat_dim``
    overrides it) and backbone args, for inputs ``input_shape`` of ``kind`` and ``num_classes``."""
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    get = lambda f: getattr(m, f"{role}_{f}")    # noqa: E731
    return build_classifier(tuple(input_shape), kind, num_classes, get("backbone"), get("width"),
                            get("feat_dim") if feat_dim is None else feat_dim, name=name,
                            backbone_args=get("backbone_args"))


def build_classifier(input_shape: tuple, kind: str, num_classes: int, backbone: str = "auto",
                     width: int = 32, feat_dim: int = 64, name: str = "model",
                     backbone_args: dict | None = None) -> Classifier:
    """Build a :class:`Classifier` whose backbone suits ``kind`` (``auto``) or is named;
    ``backbone_args`` are extra keyword arguments of the backbone builder."""
    if backbone == "auto":
        if kind not in AUTO_BACKBONE:
            raise ConfigError(f"{name}: no automatic backbone for input kind {kind!r}")
        backbone = AUTO_BACKBONE[kind]
    builder = BACKBONES.get(backbone)
    try:
        enc = builder(tuple(input_shape), width=width, feat_dim=feat_dim, **(backbone_args or {}))
    except TypeError as e:
        raise ConfigError(f"{name}: bad arguments for backbone {backbone!r}: {e}") from None
    model = Classifier(enc, feat_dim, num_classes, input_shape, name=name)
    model.input_kind = kind      # the layout it was built for (a distiller's default augmentation kind)
    return model


def make_projector(in_dim: int, out_dim: int) -> nn.Module:
    """Learned projector from student feature dim to teacher feature dim (identity if equal)."""
    if in_dim == out_dim:
        return nn.Identity()
    return nn.Linear(in_dim, out_dim)
