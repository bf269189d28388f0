"""Input validation of the OT loss: errors that name the argument, shape or dtype at fault."""
from __future__ import annotations

import torch

from ucmkd.errors import ConfigError, DataError, NumericalError

PREFIX = "feature alignment"   # every error message of the package starts with it


def check_choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(
            f"{PREFIX}: unknown {name} {value!r}; valid {name}s are {', '.join(map(repr, valid))}"
        )


def check_finite(x: torch.Tensor, who: str) -> None:
    if not bool(torch.isfinite(x).all()):
        kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise NumericalError(f"{PREFIX}: {who} contain {kind} (shape {tuple(x.shape)})")


def check_features(zs, zt) -> tuple[torch.Tensor, torch.Tensor]:
    """``zs`` [B, d], ``zt`` [M, d] checked, in their dtype promoted to at least float32."""
    for who, z in (("student features zs", zs), ("teacher features zt", zt)):
        if not isinstance(z, torch.Tensor):
            raise DataError(f"{PREFIX}: {who} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise DataError(
                f"{PREFIX}: {who} must be 2-D (n x d), got shape {tuple(z.shape)}"
            )
        if z.shape[0] == 0 or z.shape[1] == 0:
            raise DataError(f"{PREFIX}: {who} are empty, shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise DataError(f"{PREFIX}: {who} must be floating point, got dtype {z.dtype}")
    if zs.shape[1] != zt.shape[1]:
        raise DataError(
            f"{PREFIX}: feature dims differ: student zs {tuple(zs.shape)} vs teacher zt "
            f"{tuple(zt.shape)} (need the same d)"
        )
    if zs.device != zt.device:
        raise DataError(
            f"{PREFIX}: student zs is on {zs.device} but teacher zt is on {zt.device}"
        )
    check_finite(zs.detach(), "student features")
    check_finite(zt.detach(), "teacher features")
    # Solve in at least float32 (float16/bfloat16 logsumexp is too coarse).
    dtype = torch.promote_types(zs.dtype, torch.float32)
    return zs.to(dtype), zt.to(dtype)


def range_msg(C: torch.Tensor, eps: float, lo: float | None = None, hi: float | None = None) -> str:
    """``cost range [min C, max C] = [...], max C / eps = ...`` (``lo``/``hi`` if known)."""
    lo = float(C.min()) if lo is None else lo
    hi = float(C.max()) if hi is None else hi
    return f"cost range [min C, max C] = [{lo:.4g}, {hi:.4g}], max C / eps = {hi / eps:.4g}"


def check_extra(extra_cost, shape: tuple, dtype) -> torch.Tensor | None:
    """``extra_cost`` [B, M] = ``shape``, detached in ``dtype``; None stays None."""
    if extra_cost is None:
        return None
    if tuple(extra_cost.shape) != tuple(shape):
        raise DataError(f"{PREFIX}: extra_cost {list(extra_cost.shape)} must be [B, M] = {list(shape)}")
    return extra_cost.detach().to(dtype)
