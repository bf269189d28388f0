"""A TorchScript module as a :class:`~ucmkd.models.Classifier` (a teacher trained elsewhere).

The module (``torch.jit.load``) must provide ``features(x) -> z [B, d]`` and ``head(z) -> logits
[B, K]`` (a method or a submodule); ``forward`` is not used. Distillers read the teacher through
``encoder`` (= ``features``) and ``head``, and apply ``head`` to projected student features too,
which is why a module whose ``forward`` returns only logits, or (features, logits), is not
enough. ``forward_stages(x) -> list of [B, C, ...]`` is optional: methods that read the
teacher's intermediate feature maps need it, and get a :class:`ConfigError` naming the file
without it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .backbones import Classifier


class ScriptedEncoder(nn.Module):
    """``forward(x)`` = ``module.features(x)`` [B, d]; ``forward_stages`` = the module's, if it has one."""

    def __init__(self, module: torch.jit.ScriptModule, feat_dim: int, source: str):
        super().__init__()
        self.module = module
        self.feat_dim = feat_dim
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.features(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not hasattr(self.module, "forward_stages"):
            raise ConfigError(f"{self.source}: this TorchScript teacher has no forward_stages(x) method, so methods "
                              f"that read the teacher's intermediate feature maps cannot use it; export one "
                              f"(a list of [B, C, L] or [B, C, H, W] maps), or give a state dict of a cnn1d/cnn2d "
                              f"teacher backbone")
        return list(self.module.forward_stages(x))


class ScriptedHead(nn.Module):
    """``forward(z)`` = ``module.head(z)`` [B, K]. The module is held, not registered: its
    parameters belong to the encoder (moved and saved once)."""

    def __init__(self, module: torch.jit.ScriptModule):
        super().__init__()
        object.__setattr__(self, "_module", module)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._module.head(z)


@torch.no_grad()
def scripted_classifier(module: torch.jit.ScriptModule, x: torch.Tensor, num_classes: int, feat_dim: int,
                        source: str, name: str = "teacher", data: str = "the data") -> Classifier:
    """Wrap ``module`` (see the module docstring) as a frozen, eval-mode :class:`Classifier` for
    inputs like ``x`` [n, *input_shape] (a few items of the data it will see), checking on them
    that ``features`` gives [n, ``feat_dim``] and ``head`` [n, ``num_classes``]. Errors name
    ``source`` (the file) and both numbers (``data``: how to name the data's classes)."""
    missing = [m for m in ("features", "head") if not hasattr(module, m)]
    if missing:
        raise DataError(f"{source}: the TorchScript teacher has no {' or '.join(missing)}; it needs features(x) -> "
                        f"[B, d] and head(z) -> [B, K] (methods apply the head to student features too)")
    module.eval()
    try:
        z = module.features(x)
        logits = module.head(z) if isinstance(z, torch.Tensor) else None
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported the same way
        raise DataError(f"{source}: the TorchScript teacher fails on a batch {list(x.shape)}: "
                        f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from None
    if not isinstance(z, torch.Tensor) or z.ndim != 2:
        got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise DataError(f"{source}: features(x) maps {list(x.shape)} to {got}; expected [B, d]")
    if z.shape[1] != feat_dim:
        raise DataError(f"{source}: the teacher's features have dimension {z.shape[1]}, but model.teacher_feat_dim "
                        f"is {feat_dim}; set model.teacher_feat_dim={z.shape[1]}")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DataError(f"{source}: head(z) maps {list(z.shape)} to {got}; expected [B, K] logits")
    if logits.shape[1] != num_classes:
        raise DataError(f"{source}: the teacher's head gives {logits.shape[1]} classes, but {data} has "
                        f"{num_classes}")
    model = Classifier(ScriptedEncoder(module, feat_dim, source), feat_dim, num_classes, tuple(x.shape[1:]), name=name)
    model.head = ScriptedHead(module)
    return model.eval().requires_grad_(False)


__all__ = ["ScriptedEncoder", "ScriptedHead", "scripted_classifier"]
