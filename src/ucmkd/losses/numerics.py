"""Precision helpers of the losses under autocast (the engine's :mod:`~ucmkd.engine.precision` runs
the forwards in bf16/fp16; these keep a loss's arithmetic in float32)."""
from __future__ import annotations

import torch


def full_precision(x: torch.Tensor):
    """Context that switches autocast off on ``x``'s device type (computations inside run in
    the dtype of their inputs)."""
    return torch.autocast(x.device.type, enabled=False)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` promoted to float32 if it is in a lower precision (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
